"""Fine-tuning: MAE's layer-wise lr decay, position-table resizing, a tiny end-to-end run."""

import json

import pytest
import torch

from mimaim.config import make_config
from mimaim.data import DataError
from mimaim.engine.trainer import pretrain
from mimaim.eval.finetune import (Classifier, FinetuneConfig, finetune, layer_id, param_groups_lrd,
                                  resize_pos_embed, resize_rel_pos_bias_table)
from mimaim.models import create_model
from mimaim.models.layers import sincos_2d


def tiny_vit(**kw):
    return create_model("vit_micro", img_size=16, patch_size=4, depth=2, **kw)


def test_layer_decay_scales_match_the_mae_recipe():
    # MAE lr_decay.py: id 0 = cls/pos/patch_embed, block i -> i+1, rest -> depth+1;
    # scale = decay ** (depth + 1 - id)
    model = Classifier(tiny_vit(), num_classes=3)
    depth, decay = 2, 0.5
    groups = param_groups_lrd(model, depth, 0.05, decay, model.no_weight_decay())
    scale_of = {n: g["lr_scale"] for g in groups for n in g["names"]}
    wd_of = {n: g["weight_decay"] for g in groups for n in g["names"]}
    expected = {"encoder.cls_token": 0.125, "encoder.patch_embed.proj.weight": 0.125,
                "encoder.patch_embed.proj.bias": 0.125,
                "encoder.blocks.0.attn.qkv.weight": 0.25, "encoder.blocks.0.norm1.bias": 0.25,
                "encoder.blocks.1.mlp.fc2.weight": 0.5, "fc_norm.weight": 1.0, "head.weight": 1.0, "head.bias": 1.0}
    for name, scale in expected.items():
        assert scale_of[name] == pytest.approx(scale), name
    # the frozen sin-cos table is not trained; the final norm is replaced by fc_norm (MAE global_pool)
    assert "encoder.pos_embed" not in scale_of and not any(n.startswith("encoder.norm.") for n in scale_of)
    # every trainable parameter is in exactly one group
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(scale_of) == trainable and sum(len(g["names"]) for g in groups) == len(trainable)
    # weight decay: none on 1-D parameters or the cls token; on matrices
    assert wd_of["encoder.cls_token"] == 0 and wd_of["head.bias"] == 0 and wd_of["fc_norm.weight"] == 0
    assert wd_of["head.weight"] == 0.05 and wd_of["encoder.blocks.1.mlp.fc2.weight"] == 0.05
    # a learned table and AIM's patch norm are embedding parameters too
    assert layer_id("encoder.pos_embed", 12) == 0 and layer_id("encoder.patch_norm.weight", 12) == 0
    assert layer_id("encoder.blocks.11.attn.proj.weight", 12) == 12
    assert layer_id("encoder.rel_pos_bias.relative_position_bias_table", 12) == 13


def test_head_init_and_pooling():
    model = Classifier(tiny_vit(), num_classes=4)
    assert model.head.weight.std().item() < 1e-4 and model.head.bias.abs().sum() == 0  # trunc normal std 2e-5
    x = torch.randn(2, 3, 16, 16)
    tokens = model.encoder.forward_tokens(model.encoder.embed(x), norm=False)
    expected = model.head(model.fc_norm(tokens[:, 1:].mean(1)))  # mean of patch tokens, cls left out
    torch.testing.assert_close(model(x), expected)


