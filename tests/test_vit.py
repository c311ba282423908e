"""The shared ViT against timm: forward_intermediates contract, per-block relative bias, BEiT init."""

import pytest
import torch
from timm.models.beit import Beit
from timm.models.vision_transformer import VisionTransformer as TimmViT

from mimaim.models import create_model

torch.set_num_threads(1)
SHAPE = dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2)


def ours_and_timm():
    torch.manual_seed(0)
    ours = create_model("vit_micro", **SHAPE).eval()
    peer = TimmViT(num_classes=0, global_pool="token", **SHAPE).eval()
    peer.load_state_dict(ours.state_dict(), strict=True)  # same names (MAE flavour = timm's ViT)
    return ours, peer


@pytest.mark.parametrize("kwargs", [
    {},
    {"indices": 2},
    {"indices": [0, -1], "norm": True},
    {"indices": [2, 0], "output_fmt": "NLC"},
    {"indices": [1], "return_prefix_tokens": True, "output_fmt": "NLC"},
    {"indices": 1, "return_prefix_tokens": True, "intermediates_only": True},
])
def test_forward_intermediates_equals_timm(kwargs):
    ours, peer = ours_and_timm()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        a, b = ours.forward_intermediates(x, **kwargs), peer.forward_intermediates(x, **kwargs)
    if not kwargs.get("intermediates_only"):
        torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)  # final: forward_features
        a, b = a[1], b[1]
    assert len(a) == len(b)
    for ta, tb in zip(a, b):
        for sa, sb in zip(*(t if isinstance(t, tuple) else (t,) for t in (ta, tb))):
            assert sa.shape == sb.shape
            torch.testing.assert_close(sa, sb, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        ours.forward_intermediates(x, indices=[3])


def test_stop_early_runs_no_block_after_the_last_asked_and_matches_timm():
    ours, peer = ours_and_timm()
    x = torch.randn(2, 3, 16, 16)
    ran = []
    for i, blk in enumerate(ours.blocks):
        blk.register_forward_hook(lambda m, inp, out, i=i: ran.append(i))
    with torch.no_grad():
        for kwargs in ({"indices": [0]}, {"indices": [1, 0], "norm": True, "output_fmt": "NLC",
                                          "return_prefix_tokens": True}):
            ran.clear()
            a = ours.forward_intermediates(x, stop_early=True, **kwargs)
            b = peer.forward_intermediates(x, stop_early=True, **kwargs)
            assert ran == list(range(max(kwargs["indices"]) + 1))  # blocks after the last asked never run
            torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)  # final: the last block run, normed
            for ta, tb in zip(a[1], b[1]):
                for sa, sb in zip(*(t if isinstance(t, tuple) else (t,) for t in (ta, tb))):
                    torch.testing.assert_close(sa, sb, rtol=1e-5, atol=1e-5)
        ran.clear()
        ours.forward_intermediates(x, indices=[0])
    assert ran == [0, 1, 2]  # without stop_early every block runs, as timm


def beit_flavour(mode, **kw):
    torch.manual_seed(0)
    return create_model("vit_micro", **SHAPE, class_token=True, pos_embed="none", qkv_bias="qv",
                        rel_pos_bias=mode, init_values=0.1, weight_init="trunc_normal", **kw).eval()


def test_per_block_relative_bias_equals_timm_beit_and_the_shared_table_copied():
    shared = beit_flavour("shared")
    with torch.no_grad():
        shared.rel_pos_bias.relative_position_bias_table.normal_(std=0.5)  # zero at init: make it matter
    per_block = beit_flavour("per_block")
    names = [n for n, _ in per_block.named_parameters() if "relative_position" in n]
    assert names == [f"blocks.{i}.attn.relative_position_bias_table" for i in range(3)]  # official names
    from mimaim.eval.finetune import expand_shared_rel_pos_bias
    per_block.load_state_dict(expand_shared_rel_pos_bias(shared.state_dict(), 3), strict=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(per_block(x), shared(x))
        # timm's Beit (per-block tables, q/v bias, layer scale) on the same weights
        peer = Beit(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=0,
                    use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1, global_pool="").eval()
        sd = {k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2"): v
              for k, v in per_block.state_dict().items()}
        missing, unexpected = peer.load_state_dict(sd, strict=False)
        assert not unexpected and all("relative_position_index" in k for k in missing)
        torch.testing.assert_close(per_block.forward_features(x), peer.forward_features(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="rel_pos_bias must be one of"):
        beit_flavour("everywhere")


def test_beit_init_covers_the_patch_conv():
    # unilm beit _init_weights: Conv2d -> trunc_normal_(std=.02, a=-.02, b=.02), bias 0
    enc = create_model("vit_micro", img_size=32, patch_size=4, embed_dim=128, depth=2, num_heads=4,
                       weight_init="trunc_normal")
    w, b = enc.patch_embed.proj.weight, enc.patch_embed.proj.bias
    assert w.abs().max() <= 0.02 + 1e-7 and b.abs().max() == 0
    # N(0, 0.02) truncated at +-1 std has std 0.02 * 0.5399 = 0.0108 (PyTorch's default conv init is ~0.08 here)
    assert w.std().item() == pytest.approx(0.0108, abs=0.0008)
