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


def _timm_twin(m):
    """timm's own SwinTransformer with the adapter's weights."""
    plain = SwinTransformer(img_size=32, patch_size=4, embed_dim=12, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4),
                            window_size=4, num_classes=0).eval()
    plain.load_state_dict(m.state_dict(), strict=True)
    return plain


def test_forward_intermediates_is_timms_over_stages():
    m = _tiny()
    peer = _timm_twin(m)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, stages = m.forward_intermediates(x)
        ref_final, ref_stages = peer.forward_intermediates(x)
        nlc = m.forward_intermediates(x, indices=[-2, -1], norm=True, output_fmt="NLC", intermediates_only=True)
        ref_nlc = peer.forward_intermediates(x, indices=[-2, -1], norm=True, intermediates_only=True)
    assert [t.shape for t in stages] == [(2, 12, 8, 8), (2, 24, 4, 4), (2, 48, 2, 2), (2, 96, 1, 1)]
    for a, b in zip(stages, ref_stages):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(final, ref_final.flatten(1, 2), rtol=0, atol=0)  # = forward_features
    for a, b in zip(nlc, ref_nlc):  # NLC = timm's NCHW flattened in raster order
        torch.testing.assert_close(a, b.flatten(2).transpose(1, 2), rtol=0, atol=0)
    with pytest.raises(ValueError, match="output_fmt"):
        m.forward_intermediates(x, output_fmt="NHWC")


def test_probe_layers_are_stages_and_stop_early_against_timm():
    m = _tiny()
    peer = _timm_twin(m)
    x = torch.randn(2, 3, 32, 32)
    ran = []
    for i, stage in enumerate(m.layers):
        stage.register_forward_hook(lambda mod, inp, out, i=i: ran.append(i))
    with torch.no_grad():
        final, stages = m.forward_intermediates(x, indices=[1, 2], stop_early=True, output_fmt="NLC")
        ref_final, ref_stages = peer.forward_intermediates(x, indices=[1, 2], stop_early=True)
        assert ran == [0, 1, 2]  # the last stage never runs
        torch.testing.assert_close(final, ref_final.flatten(1, 2), rtol=0, atol=0)
        for a, b in zip(stages, ref_stages):
            torch.testing.assert_close(a, b.flatten(2).transpose(1, 2), rtol=0, atol=0)
        stage2 = encode(m, x, [2], norm=False)  # (B, 2*2 tokens, 48): stage 2, the mean of tokens pools it
        last = encode(m, x, [-1], norm=True)
    torch.testing.assert_close(stage2, stages[1], rtol=0, atol=0)
    torch.testing.assert_close(last, m.forward_features(x))
    assert pool_tokens(stage2, m.num_prefix_tokens).shape == (2, 48)  # mean of tokens: no cls
    with pytest.raises(ValueError, match="different shapes"):
        encode(m, x, [1, 2])


@pytest.mark.parametrize("img_size, window, match", [
    (32, 7, r"window_size 7 does not fit image size 32.*8, 4, 2, 1.*window_size=4"),
    (64, 3, r"window_size 3 does not fit image size 64.*16, 8, 4, 2.*window_size=2"),
    (48, 2, r"image size 48 is not a multiple of 32.*--img-size"),
])
def test_window_or_size_that_does_not_fit_is_named(img_size, window, match):
    with pytest.raises(ValueError, match=match):
        create_model("swin_tiny", img_size=img_size, patch_size=4, window_size=window)


@pytest.mark.parametrize("img_size, window", [(32, 8), (32, 2), (64, 4), (192, 6)])
def test_windows_that_fit_build_and_match_timm(img_size, window):
    shape = dict(patch_size=4, embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=window)
    torch.manual_seed(0)
    m = create_model("swin_tiny", img_size=img_size, **shape).eval()
    peer = SwinTransformer(img_size=img_size, num_classes=0, **shape).eval()
    peer.load_state_dict(m.state_dict(), strict=True)
    x = torch.randn(1, 3, img_size, img_size)
    with torch.no_grad():  # where the grid is no larger than the window, both shrink it and do not shift
        torch.testing.assert_close(m.forward_features(x), peer.forward_features(x).flatten(1, 2), rtol=0, atol=0)


def test_attention_mask_is_refused_and_mae_refuses_swin():
    m = _tiny()
    with pytest.raises(ValueError, match="no attention mask"):
        m.forward_tokens(m.embed(torch.randn(1, 3, 32, 32)), attn_mask=torch.ones(1, 1, 64, 64, dtype=torch.bool))
    with pytest.raises(ValueError, match="choose another --model"):
        build_objective("mae", "swin_tiny", 32, 4)