def test_resize_pos_embed_sincos_is_recomputed_and_learned_is_interpolated():
    D = 16
    table = sincos_2d(D, (4, 4), 1)[None]
    torch.testing.assert_close(resize_pos_embed(table, (4, 4), (6, 6), 1, "sincos"), sincos_2d(D, (6, 6), 1)[None])
    learned = torch.randn(1, 1 + 16, D)
    assert resize_pos_embed(learned, (4, 4), (4, 4), 1, "learned") is learned
    bigger = resize_pos_embed(learned, (4, 4), (8, 6), 1, "learned")
    assert bigger.shape == (1, 1 + 48, D)
    torch.testing.assert_close(bigger[:, :1], learned[:, :1])  # cls row kept
    const = torch.full((1, 16, D), 0.7)  # a constant table stays constant under bicubic resizing
    torch.testing.assert_close(resize_pos_embed(const, (4, 4), (6, 6), 0, "learned"), torch.full((1, 36, D), 0.7))
    # a table that is linear along the columns stays (nearly) linear: values sampled at the new centres
    ramp = torch.arange(4.0).repeat(4)[None, :, None].expand(1, 16, 1)  # column index
    up = resize_pos_embed(ramp, (4, 4), (4, 8), 0, "learned").reshape(4, 8)
    assert torch.all(up[:, 1:] >= up[:, :-1] - 1e-5)
    with pytest.raises(ValueError, match="does not match"):
        resize_pos_embed(learned, (5, 5), (6, 6), 1)


def test_resize_rel_pos_bias_table_shape_keeps_cls_rows():
    table = torch.randn((2 * 4 - 1) ** 2 + 3, 2)
    out = resize_rel_pos_bias_table(table, (4, 4), (6, 6))
    assert out.shape == ((2 * 6 - 1) ** 2 + 3, 2)
    torch.testing.assert_close(out[-3:], table[-3:])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One 2-step MAE run shared by the tests of this file (fine-tuning never writes into its weights)."""
    from conftest import make_image_folder

    root = tmp_path_factory.mktemp("finetune")
    images = make_image_folder(root / "images")
    cfg = make_config(model="vit_micro", img_size=16, patch_size=4, data=f"imagefolder:{images}",
                      batch_size=4, epochs=1, max_steps=2, out=str(root / "run"), progress=False)
    return pretrain(cfg)


def test_tiny_finetune_reports_top1_and_loads_the_weights(tiny_run):
    result = finetune(tiny_run, FinetuneConfig(epochs=1, batch_size=4, max_steps=2, progress=False))
    assert 0 <= result["top1"] <= 100 and result["steps"] == 2 and result["val_images"] == 2
    saved = json.loads((tiny_run / "finetune.json").read_text())
    assert saved["top1"] == result["top1"] and saved["config"]["layer_decay"] == 0.75


def test_finetune_encoder_starts_from_the_pretrained_weights(tiny_run):
    from mimaim.engine.runs import load_run
    from mimaim.eval.finetune import build_finetune_encoder

    cfg, objective, _ = load_run(tiny_run)
    enc = build_finetune_encoder(cfg, 16, 0.1, objective.encoder)
    for name, value in objective.encoder.state_dict().items():
        torch.testing.assert_close(enc.state_dict()[name], value)
    assert enc.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    bigger = build_finetune_encoder(cfg, 24, 0.0, objective.encoder)  # another resolution
    assert bigger.pos_embed.shape[1] == 1 + 36
    torch.testing.assert_close(bigger.blocks[0].attn.qkv.weight, objective.encoder.blocks[0].attn.qkv.weight)


def test_finetune_at_another_resolution(tiny_run):
    result = finetune(tiny_run, FinetuneConfig(epochs=1, batch_size=4, max_steps=1, img_size=24, mixup=0,
                                               cutmix=0, progress=False))
    assert result["img_size"] == 24 and (tiny_run / "finetune-24px.json").exists()


def test_finetune_refuses_unlabelled_data_before_training(tiny_run, tmp_path):
    from PIL import Image
    loose = tmp_path / "loose"
    loose.mkdir()
    for i in range(4):
        Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(loose / f"{i}.png")
    with pytest.raises(DataError, match="no labels"):
        finetune(tiny_run, FinetuneConfig(data=f"imagefolder:{loose}", epochs=1, batch_size=2, progress=False))
    from mimaim.config import ConfigError
    with pytest.raises(ConfigError, match="even batch"):
        FinetuneConfig(batch_size=3).validate()
