"""``mimaim export``: each export loads in its peer (timm, transformers) with the features of ``load_backbone``.

Runs are written through the real checkpoint format with random weights (``tiny_runs``); the
peer builds its model from the exported folder alone.
"""

import json

import pytest
import torch

import mimaim
from mimaim.cli import main
from mimaim.eval.features import pool_tokens

from tiny_runs import images, make_run

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

TOL = dict(rtol=0, atol=1e-5)

PAPER = {"recipe": "paper"}  # BEiT's and SimMIM's ViT: a shared relative bias, layer scale 0.1, no absolute table
TIMM_CASES = {  # id: (objective, make_run overrides, timm class)
    "mae": ("mae", {}, "VisionTransformer"),
    "beit": ("beit", PAPER, "Beit"),
    "beit-abs-pos": ("beit", {**PAPER, "objective_options": {"rel_pos_bias": False}}, "Beit"),
    "beit-abs-and-rel-pos": ("beit", {**PAPER, "objective_options": {"abs_pos_emb": True}}, "Beit"),
    "beit-quick": ("beit", {}, "Beit"),  # absolute table, no relative bias, no layer scale
    "simmim-beit-vit": ("simmim", PAPER, "Beit"),
    "simmim-beit-vit-ape": ("simmim", {}, "Beit"),  # the quick recipe: USE_APE, as BEiT quick
    "simmim-plain-vit": ("simmim", {"objective_options": {"vit_flavour": "plain"}}, "VisionTransformer"),
    "simmim-swin": pytest.param("simmim", {"model": "swin_tiny", "img_size": 64}, "SwinTransformer",
                                marks=pytest.mark.slow),  # 28M parameters
    "aim": ("aim", {}, "VisionTransformer"),
}


