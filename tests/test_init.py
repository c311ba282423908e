"""``--init SOURCE``: a new run starts from another run, a local HF folder or a timm checkpoint.

Sources are generated small (vit_micro shapes, 32 px) with random weights; after the init our
objective must compute what the peer computes with the same weights.
"""

import re

import pytest
import torch

from mimaim.config import make_config
from mimaim.engine.build import build_run_objective
from mimaim.interop.init import initialize_from
from mimaim.models.layers import sincos_2d

from tiny_runs import images, make_run, randomize

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

MICRO = dict(img_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=4)


def fresh(objective="mae", **overrides):
    return build_run_objective(make_config(objective=objective, model="vit_micro", img_size=32, patch_size=4,
                                           **overrides)).eval()


def hf_vitmae(decoder_width=None, decoder_depth=None, layer_norm_eps=1e-6, norm_pix_loss=True, tables=True):
    """A ViTMAEForPreTraining shaped like ``fresh("mae")`` (the quick recipe's decoder unless given), with the
    sin-cos tables a saved MAE holds (``tables``; transformers 5.x leaves zeros in one built from a config)."""
    options = fresh("mae").options
    decoder_width = decoder_width or options.decoder_embed_dim
    decoder_depth = decoder_depth or options.decoder_depth
    config = transformers.ViTMAEConfig(
        hidden_size=128, num_hidden_layers=6, num_attention_heads=4, intermediate_size=512, image_size=32,
        patch_size=4, layer_norm_eps=layer_norm_eps, decoder_hidden_size=decoder_width,
        decoder_num_hidden_layers=decoder_depth, decoder_num_attention_heads=4,
        decoder_intermediate_size=4 * decoder_width, norm_pix_loss=norm_pix_loss)
    hf = randomize(transformers.ViTMAEForPreTraining(config)).eval()
    with torch.no_grad():
        for table in (hf.vit.embeddings.position_embeddings, hf.decoder.decoder_pos_embed):
            table.copy_(sincos_2d(table.shape[-1], 8, 1)[None] if tables else torch.zeros_like(table))
    return hf


def test_a_position_table_that_is_not_the_fixed_sin_cos_one_is_re_derived_and_reported(tmp_path):
    """MAE's frozen sin-cos tables: a source's zeros (or another table) are not loaded, the report says so."""
    hf_vitmae(tables=False).save_pretrained(tmp_path / "zeros")
    mae = fresh("mae")
    report = initialize_from(mae, tmp_path / "zeros")
    assert report.initialised == ["decoder_pos_embed", "encoder.pos_embed"]
    assert "note: the source's position table encoder.pos_embed is zeros: kept the run's sin-cos table" in \
        report.summary()
    torch.testing.assert_close(mae.encoder.pos_embed, sincos_2d(128, 8, 1)[None], rtol=0, atol=0)
    torch.testing.assert_close(mae.decoder_pos_embed, fresh("mae").decoder_pos_embed, rtol=0, atol=0)
    hf = hf_vitmae()
    with torch.no_grad():
        hf.vit.embeddings.position_embeddings.mul_(-1)
    hf.save_pretrained(tmp_path / "other")
    notes = [n for n in initialize_from(fresh("mae"), tmp_path / "other").notes if "position table" in n]
    assert notes == ["the source's position table encoder.pos_embed differs from the fixed sin-cos table by 2: "
                     "kept the run's sin-cos table"]
    hf_vitmae().save_pretrained(tmp_path / "ok")  # the tables a saved MAE holds: loaded, no note
    report = initialize_from(fresh("mae"), tmp_path / "ok")
    assert report.initialised == [] and "position table" not in report.summary()


