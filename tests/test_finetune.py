"""Fine-tuning: layer-wise decay as the official recipes, table handling, recipes, and that it learns."""

import json

import pytest
import torch

from mimaim.config import ConfigError, make_config
from mimaim.data import DataError
from mimaim.eval.finetune import (Classifier, build_finetune_encoder, expand_shared_rel_pos_bias, finetune, layer_id,
                                  param_groups_lrd, resize_pos_embed, resize_rel_pos_bias_table)
from mimaim.eval.recipes import RECIPES, FinetuneConfig
from mimaim.models import create_model
from mimaim.models.layers import sincos_2d

torch.set_num_threads(1)


def tiny_vit(**kw):
    return create_model("vit_micro", img_size=16, patch_size=4, depth=2, **kw)


def groups_by_name(model, decay=0.5):
    groups = param_groups_lrd(model, 0.05, decay)
    return ({n: g["lr_scale"] for g in groups for n in g["names"]},
            {n: g["weight_decay"] for g in groups for n in g["names"]}, groups)


def test_layer_decay_scales_match_the_mae_recipe():
    # MAE lr_decay.py: id 0 = cls/pos/patch_embed, block i -> i+1, rest -> depth+1;
    # scale = decay ** (depth + 1 - id); models_vit.py trains the position table
    encoder = build_finetune_encoder({"backbone": {"name": "vit_micro", "kwargs": dict(
        img_size=16, patch_size=4, depth=2)}}, 16, 0.0, None)
    model = Classifier(encoder, num_classes=3)
    scale_of, wd_of, groups = groups_by_name(model)
    expected = {"encoder.cls_token": 0.125, "encoder.pos_embed": 0.125, "encoder.patch_embed.proj.weight": 0.125,
                "encoder.patch_embed.proj.bias": 0.125,
                "encoder.blocks.0.attn.qkv.weight": 0.25, "encoder.blocks.0.norm1.bias": 0.25,
                "encoder.blocks.1.mlp.fc2.weight": 0.5, "fc_norm.weight": 1.0, "head.weight": 1.0, "head.bias": 1.0}
    for name, scale in expected.items():
        assert scale_of[name] == pytest.approx(scale), name
    assert not any(n.startswith("encoder.norm.") for n in scale_of)  # replaced by fc_norm (MAE global_pool)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(scale_of) == trainable and sum(len(g["names"]) for g in groups) == len(trainable)
    # no weight decay on 1-D parameters, the cls token or the (trainable) position table; decay on matrices
    assert wd_of["encoder.cls_token"] == wd_of["encoder.pos_embed"] == wd_of["head.bias"] == 0
    assert wd_of["fc_norm.weight"] == 0
    assert wd_of["head.weight"] == 0.05 and wd_of["encoder.blocks.1.mlp.fc2.weight"] == 0.05
    # AIM's patch norm belongs to the embedding
    assert layer_id("encoder.patch_norm.weight", 12) == 0 and layer_id("encoder.blocks.11.attn.proj.weight", 12) == 12


