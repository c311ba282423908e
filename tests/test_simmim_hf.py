"""SimMIM against HuggingFace ``ViTForMaskedImageModeling`` / ``SwinForMaskedImageModeling``.

Same weights (through ``interop/hf_simmim.py``), same images, same ``bool_masked_pos``:
the loss and the reconstruction must agree to float32 tolerance. HF computes the loss
with the mask upsampled from token resolution and ``sum / (mask.sum() + 1e-5) / C``.

Tolerances: reconstructions atol 1e-5 (values O(1); the two sides order float32 sums
differently: SDPA vs HF's attention, fused vs split qkv), loss rtol 1e-5.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mimaim.interop.hf_simmim import (hf_state_dict_from_simmim, simmim_from_hf,  # noqa: E402
                                      simmim_state_dict_from_hf, simmim_to_hf_model)
from mimaim.objectives import build_objective  # noqa: E402

RECON_ATOL = 1e-5
LOSS_RTOL = 1e-5


def _perturb(objective, seed=0):
    """Non-trivial values everywhere (LayerNorm affine, biases, bias tables), so the mapping is tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in objective.named_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return objective


def _compare(ours, hf, images, mask):
    with torch.no_grad():
        out = ours(images, mask)
        ref = hf(pixel_values=images, bool_masked_pos=mask)
    assert ref.reconstruction.shape == out.pred.shape
    torch.testing.assert_close(out.pred, ref.reconstruction, atol=RECON_ATOL, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, rtol=LOSS_RTOL, atol=0)
    return out, ref


def _vit():
    torch.manual_seed(0)
    objective = build_objective("simmim", "vit_tiny", 32, 4, {"vit_flavour": "plain", "mask_patch_size": 8},
                                embed_dim=48, depth=2, num_heads=3)
    return _perturb(objective).eval()


def _swin():
    torch.manual_seed(0)
    # 64 px, patch 4, window 2: stage grids 16, 8, 4, 2, all multiples of the window, so
    # HF (which clamps only when the grid is no larger than the window) and timm agree
    objective = build_objective("simmim", "swin_tiny", 64, 4, {"window_size": 2, "mask_patch_size": 16},
                                embed_dim=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 3, 4))
    return _perturb(objective).eval()


@pytest.mark.parametrize("make", [_vit, _swin], ids=["vit", "swin"])
def test_same_loss_and_reconstruction_as_hf(make):
    ours = make()
    hf = simmim_to_hf_model(ours)
    size = ours.encoder.img_size
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    mask = ours.draw_masking(3, torch.Generator().manual_seed(2))
    assert mask.dtype == torch.bool and mask.any() and not mask.all()
    out, ref = _compare(ours, hf, images, mask)
    assert ref.loss.item() > 0.1  # a real, non-degenerate loss


@pytest.mark.parametrize("make", [_vit, _swin], ids=["vit", "swin"])
def test_round_trip_through_hf_keys(make):
    ours = make()
    hf = simmim_to_hf_model(ours)
    back = simmim_state_dict_from_hf(hf.state_dict())
    mine = ours.state_dict()
    assert set(back) == set(mine)
    for key in mine:
        torch.testing.assert_close(back[key], mine[key], rtol=0, atol=0)
    # and an HF model converted back into a SimMIM objective computes the same thing
    rebuilt = simmim_from_hf(hf, hf.config, {"mask_patch_size": ours.options.mask_patch_size}).eval()
    size = ours.encoder.img_size
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    mask = ours.draw_masking(2, torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images, mask).pred, ours(images, mask).pred, rtol=0, atol=0)


def test_hf_vit_trained_weights_differ_from_fresh_init():
    """Guard against a vacuous comparison: HF's own fresh init gives another reconstruction."""
    from transformers import ViTForMaskedImageModeling

    ours = _vit()
    hf = simmim_to_hf_model(ours)
    fresh = ViTForMaskedImageModeling(hf.config).eval()
    images = torch.randn(2, 3, 32, 32)
    mask = ours.draw_masking(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(fresh(images, bool_masked_pos=mask).reconstruction, ours(images, mask).pred,
                                  atol=1e-3)


def test_beit_flavour_vit_refuses_conversion():
    objective = build_objective("simmim", "vit_tiny", 32, 4, {"mask_patch_size": 8}, embed_dim=48, depth=1,
                                num_heads=3)
    with pytest.raises(ValueError, match="vit_flavour=plain"):
        hf_state_dict_from_simmim(objective)