def test_hf_vitmae_folder_gives_encoder_and_decoder(tmp_path):
    hf = hf_vitmae()
    hf.save_pretrained(tmp_path / "hf")
    mae = fresh("mae")
    report = initialize_from(mae, str(tmp_path / "hf"))
    assert report.initialised == [] and "decoder_pred.weight" in report.loaded and "mask_token" in report.loaded
    assert "HF ViTMAEForPreTraining folder" in report.summary()
    x = images()
    noise = torch.rand(2, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the peer's loss on the same images and mask
        torch.testing.assert_close(mae(x, noise).loss, hf(pixel_values=x, noise=noise).loss, rtol=0, atol=1e-5)


def test_hf_encoder_only_folder_leaves_the_decoder_initialised(tmp_path):
    hf = hf_vitmae()
    hf.vit.save_pretrained(tmp_path / "hf")  # a ViTMAEModel: no decoder
    mae = fresh("mae")
    before = mae.decoder_pred.weight.clone()
    report = initialize_from(mae, tmp_path / "hf")
    assert "decoder_pred.weight" in report.initialised and "mask_token" in report.initialised
    assert all(k.startswith("encoder.") for k in report.loaded) and len(report.loaded) == len(mae.encoder.state_dict())
    assert torch.equal(mae.decoder_pred.weight, before)
    torch.testing.assert_close(mae.encoder.blocks[5].mlp.fc2.weight, hf.vit.state_dict()[
        next(k for k in hf.vit.state_dict() if k.endswith("5.mlp.fc2.weight") or k.endswith("5.output.dense.weight"))])


def test_hf_settings_the_run_does_not_take_are_reported_with_both_values(tmp_path):
    """HF's defaults (layer_norm_eps 1e-12, norm_pix_loss False) are not MAE's: the run keeps its own and says so."""
    hf_vitmae(layer_norm_eps=1e-12, norm_pix_loss=False).save_pretrained(tmp_path / "hf")
    mae = fresh("mae")
    summary = initialize_from(mae, tmp_path / "hf").summary()
    assert "note: norm_pix_loss=False in the source, True in this run" in summary
    assert "--set objective.norm_pix_loss=false" in summary
    assert re.search(r"note: layer_norm_eps=1e-12 in the source, 1e-06 in this run .*differ by up to "
                     r"\d\.\de-\d\d", summary), summary
    assert mae.options.norm_pix_loss and {m.eps for m in mae.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-6}
    hf_vitmae().save_pretrained(tmp_path / "same")  # MAE's own settings: nothing to note
    assert "note:" not in initialize_from(fresh("mae"), tmp_path / "same").summary()


def test_dry_run_loads_the_init_source_and_stops_on_a_misfit(tmp_path, capsys):
    """``pretrain --dry-run --init SRC`` loads SRC into the run's objective as a run would, trains nothing and
    writes nothing; a source that does not fit fails with the init's message."""
    from mimaim.cli import main

    hf_vitmae(layer_norm_eps=1e-12, norm_pix_loss=False).save_pretrained(tmp_path / "hf")
    args = ["pretrain", "--dry-run", "--init", str(tmp_path / "hf"), "--objective", "mae", "--model", "vit_micro",
            "--patch-size", "4", "--out", str(tmp_path / "run")]
    assert main(args + ["--img-size", "32", "--set", "objective.norm_pix_loss=false"]) == 0
    out = capsys.readouterr().out
    n = len(fresh("mae").state_dict())
    assert f"dry run: init from {tmp_path / 'hf'} (HF ViTMAEForPreTraining folder): loaded {n} tensors" in out
    assert "initialised 0" in out and "layer_norm_eps=1e-12" in out and "GFLOP" in out
    assert "norm_pix_loss" not in out  # the suggested --set took the source's value
    assert main(args + ["--img-size", "64"]) == 2
    captured = capsys.readouterr()
    assert "does not fit" in captured.err and "65 position rows in the source vs 257 here" in captured.err
    assert "GFLOP" not in captured.out and not (tmp_path / "run").exists()


def test_hf_decoder_of_another_size_is_a_clear_error(tmp_path):
    hf_vitmae(decoder_width=2 * fresh("mae").options.decoder_embed_dim).save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match=r"decoder.*another head size.*--set objective.decoder_"):
        initialize_from(fresh("mae"), tmp_path / "hf")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_vit_checkpoint_file_gives_the_encoder(tmp_path, suffix):
    model = randomize(timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10, **MICRO)).eval()
    model.pos_embed.data.copy_(sincos_2d(128, 8, 1)[None])  # MAE's fixed table, as its checkpoints hold
    path = tmp_path / f"vit{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(model.state_dict(), str(path))
    else:
        torch.save({"model": model.state_dict(), "epoch": 3}, path)  # as the official MAE checkpoints
    mae = fresh("mae")
    report = initialize_from(mae, path)
    assert sorted(report.skipped) == ["encoder.head.bias", "encoder.head.weight"]
    assert len(report.loaded) == len(mae.encoder.state_dict()) and "mask_token" in report.initialised
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(mae.encoder.forward_features(x), model.forward_features(x), rtol=0, atol=1e-5)


#: BEiT's two ViT flavours: the paper recipe's (a shared relative bias, layer scale 0.1, no absolute table) and the
#: quick recipe's (the released BEiT-base flags --abs_pos_emb --disable_rel_pos_bias --layer_scale_init_value 0)
BEIT_FLAVOURS = {"paper": (False, True, 0.1), "quick": (True, False, 0.0)}


@pytest.mark.parametrize("recipe", list(BEIT_FLAVOURS))
def test_timm_beit_checkpoint_file_gives_the_beit_encoder(tmp_path, recipe):
    absolute, relative, layer_scale = BEIT_FLAVOURS[recipe]
    model = randomize(timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=0,
                                        use_abs_pos_emb=absolute, use_rel_pos_bias=False,
                                        use_shared_rel_pos_bias=relative, init_values=layer_scale,
                                        use_fc_norm=False, **MICRO)).eval()
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "beit.safetensors"))
    beit = fresh("beit", recipe=recipe)
    report = initialize_from(beit, tmp_path / "beit.safetensors")
    assert ("encoder.blocks.0.ls1.gamma" in report.loaded) == bool(layer_scale)
    assert ("encoder.pos_embed" in report.loaded) == absolute and "lm_head.weight" in report.initialised
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(beit.encoder.forward_features(x), model.forward_features(x), rtol=0, atol=1e-5)