@pytest.mark.parametrize("objective, overrides, cls", list(TIMM_CASES.values()), ids=list(TIMM_CASES))
def test_timm_export_loads_with_no_other_argument_and_gives_the_same_features(tmp_path, objective, overrides, cls):
    run, _ = make_run(tmp_path / "run", objective, **overrides)
    out = tmp_path / "timm"
    assert main(["export", str(run), "--to", "timm", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["num_classes"] == 0 and config["mimaim"]["objective"] == objective

    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    encoder = mimaim.load_backbone(run)
    assert type(model).__name__ == cls
    x = images(size=encoder.img_size)
    pool = encoder_protocol_pool(objective)
    assert config["global_pool"] == {"cls": "token", "mean": "avg"}[pool]
    with torch.no_grad():
        ours = encoder.forward_features(x)  # (B, T, D) after the final norm
        torch.testing.assert_close(model.forward_features(x).reshape(ours.shape), ours, **TOL)
        torch.testing.assert_close(model(x), pool_tokens(ours, encoder.num_prefix_tokens, pool), **TOL)


def encoder_protocol_pool(objective: str) -> str:
    from mimaim.objectives import get_objective_class
    return get_objective_class(objective).probe_protocol.pool


def test_timm_export_of_aim_keeps_its_probe_protocol_reachable(tmp_path):
    """AIM's probe (mean of the last 6 blocks, no final norm) is not a timm pool; the blocks are there."""
    run, _ = make_run(tmp_path / "run", "aim")
    out = tmp_path / "timm"
    from mimaim.interop.timm_export import export_timm
    export_timm(run, out)
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    encoder = mimaim.load_backbone(run)
    x = images()
    with torch.no_grad():
        ours = encoder.forward_intermediates(x, indices=encoder.depth, norm=False, output_fmt="NLC",
                                             intermediates_only=True)
        theirs = model.forward_intermediates(x, indices=6, norm=False, output_fmt="NLC", intermediates_only=True)
    assert len(theirs) == 6 == len(ours)
    torch.testing.assert_close(torch.stack(theirs).mean(0), torch.stack(ours).mean(0), **TOL)


def _hf_features(objective, overrides, out, encoder, x):
    if objective == "mae":
        model = transformers.ViTMAEModel.from_pretrained(out, mask_ratio=0.0).eval()
        noise = torch.arange(encoder.num_patches).float().expand(x.shape[0], -1)  # keeps the patch order
        return model(pixel_values=x, noise=noise).last_hidden_state
    if objective == "beit":
        # the config reads as BEiT's probe (use_mean_pooling false: AutoModel's BeitModel norms every token);
        # the MIM class, whose final norm sits outside its BeitModel, is opened with use_mean_pooling=True
        model = transformers.BeitForMaskedImageModeling.from_pretrained(out, use_mean_pooling=True).eval()
        return model.layernorm(model.beit(pixel_values=x).last_hidden_state)
    if overrides.get("model") == "swin_tiny":
        model = transformers.SwinForMaskedImageModeling.from_pretrained(out).eval()
        return model.swin(pixel_values=x).last_hidden_state
    if overrides.get("objective_options", {}).get("vit_flavour") == "plain":
        return transformers.ViTForMaskedImageModeling.from_pretrained(out).eval().vit(pixel_values=x).last_hidden_state
    model = transformers.AutoModel.from_pretrained(out).eval()
    assert type(model).__name__ == "BeitModel"
    return model(pixel_values=x).last_hidden_state


HF_CASES = {
    "mae": ("mae", {}),
    "beit": ("beit", PAPER),
    "beit-quick": ("beit", {}),
    "beit-abs-and-rel-pos": ("beit", {**PAPER, "objective_options": {"abs_pos_emb": True}}),
    "simmim-plain-vit": ("simmim", {"objective_options": {"vit_flavour": "plain"}}),
    "simmim-beit-vit": ("simmim", PAPER),
    "simmim-beit-vit-ape": ("simmim", {}),
    # a window that fits every stage (HF keeps the configured window where timm shrinks it)
    "simmim-swin": pytest.param("simmim", {"model": "swin_tiny", "img_size": 64,
                                           "objective_options": {"window_size": 2}},
                                marks=pytest.mark.slow),
}


@pytest.mark.parametrize("objective, overrides", list(HF_CASES.values()), ids=list(HF_CASES))
def test_hf_export_loads_with_from_pretrained_and_gives_the_same_features(tmp_path, objective, overrides):
    run, _ = make_run(tmp_path / "run", objective, **overrides)
    out = tmp_path / "hf"
    assert main(["export", str(run), "--to", "hf", "--out", str(out)]) == 0
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    encoder = mimaim.load_backbone(run)
    x = images(size=encoder.img_size)
    with torch.no_grad():
        torch.testing.assert_close(_hf_features(objective, overrides, out, encoder, x), encoder.forward_features(x),
                                   **TOL)


def test_hf_export_of_mae_keeps_the_decoder(tmp_path):
    run, obj = make_run(tmp_path / "run", "mae")
    main(["export", str(run), "--to", "hf", "--out", str(tmp_path / "hf")])
    hf = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(hf.decoder.decoder_pred.weight, obj.decoder_pred.weight, rtol=0, atol=0)


def test_beit_hf_export_needs_no_tokenizer_file(tmp_path):
    """A dalle run whose tokenizer file is gone still exports (the lm_head is in the checkpoint)."""
    from test_load_backbone import test_beit_with_a_dalle_tokenizer_loads_after_the_file_is_gone as make
    make(tmp_path)
    from mimaim.interop.hf_export import export_hf
    export_hf(tmp_path / "run", tmp_path / "hf")
    hf = transformers.BeitForMaskedImageModeling.from_pretrained(tmp_path / "hf")
    assert hf.lm_head.out_features == 8192


def test_aim_to_hf_names_the_gap(tmp_path, capsys):
    run, _ = make_run(tmp_path / "run", "aim")
    assert main(["export", str(run), "--to", "hf", "--out", str(tmp_path / "hf")]) == 2
    assert "no HuggingFace transformers model" in capsys.readouterr().err


@pytest.mark.slow  # swin_tiny: 28M parameters
def test_hf_export_of_a_swin_whose_window_shrinks_names_the_fix(tmp_path, capsys):
    run, _ = make_run(tmp_path / "run", "simmim", model="swin_tiny", img_size=64)  # window 4, last stage 2x2
    assert main(["export", str(run), "--to", "hf", "--out", str(tmp_path / "hf")]) == 2
    assert "window_size" in capsys.readouterr().err