def test_beit_finetune_has_one_decayed_relative_bias_table_per_block():
    # BEiT run_class_finetuning.py / SimMIM utils.py: the shared table copied to
    # blocks.i.attn.relative_position_bias_table; optim_factory: layer id i + 1, weight decay
    # (BEiT's --disable_weight_decay_on_rel_pos_bias is off by default; SimMIM's ViT skips only pos/cls)
    kwargs = dict(img_size=16, patch_size=4, depth=2, class_token=True, pos_embed="none", qkv_bias="qv",
                  rel_pos_bias=True, init_values=0.1, weight_init="trunc_normal")
    torch.manual_seed(0)
    pretrained = create_model("vit_micro", **kwargs).eval()
    with torch.no_grad():
        pretrained.rel_pos_bias.relative_position_bias_table.normal_()
    record = {"backbone": {"name": "vit_micro", "kwargs": kwargs}}
    enc = build_finetune_encoder(record, 16, 0.1, pretrained)
    assert enc.rel_pos_bias is None and enc.rel_pos_bias_mode == "per_block"
    for blk in enc.blocks:
        torch.testing.assert_close(blk.attn.relative_position_bias_table,
                                   pretrained.rel_pos_bias.relative_position_bias_table)
    scale_of, wd_of, _ = groups_by_name(Classifier(enc, 3))
    assert scale_of["encoder.blocks.0.attn.relative_position_bias_table"] == pytest.approx(0.25)  # id 1
    assert scale_of["encoder.blocks.1.attn.relative_position_bias_table"] == pytest.approx(0.5)  # id 2
    assert wd_of["encoder.blocks.0.attn.relative_position_bias_table"] == 0.05
    # the same function without copies: the fine-tuning model equals the pre-trained one (drop path off)
    enc0 = build_finetune_encoder(record, 16, 0.0, pretrained).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(enc0(x), pretrained(x))
    # at another resolution each copy is resized the BEiT way (timm's resize_rel_pos_bias_table)
    bigger = build_finetune_encoder(record, 24, 0.0, pretrained)
    assert bigger.blocks[1].attn.relative_position_bias_table.shape == ((2 * 6 - 1) ** 2 + 3, 4)
    assert "rel_pos_bias.relative_position_bias_table" not in expand_shared_rel_pos_bias(
        pretrained.state_dict(), 2)


def test_swin_layer_ids_follow_simmim():
    # SimMIM get_swin_layer over all blocks; timm's patch merging opens stage s (SimMIM's closes s - 1)
    depths = (2, 2, 6, 2)
    assert layer_id("encoder.patch_embed.proj.weight", 12, depths) == 0
    assert layer_id("encoder.layers.0.blocks.1.mlp.fc1.weight", 12, depths) == 2
    assert layer_id("encoder.layers.1.downsample.reduction.weight", 12, depths) == 2
    assert layer_id("encoder.layers.2.blocks.0.attn.qkv.weight", 12, depths) == 5
    assert layer_id("encoder.layers.3.blocks.1.norm2.bias", 12, depths) == 12
    assert layer_id("head.weight", 12, depths) == 13
    swin = create_model("swin_tiny", img_size=32, patch_size=4, window_size=4, embed_dim=12, depths=(1, 1, 2, 1),
                        num_heads=(1, 2, 2, 4))
    model = Classifier(swin, 3)
    scale_of, wd_of, _ = groups_by_name(model, decay=0.5)
    assert model.fc_norm.normalized_shape == (96,)  # the last stage's width
    assert scale_of["encoder.layers.3.blocks.0.mlp.fc2.weight"] == pytest.approx(0.5)
    assert scale_of["encoder.patch_embed.proj.weight"] == pytest.approx(0.5 ** 6)
    assert wd_of["encoder.layers.0.blocks.0.attn.relative_position_bias_table"] == 0  # Swin's own skip list
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_head_init_and_pooling():
    model = Classifier(tiny_vit(), num_classes=4)
    assert model.head.weight.std().item() < 1e-4 and model.head.bias.abs().sum() == 0  # trunc normal std 2e-5
    x = torch.randn(2, 3, 16, 16)
    tokens = model.encoder.forward_features(x)  # (B, 1 + N, D); the final norm is dropped (an Identity)
    expected = model.head(model.fc_norm(tokens[:, 1:].mean(1)))  # mean of patch tokens, cls left out
    torch.testing.assert_close(model(x), expected)


