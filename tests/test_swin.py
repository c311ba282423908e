"""The timm Swin adapter honours the backbone contract (models/swin.py)."""

import pytest
import torch
from timm.models.swin_transformer import SwinTransformer

from mimaim.eval.features import encode, pool_tokens
from mimaim.models import create_model, model_family
from mimaim.objectives import build_objective

TINY = dict(img_size=32, patch_size=4, window_size=4, embed_dim=12, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4))


def _tiny(**kw):
    torch.manual_seed(0)
    return create_model("swin_tiny", **{**TINY, **kw}).eval()


def test_registered_as_swin_family_with_the_contract_attributes():
    assert model_family("swin_tiny") == model_family("swin_base") == "swin"
    m = _tiny()
    assert (m.embed_dim, m.num_features) == (12, 96)
    assert m.grid_size == (8, 8) and m.num_patches == 64 and m.patch_size == 4
    assert m.num_prefix_tokens == 0 and m.depth == 5 and m.num_heads == 4
    assert m.output_stride == 32 and m.final_grid_size == (1, 1)
    with torch.device("meta"):  # shapes only; no memory, no init time
        base = create_model("swin_base", img_size=64, patch_size=4, window_size=2)
    assert (base.embed_dim, base.num_features, base.depth) == (128, 1024, 24)


def test_features_equal_timm_and_timm_weights_load():
    m = _tiny()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = m.forward_features(x)
        ref = SwinTransformer.forward_features(m, x)  # timm's own path: (B, H, W, C)
    assert ours.shape == (2, 1, 96)
    torch.testing.assert_close(ours, ref.flatten(1, 2), rtol=0, atol=0)
    plain = SwinTransformer(img_size=32, patch_size=4, embed_dim=12, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4),
                            window_size=4, num_classes=0)
    m.load_state_dict(plain.state_dict(), strict=True)  # same names as timm


def test_embed_replaces_masked_tokens_after_the_patch_norm():
    m = _tiny()
    x = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[0, :5] = True
    token = torch.full((1, 1, 12), 7.0)
    with torch.no_grad():
        plain = m.embed(x)
        masked = m.embed(x, mask, token)
    assert torch.equal(masked[0, :5], token[0].expand(5, 12))
    torch.testing.assert_close(masked[~mask], plain[~mask])
    # the unmasked tokens are LayerNorm outputs: zero mean over channels
    assert plain.mean(-1).abs().max() < 1e-5


def test_intermediates_by_block_over_stages():
    m = _tiny()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        stage2 = m.forward_intermediates(x, [2, 3])  # both in stage 2 (grid 2x2, width 48)
        last = m.forward_intermediates(x, 1, norm=True)
        avg = encode(m, x, layers=[2, 3])
    assert [t.shape for t in stage2] == [(2, 4, 48), (2, 4, 48)]
    torch.testing.assert_close(last[0], m.forward_features(x))
    assert avg.shape == (2, 4, 48)
    assert pool_tokens(avg, m.num_prefix_tokens).shape == (2, 48)  # mean of tokens: no cls
    with pytest.raises(ValueError, match="span stages"):
        m.forward_intermediates(x, [1, 2])


@pytest.mark.parametrize("img_size, window, match", [
    (32, 7, r"window_size 7 does not fit image size 32.*8, 4, 2, 1.*window_size=4"),
    (64, 3, r"window_size 3 does not fit image size 64.*16, 8, 4, 2.*window_size=2"),
    (48, 2, r"image size 48 is not a multiple of 32.*--img-size"),
])
def test_window_or_size_that_does_not_fit_is_named(img_size, window, match):
    with pytest.raises(ValueError, match=match):
        create_model("swin_tiny", img_size=img_size, patch_size=4, window_size=window)


def test_windows_that_fit():
    for img_size, window in ((32, 8), (32, 2), (64, 4), (192, 6), (224, 7)):
        grids = [img_size // 4 // 2 ** i for i in range(4)]
        assert all(g <= window or g % window == 0 for g in grids)
    create_model("swin_tiny", **{**TINY, "window_size": 8})  # window = whole grid: global attention, no shift


def test_attention_mask_is_refused_and_mae_refuses_swin():
    m = _tiny()
    with pytest.raises(ValueError, match="no attention mask"):
        m.forward_tokens(m.embed(torch.randn(1, 3, 32, 32)), attn_mask=torch.ones(1, 1, 64, 64, dtype=torch.bool))
    with pytest.raises(ValueError, match="choose another --model"):
        build_objective("mae", "swin_tiny", 32, 4)