def test_another_run_of_the_same_objective_gives_everything(tmp_path):
    run, source = make_run(tmp_path / "run", "aim")
    aim = fresh("aim")
    report = initialize_from(aim, run)
    assert report.initialised == [] and any(k.startswith("head.") for k in report.loaded)
    for k, v in aim.state_dict().items():
        assert torch.equal(v, source.state_dict()[k]), k


def test_exported_timm_folder_round_trips(tmp_path):
    from mimaim.interop.timm_export import export_timm
    run, source = make_run(tmp_path / "run", "aim")
    export_timm(run, tmp_path / "timm")
    aim = fresh("aim")
    report = initialize_from(aim, tmp_path / "timm")
    assert len(report.loaded) == len(aim.encoder.state_dict())
    assert report.initialised and all(k.startswith("head.") for k in report.initialised)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(aim.encoder.forward_features(x), source.encoder.forward_features(x), rtol=0, atol=0)


def test_mismatches_name_both_sides(tmp_path):
    run, _ = make_run(tmp_path / "run", "mae")
    with pytest.raises(ValueError, match="trained with objective 'mae'.*this run is 'simmim'"):
        initialize_from(fresh("simmim"), run)
    from mimaim.interop.timm_export import export_timm
    export_timm(run, tmp_path / "timm")
    with pytest.raises(ValueError, match="patch 4 in the source vs width 128 and patch 8 in this run"):
        initialize_from(build_run_objective(make_config(objective="mae", patch_size=8)), tmp_path / "timm")
    with pytest.raises(ValueError, match="width 128 and patch 4 in the source vs width 192"):
        initialize_from(build_run_objective(make_config(objective="mae", model="vit_tiny")), tmp_path / "timm")
    with pytest.raises(ValueError, match="65 position rows in the source vs 257 here"):
        initialize_from(build_run_objective(make_config(objective="mae", img_size=64)), tmp_path / "timm")
    with pytest.raises(ValueError, match="lacks .* encoder tensors .*q_bias|no place for"):
        initialize_from(fresh("beit"), tmp_path / "timm")  # q/k/v bias vs BEiT's q/v-only bias
    with pytest.raises(FileNotFoundError, match="no such file"):
        initialize_from(fresh("mae"), tmp_path / "missing")


def test_pretrain_init_end_to_end(tmp_path, capsys):
    """``mimaim pretrain --init RUN`` prints what it loaded and trains from those weights."""
    from conftest import make_image_folder
    from mimaim.cli import main

    src, _ = make_run(tmp_path / "src", "mae", img_size=16)
    data = make_image_folder(tmp_path / "images")
    rc = main(["pretrain", "--init", str(src), "--img-size", "16", "--data", f"imagefolder:{data}", "--batch-size", "4",
               "--max-steps", "1", "--epochs", "1", "--lr", "1e-12", "--out", str(tmp_path / "new"), "--no-progress"])
    assert rc == 0
    err = capsys.readouterr().err
    n = len(fresh("mae").state_dict())
    assert f"init from {src}" in err and f"loaded {n} tensors" in err and "initialised 0" in err
    import mimaim
    new, old = mimaim.load_backbone(tmp_path / "new"), mimaim.load_backbone(src)
    torch.testing.assert_close(new.blocks[0].attn.qkv.weight, old.blocks[0].attn.qkv.weight, rtol=0, atol=1e-6)


@pytest.mark.parametrize("recipe", list(BEIT_FLAVOURS))
def test_hf_beit_folder_gives_encoder_mask_token_and_lm_head(tmp_path, recipe):
    absolute, relative, layer_scale = BEIT_FLAVOURS[recipe]
    beit = fresh("beit", recipe=recipe)
    config = transformers.BeitConfig(
        image_size=32, patch_size=4, hidden_size=128, num_hidden_layers=6, num_attention_heads=4,
        intermediate_size=512, vocab_size=beit.lm_head.out_features, layer_norm_eps=1e-6, use_mask_token=True,
        use_absolute_position_embeddings=absolute, use_relative_position_bias=False,
        use_shared_relative_position_bias=relative, layer_scale_init_value=layer_scale)
    hf = randomize(transformers.BeitForMaskedImageModeling(config)).eval()
    hf.save_pretrained(tmp_path / "hf")
    report = initialize_from(beit, tmp_path / "hf")
    assert "lm_head.weight" in report.loaded and "mask_token" in report.loaded
    assert all(k.startswith("tokenizer.") for k in report.initialised)  # the run fits its own codebook
    x = images()
    with torch.no_grad():
        theirs = hf.layernorm(hf.beit(pixel_values=x).last_hidden_state)
        torch.testing.assert_close(beit.encoder.forward_features(x), theirs, rtol=0, atol=1e-5)
        torch.testing.assert_close(beit.lm_head(beit.encoder.forward_features(x)), hf.lm_head(theirs), rtol=0,
                                   atol=1e-5)
