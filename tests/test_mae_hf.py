"""Our MAE against HuggingFace ``ViTMAEForPreTraining`` holding the same weights.

Weights go ours -> HF (HF's fresh init has all-zero sin-cos tables, docs/methods.md section 9),
both see the same images and the same noise, so both draw the same mask. Loss, per-patch
predictions and mask must agree to float32 tolerance: ATOL = RTOL = 1e-5 (in practice the
two run the same kernels and agree bit for bit).
"""

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import ViTMAEConfig, ViTMAEForPreTraining  # noqa: E402

from mimaim.interop import hf_mae  # noqa: E402
from mimaim.objectives import build_objective  # noqa: E402

ATOL = RTOL = 1e-5
SMALL_DECODER = {"decoder_embed_dim": 64, "decoder_depth": 2, "decoder_num_heads": 4}


def _objective(options=None, model="vit_tiny", img_size=32, patch_size=4, seed=0, **overrides):
    torch.manual_seed(seed)
    overrides.setdefault("depth", 2)
    return build_objective("mae", model, img_size, patch_size, {**SMALL_DECODER, **(options or {})}, **overrides)


def _inputs(objective, batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    enc = objective.encoder
    images = torch.randn(batch, enc.in_chans, enc.img_size, enc.img_size, generator=g)
    noise = torch.rand(batch, enc.num_patches, generator=g)
    return images, noise


def _assert_same_as_hf(objective, hf_model, batch=3):
    images, noise = _inputs(objective, batch)
    with torch.no_grad():
        ours = objective(images, masking=noise)
        theirs = hf_model(pixel_values=images, noise=noise)
    torch.testing.assert_close(ours.mask, theirs.mask.to(ours.mask.dtype), atol=0, rtol=0)
    torch.testing.assert_close(ours.pred, theirs.logits, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=ATOL, rtol=RTOL)
    # a real test: the mask removes what the ratio says, and the loss is not trivially zero
    expected_kept = int(objective.encoder.num_patches * (1 - objective.options.mask_ratio))
    assert (ours.mask == 0).sum(dim=1).tolist() == [expected_kept] * batch
    assert ours.loss.item() > 0.01


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_same_loss_predictions_and_mask_as_hf(norm_pix_loss):
    objective = _objective({"norm_pix_loss": norm_pix_loss}).eval()
    hf_model = hf_mae.mae_to_hf_model(objective)
    assert hf_model.config.norm_pix_loss is norm_pix_loss
    assert hf_model.config.layer_norm_eps == 1e-6
    # the sin-cos tables really came across (HF's own init would leave zeros)
    assert hf_model.vit.embeddings.position_embeddings.abs().sum() > 0
    assert hf_model.decoder.decoder_pos_embed.abs().sum() > 0
    _assert_same_as_hf(objective, hf_model)


def test_non_default_decoder_and_mask_ratio():
    objective = _objective({"decoder_embed_dim": 96, "decoder_depth": 3, "decoder_num_heads": 3,
                            "mask_ratio": 0.6}).eval()
    config, state = hf_mae.mae_to_hf(objective)
    assert (config.decoder_hidden_size, config.decoder_num_hidden_layers,
            config.decoder_num_attention_heads, config.decoder_intermediate_size) == (96, 3, 3, 384)
    assert config.mask_ratio == 0.6
    hf_model = ViTMAEForPreTraining(config)
    hf_model.load_state_dict(state, strict=True)
    _assert_same_as_hf(objective, hf_model.eval())


def test_unregistered_shape_one_channel_patch_8():
    """A width/depth/heads not in the registry and a 1-channel input build through overrides."""
    objective = _objective(model="vit_base", img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
                           in_chans=1).eval()
    hf_model = hf_mae.mae_to_hf_model(objective)
    assert (hf_model.config.hidden_size, hf_model.config.num_channels, hf_model.config.patch_size) == (48, 1, 8)
    _assert_same_as_hf(objective, hf_model)
    back = hf_mae.mae_from_hf(hf_model)
    assert (back.encoder.embed_dim, back.encoder.depth, back.encoder.num_heads, back.encoder.in_chans) == (48, 2, 3, 1)
    _assert_same_as_hf(back.eval(), hf_model)


def test_round_trip_ours_hf_ours_is_identical():
    objective = _objective({"norm_pix_loss": True}).eval()
    hf_model = hf_mae.mae_to_hf_model(objective)
    back = hf_mae.mae_from_hf(hf_model).eval()
    spec = hf_mae.backbone_spec_from_hf(hf_model.config)
    # ViT-Tiny width at depth 2 is no registered shape: built through overrides
    assert spec["model"] == "vit_base"
    assert spec["overrides"] == {"embed_dim": 192, "depth": 2, "num_heads": 3, "mlp_ratio": 4.0}
    original, restored = objective.state_dict(), back.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert torch.equal(original[key], restored[key]), key
    images, noise = _inputs(objective)
    with torch.no_grad():
        a, b = objective(images, masking=noise), back(images, masking=noise)
    assert torch.equal(a.pred, b.pred) and torch.equal(a.loss, b.loss) and torch.equal(a.mask, b.mask)


def test_registered_shape_maps_to_registry_name():
    config = ViTMAEConfig(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768,
                          image_size=32, patch_size=4, decoder_hidden_size=128, decoder_num_hidden_layers=2,
                          decoder_num_attention_heads=4, decoder_intermediate_size=512, layer_norm_eps=1e-6,
                          norm_pix_loss=True, mask_ratio=0.75)
    spec = hf_mae.backbone_spec_from_hf(config)
    assert spec["model"] == "vit_tiny" and spec["overrides"] == {}
    assert spec["options"] == {"mask_ratio": 0.75, "decoder_embed_dim": 128, "decoder_depth": 2,
                               "decoder_num_heads": 4, "norm_pix_loss": True}


def test_legacy_transformers4_key_layout_reads_back():
    """Checkpoints on the hub use the 4.x names (vit.encoder.layer.N.attention.attention.query)."""
    objective = _objective()
    legacy = hf_mae.hf_state_dict_from_mae(objective, new_layout=False)
    assert "vit.encoder.layer.0.attention.attention.query.weight" in legacy
    assert "vit.encoder.layer.1.intermediate.dense.bias" in legacy
    ours = hf_mae.mae_state_dict_from_hf(legacy)
    for key, value in objective.state_dict().items():
        assert torch.equal(ours[key], value), key
    # q, k, v are the thirds of our fused qkv, in that order
    qkv = objective.state_dict()["encoder.blocks.0.attn.qkv.weight"]
    D = objective.encoder.embed_dim
    assert torch.equal(legacy["vit.encoder.layer.0.attention.attention.key.weight"], qkv[D:2 * D])


def test_gradients_match_hf():
    """Training equivalence: the same loss gives the same gradients (fused qkv vs split q, k, v)."""
    objective = _objective()
    hf_model = hf_mae.mae_to_hf_model(objective).train()
    objective.train()
    images, noise = _inputs(objective)
    objective(images, masking=noise).loss.backward()
    hf_model(pixel_values=images, noise=noise).loss.backward()
    hf_params = dict(hf_model.named_parameters())
    blk = objective.encoder.blocks[1].attn
    prefix = "vit.layers.1.attention." if "vit.layers.1.attention.q_proj.weight" in hf_params \
        else "vit.encoder.layer.1.attention.attention."
    names = ("q_proj", "k_proj", "v_proj") if prefix.startswith("vit.layers") else ("query", "key", "value")
    theirs_qkv = torch.cat([hf_params[prefix + n + ".weight"].grad for n in names])
    torch.testing.assert_close(blk.qkv.weight.grad, theirs_qkv, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(objective.mask_token.grad, hf_params["decoder.mask_token"].grad, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(objective.encoder.patch_embed.proj.weight.grad,
                               hf_params["vit.embeddings.patch_embeddings.projection.weight"].grad,
                               atol=ATOL, rtol=RTOL)
    assert objective.mask_token.grad.abs().sum() > 0


def test_save_and_load_local_hf_checkpoint_directory(tmp_path):
    objective = _objective({"norm_pix_loss": True}).eval()
    hf_mae.save_pretrained(objective, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "config.json").is_file()
    # HF's own loader reads our folder ...
    hf_model = ViTMAEForPreTraining.from_pretrained(str(tmp_path / "ckpt"), local_files_only=True).eval()
    _assert_same_as_hf(objective, hf_model)
    # ... and ours reads it back to identical outputs
    loaded = hf_mae.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.options == objective.options
    images, noise = _inputs(objective)
    with torch.no_grad():
        a, b = objective(images, masking=noise), loaded(images, masking=noise)
    assert torch.equal(a.pred, b.pred) and torch.equal(a.loss, b.loss)


def test_hf_saved_checkpoint_with_default_eps_loads_with_a_warning(tmp_path):
    """A folder written by HF itself (layer_norm_eps 1e-12 as on the hub) loads; the eps gap is named."""
    objective = _objective()
    config, state = hf_mae.mae_to_hf(objective)
    config.layer_norm_eps = 1e-12
    hf_model = ViTMAEForPreTraining(config)
    hf_model.load_state_dict(state)
    hf_model.save_pretrained(str(tmp_path / "hf"))
    with pytest.warns(UserWarning, match="layer_norm_eps"):
        loaded = hf_mae.from_pretrained(tmp_path / "hf").eval()
    images, noise = _inputs(objective)
    with torch.no_grad():
        ours, theirs = loaded(images, masking=noise), hf_model.eval()(pixel_values=images, noise=noise)
    # eps 1e-6 vs 1e-12 on unit-variance activations: close but not bitwise
    torch.testing.assert_close(ours.pred, theirs.logits, atol=1e-3, rtol=1e-3)


def test_missing_directory_and_unsupported_configs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf_mae.from_pretrained(tmp_path)
    base = dict(hidden_size=48, num_hidden_layers=1, num_attention_heads=3, intermediate_size=192, image_size=32,
                patch_size=4, decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                decoder_intermediate_size=128, layer_norm_eps=1e-6)
    with pytest.raises(ValueError, match="decoder_intermediate_size=100"):
        hf_mae.backbone_spec_from_hf(ViTMAEConfig(**{**base, "decoder_intermediate_size": 100}))
    with pytest.raises(ValueError, match="qkv_bias"):
        hf_mae.backbone_spec_from_hf(ViTMAEConfig(**{**base, "qkv_bias": False}))
    # Non-square inputs: HF's ViTMAE patchify and sin-cos init assume a square grid, so
    # there is nothing to compare against; the converter says so instead of guessing.
    with pytest.raises(ValueError, match="not square"):
        hf_mae.backbone_spec_from_hf(ViTMAEConfig(**{**base, "image_size": [32, 48]}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf_mae.backbone_spec_from_hf(ViTMAEConfig(**base))  # eps 1e-6: no warning