def test_resize_pos_embed_sincos_is_recomputed_and_learned_is_timms():
    from timm.layers import resample_abs_pos_embed

    D = 16
    table = sincos_2d(D, (4, 4), 1)[None]
    torch.testing.assert_close(resize_pos_embed(table, (4, 4), (6, 6), 1, "sincos"), sincos_2d(D, (6, 6), 1)[None])
    learned = torch.randn(1, 1 + 16, D)
    assert resize_pos_embed(learned, (4, 4), (4, 4), 1, "learned") is learned
    bigger = resize_pos_embed(learned, (4, 4), (8, 6), 1, "learned")
    torch.testing.assert_close(bigger, resample_abs_pos_embed(learned, [8, 6], [4, 4], num_prefix_tokens=1))
    torch.testing.assert_close(bigger[:, :1], learned[:, :1])  # cls row kept
    const = torch.full((1, 16, D), 0.7)  # a constant table stays constant
    torch.testing.assert_close(resize_pos_embed(const, (4, 4), (6, 6), 0, "learned"), torch.full((1, 36, D), 0.7))
    with pytest.raises(ValueError, match="does not match"):
        resize_pos_embed(learned, (5, 5), (6, 6), 1)


def test_resize_rel_pos_bias_table_keeps_cls_rows_and_constants():
    table = torch.randn((2 * 4 - 1) ** 2 + 3, 2)
    out = resize_rel_pos_bias_table(table, (4, 4), (6, 6))
    assert out.shape == ((2 * 6 - 1) ** 2 + 3, 2)
    torch.testing.assert_close(out[-3:], table[-3:])
    const = torch.full_like(table, 0.3)
    torch.testing.assert_close(resize_rel_pos_bias_table(const, (4, 4), (6, 6)), torch.full_like(out, 0.3))
    assert resize_rel_pos_bias_table(table, (4, 4), (4, 4)) is table


def test_recipes_and_explicit_values():
    quick, paper = FinetuneConfig(), FinetuneConfig(recipe="paper")
    assert quick.recipe == "quick" and quick.mixup == 0 and quick.auto_augment == "none"
    assert (paper.mixup, paper.cutmix, paper.smoothing, paper.reprob) == (0.8, 1.0, 0.1, 0.25)
    assert paper.auto_augment == "rand-m9-mstd0.5-inc1" and paper.crop_scale == (0.08, 1.0) and paper.hflip
    assert (paper.epochs, paper.batch_size, paper.blr, paper.warmup_epochs) == (100, 1024, 5e-4, 5.0)
    assert FinetuneConfig(recipe="paper", mixup=0.0).mixup == 0.0  # an explicit value wins
    assert set(RECIPES["quick"]) == set(RECIPES["paper"])
    with pytest.raises(ConfigError, match="recipe 'imagenet' is unknown"):
        FinetuneConfig(recipe="imagenet")
    with pytest.raises(ConfigError, match="even batch"):
        FinetuneConfig(batch_size=3, mixup=0.8).validate()


