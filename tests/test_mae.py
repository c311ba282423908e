"""MAE's pieces (He et al. 2111.06377, section 3; facebookresearch/mae models_mae.py)."""

import math

import pytest
import torch

from mimaim.masking import mae_noise, random_masking, unshuffle
from mimaim.models.layers import normalized_pixel_targets, patchify, sincos_2d, unpatchify
from mimaim.objectives import build_objective

SMALL = {"decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2}


def _mae(options=None, **overrides):
    torch.manual_seed(0)
    return build_objective("mae", "vit_tiny", 16, 4, {**SMALL, **(options or {})},
                           **{"depth": 1, **overrides})


# --------------------------------------------------------------------------- patches
def test_patchify_unpatchify_round_trip_and_layout():
    images = torch.randn(2, 3, 16, 12)
    patches = patchify(images, 4)  # (B, 4*3 patches, 4*4*3)
    assert patches.shape == (2, 12, 48)
    assert torch.equal(unpatchify(patches, 4, (4, 3)), images)
    # raster order of patches; inside a patch rows of pixels with channels fastest
    b, row, col, i, j, c = 1, 2, 1, 3, 2, 1
    assert patches[b, row * 3 + col, (i * 4 + j) * 3 + c] == images[b, c, row * 4 + i, col * 4 + j]
    square = torch.randn(1, 3, 8, 8)
    assert torch.equal(unpatchify(patchify(square, 2), 2), square)
    with pytest.raises(ValueError, match="not divisible"):
        patchify(torch.randn(1, 3, 10, 8), 4)


# --------------------------------------------------------------------------- masking
@pytest.mark.parametrize("ratio,num_patches,kept", [(0.75, 196, 49), (0.75, 64, 16), (0.6, 10, 4), (0.0, 8, 8)])
def test_random_masking_ratio(ratio, num_patches, kept):
    tokens = torch.randn(3, num_patches, 5)
    visible, mask, ids_restore = random_masking(tokens, ratio)
    assert visible.shape == (3, kept, 5)  # len_keep = int(N (1 - r))
    assert mask.shape == (3, num_patches) and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert mask.sum(dim=1).tolist() == [num_patches - kept] * 3


def test_random_masking_keeps_smallest_noise_and_restores_order():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 16, 4, generator=g)
    noise = torch.stack([mae_noise(16, g) for _ in range(2)])
    visible, mask, ids_restore = random_masking(tokens, 0.75, noise)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_keep = ids_shuffle[:, :4]
    # visible tokens are the gather by ids_keep (smallest noise first)
    assert torch.equal(visible, torch.gather(tokens, 1, ids_keep[..., None].expand(-1, -1, 4)))
    # the mask is in the original patch order: 0 exactly at the kept positions
    for b in range(2):
        assert set(torch.nonzero(mask[b] == 0).flatten().tolist()) == set(ids_keep[b].tolist())
    # ids_restore inverts the shuffle
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(16).expand(2, -1))
    # unshuffle(visible + anything for the removed) puts visible tokens back where they were
    filler = torch.zeros(2, 12, 4)
    restored = unshuffle(torch.cat([visible, filler], dim=1), ids_restore)
    keep = (mask == 0)[..., None]
    assert torch.equal(restored * keep, tokens * keep)


def test_sample_masking_is_per_sample_noise_from_the_generator():
    mae = _mae()
    a = mae.sample_masking(torch.Generator().manual_seed(3))
    b = mae.sample_masking(torch.Generator().manual_seed(3))
    assert a.shape == (16,) and torch.equal(a, b)


# --------------------------------------------------------------------------- loss
def test_loss_counts_only_removed_patches():
    mae = _mae().eval()
    images = torch.randn(2, 3, 16, 16)
    noise = torch.rand(2, 16)
    out = mae(images, masking=noise)
    visible = (out.mask == 0)[..., None]
    changed = out.pred + 5.0 * visible  # change predictions on visible patches only
    loss_changed, _ = mae.forward_loss(images, changed, out.mask)
    torch.testing.assert_close(loss_changed, out.loss, atol=0, rtol=0)
    # ... while changing a removed patch's prediction does change it
    loss_masked, _ = mae.forward_loss(images, out.pred + 5.0 * (~visible), out.mask)
    assert loss_masked > out.loss + 1
    # and the value is the mean over removed patches of the per-patch MSE
    per_patch = ((out.pred - out.target) ** 2).mean(-1)
    torch.testing.assert_close(out.loss, per_patch[out.mask.bool()].mean())


def test_gradient_of_visible_predictions_is_zero():
    mae = _mae()
    images = torch.randn(2, 3, 16, 16)
    pred = torch.randn(2, 16, 48, requires_grad=True)
    mask = torch.zeros(2, 16)
    mask[:, :12] = 1
    loss, _ = mae.forward_loss(images, pred, mask)
    loss.backward()
    assert pred.grad[:, 12:].abs().sum() == 0 and pred.grad[:, :12].abs().sum() > 0


def test_normalized_pixel_targets_use_unbiased_variance():
    patches = torch.randn(2, 5, 48) * 3 + 1
    target = normalized_pixel_targets(patches)
    mean = patches.mean(-1, keepdim=True)
    var_unbiased = ((patches - mean) ** 2).sum(-1, keepdim=True) / (48 - 1)
    torch.testing.assert_close(target, (patches - mean) / torch.sqrt(var_unbiased + 1e-6))
    mae_norm, mae_raw = _mae({"norm_pix_loss": True}), _mae({"norm_pix_loss": False})
    images = torch.randn(1, 3, 16, 16)
    pred, mask = torch.randn(1, 16, 48), torch.ones(1, 16)
    (loss_norm, target_norm), (loss_raw, target_raw) = (m.forward_loss(images, pred, mask) for m in (mae_norm, mae_raw))
    torch.testing.assert_close(target_norm, normalized_pixel_targets(patchify(images, 4)))
    assert torch.equal(target_raw, patchify(images, 4))
    torch.testing.assert_close(loss_norm, ((pred - target_norm) ** 2).mean())
    torch.testing.assert_close(loss_raw, ((pred - target_raw) ** 2).mean())


# --------------------------------------------------------------------------- sin-cos
def _sincos_direct(D, h, w):
    """MAE's get_2d_sincos_pos_embed written out per entry (first D/2 channels: column index)."""
    table = torch.zeros(h * w, D, dtype=torch.float64)
    quarter = D // 4
    for r in range(h):
        for c in range(w):
            for i in range(quarter):
                omega = 1.0 / 10000 ** (i / quarter)
                table[r * w + c, i] = math.sin(c * omega)
                table[r * w + c, quarter + i] = math.cos(c * omega)
                table[r * w + c, 2 * quarter + i] = math.sin(r * omega)
                table[r * w + c, 3 * quarter + i] = math.cos(r * omega)
    return table.float()


def test_sincos_2d_values_and_quirks():
    D, h, w = 16, 3, 5
    table = sincos_2d(D, (h, w), num_prefix_tokens=1)
    assert table.shape == (1 + h * w, D) and table.dtype == torch.float32
    assert torch.equal(table[0], torch.zeros(D))  # cls row is zero
    torch.testing.assert_close(table[1:], _sincos_direct(D, h, w), atol=1e-6, rtol=0)
    # the quirk: patches in one column share the first D/2 channels, those in one row the second half
    grid = table[1:].reshape(h, w, D)
    assert torch.equal(grid[0, 2, :D // 2], grid[2, 2, :D // 2])
    assert torch.equal(grid[1, 0, D // 2:], grid[1, 4, D // 2:])
    assert not torch.equal(grid[1, 0, :D // 2], grid[1, 4, :D // 2])
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(18, 3)


def test_mae_tables_are_frozen_sincos():
    mae = _mae()
    torch.testing.assert_close(mae.encoder.pos_embed[0], sincos_2d(192, 4, 1))
    torch.testing.assert_close(mae.decoder_pos_embed[0], sincos_2d(32, 4, 1))
    assert not mae.encoder.pos_embed.requires_grad and not mae.decoder_pos_embed.requires_grad


# --------------------------------------------------------------------------- the whole
def test_forward_shapes_and_encoder_sees_visible_tokens_only():
    mae = _mae({"mask_ratio": 0.75})
    images = torch.randn(2, 3, 16, 16)
    latent, mask, ids_restore = mae.forward_encoder(images, torch.rand(2, 16))
    assert latent.shape == (2, 1 + 4, 192)  # cls + 25% of 16
    out = mae(images)
    assert out.pred.shape == (2, 16, 48) and out.target.shape == (2, 16, 48) and out.mask.shape == (2, 16)
    cols = mae.reconstruct(images, torch.rand(2, 16))
    assert set(cols) == {"original", "masked", "reconstruction", "reconstruction + visible"}
    assert all(v.shape == images.shape for v in cols.values())


def decay_split(objective):
    """(decayed, undecayed) parameter names of the optimiser groups the engine builds for ``objective``."""
    from mimaim.engine.optim import param_groups_weight_decay

    names = {id(p): n for n, p in objective.named_parameters()}
    groups = param_groups_weight_decay(objective, 0.05, objective.no_weight_decay())
    return {names[id(p)] for p in groups[1]["params"]}, {names[id(p)] for p in groups[0]["params"]}


def test_weight_decay_as_main_pretrain():
    """timm add_weight_decay without a skip list: only 1-D parameters and biases escape decay."""
    decayed, undecayed = decay_split(_mae())
    assert {"encoder.cls_token", "mask_token"} <= decayed
    assert {"encoder.blocks.0.norm1.weight", "encoder.blocks.0.attn.qkv.bias", "decoder_norm.bias"} <= undecayed
    assert "encoder.pos_embed" not in decayed | undecayed and "decoder_pos_embed" not in decayed | undecayed


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="mask_ratio"):
        _mae({"mask_ratio": 1.0})
    with pytest.raises(ValueError, match="not divisible"):
        _mae({"decoder_embed_dim": 30, "decoder_num_heads": 4})


def test_cpu_bf16_autocast_attention_runs_in_fp32():
    """Under CPU bf16 autocast attention is computed in fp32 (faster there, and more exact)."""
    from mimaim.models.layers import Attention

    torch.manual_seed(0)
    attn = Attention(32, 4)
    x = torch.randn(2, 9, 32)
    reference = attn(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x)
        qkv = attn.qkv(x).float().reshape(2, 9, 3, 4, 8).permute(2, 0, 3, 1, 4)
    assert out.dtype == torch.bfloat16
    # the attention mix itself sees fp32 q, k, v built from the bf16 qkv projection
    mixed = torch.nn.functional.scaled_dot_product_attention(*qkv.unbind(0)).transpose(1, 2).reshape(2, 9, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = attn.proj(mixed.to(torch.bfloat16))
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    torch.testing.assert_close(out.float(), reference, atol=0.05, rtol=0.05)