def test_finetune_imports_neither_the_trainer_nor_an_objective():
    import subprocess
    import sys

    code = ("import sys, mimaim.eval.finetune; "
            "print([m for m in sys.modules if m.endswith('.trainer') or m.startswith('mimaim.objectives.')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One 2-step MAE run shared by the tests of this file (fine-tuning never writes into its weights)."""
    from conftest import make_image_folder
    from mimaim.engine.trainer import pretrain

    root = tmp_path_factory.mktemp("finetune")
    images = make_image_folder(root / "images")
    cfg = make_config(model="vit_micro", img_size=16, patch_size=4, data=f"imagefolder:{images}",
                      batch_size=4, epochs=1, max_steps=2, out=str(root / "run"), progress=False)
    return pretrain(cfg)


def test_tiny_finetune_loads_the_weights_and_writes_its_result(tiny_run):
    from mimaim.engine.runs import open_backbone

    result = finetune(tiny_run, FinetuneConfig(epochs=1, batch_size=4, max_steps=2, progress=False))
    assert result["steps"] == 2 and result["val_images"] == 2 and result["recipe"] == "quick"
    saved = json.loads((tiny_run / "finetune.json").read_text())
    assert saved["top1"] == result["top1"] and saved["config"]["layer_decay"] == RECIPES["quick"]["layer_decay"]
    backbone, record, _ = open_backbone(tiny_run)
    enc = build_finetune_encoder(record, 16, 0.1, backbone)
    for name, value in backbone.state_dict().items():
        torch.testing.assert_close(enc.state_dict()[name], value)
    assert enc.pos_embed.requires_grad and enc.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    bigger = build_finetune_encoder(record, 24, 0.0, backbone)  # another resolution: sin-cos recomputed
    torch.testing.assert_close(bigger.pos_embed.detach(), sincos_2d(128, (6, 6), 1)[None])


def test_finetune_at_another_resolution(tiny_run):
    result = finetune(tiny_run, FinetuneConfig(epochs=1, batch_size=4, max_steps=1, img_size=24, progress=False))
    assert result["img_size"] == 24 and json.loads((tiny_run / "finetune-24px.json").read_text()) == \
        json.loads(json.dumps(result))


def test_one_result_name_for_finetune_and_compare(tmp_path):
    """compare finds a saved fine-tune under the name finetune wrote it, the run's own size included."""
    from mimaim.eval.finetune import result_path

    names = [result_path(tmp_path, FinetuneConfig(**kw), 32).name
             for kw in ({}, {"img_size": 32}, {"img_size": 24}, {"init": "random"}, {"img_size": 48, "init": "random"})]
    assert names == ["finetune.json", "finetune.json", "finetune-24px.json", "finetune-random.json",
                     "finetune-48px-random.json"]


def test_finetune_refuses_unlabelled_data_before_training(tiny_run, tmp_path):
    from PIL import Image
    loose = tmp_path / "loose"
    loose.mkdir()
    for i in range(4):
        Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(loose / f"{i}.png")
    with pytest.raises(DataError, match="no labels"):
        finetune(tiny_run, FinetuneConfig(data=f"imagefolder:{loose}", epochs=1, batch_size=2, progress=False))


@pytest.mark.slow
def test_finetuning_a_pretrained_encoder_beats_its_linear_probe(tmp_path):
    """The default (quick) recipe must learn: on digits, fine-tuning an MAE encoder beats a
    converged logistic-regression probe of the same frozen encoder (its probe protocol: cls
    token after the final norm) by a clear margin. With MAE's ImageNet recipe, or without
    the BatchNorm head, this stays near chance at this step count (see the module docstring)."""
    from sklearn.linear_model import LogisticRegression

    from mimaim.data import eval_transform
    from mimaim.engine.runs import open_backbone
    from mimaim.engine.trainer import pretrain
    from mimaim.eval.finetune import LabelledDataset
    from mimaim.eval.probe_run import labelled_splits

    torch.set_num_threads(2)
    cfg = make_config(model="vit_micro", img_size=16, patch_size=4, data="digits", batch_size=64, epochs=2,
                      out=str(tmp_path / "run"), progress=False, num_workers=0)
    run = pretrain(cfg)
    backbone, record, _ = open_backbone(run)
    train, val, _ = labelled_splits("digits", record["config"]["val_fraction"])

    def features(source):
        loader = torch.utils.data.DataLoader(LabelledDataset(source, eval_transform(16)), batch_size=512)
        with torch.no_grad():
            pairs = [(backbone.forward_features(x)[:, 0], y) for x, y in loader]
        return torch.cat([p[0] for p in pairs]).numpy(), torch.cat([p[1] for p in pairs]).numpy()

    (xtr, ytr), (xva, yva) = features(train), features(val)
    probe = 100 * LogisticRegression(max_iter=3000).fit(xtr, ytr).score(xva, yva)
    result = finetune(run, FinetuneConfig(epochs=4, progress=False))
    assert result["top1"] > probe + 5, (result["top1"], probe)
    assert result["top1"] > 60  # chance is 10%
