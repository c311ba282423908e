"""``trunk: shared`` (``mimaim compare``'s default): one ViT for every objective, positions from step 0, each
objective's needs checked in one place, the table naming the trunk (issue 17, item 1)."""

import csv
import json

import pytest
import torch

import mimaim
from mimaim.config import ConfigError, make_config
from mimaim.engine.build import SHARED_TRUNK, build_run_objective, check_objective
from mimaim.engine.runs import build_backbone, run_record
from mimaim.models import create_model
from mimaim.objectives import build_objective
from mimaim.studies import compare as compare_mod

from test_compare import PROBES, base_for, counted_pretrain, images  # noqa: F401  (fixtures)

OBJECTIVES = ("mae", "simmim", "beit", "aim")


def shuffled_tiles(x: torch.Tensor, patch: int, perm: torch.Tensor) -> torch.Tensor:
    """``x`` (B, C, H, W) with its patch x patch tiles moved to the raster positions ``perm`` names."""
    B, C, H, W = x.shape
    tiles = x.reshape(B, C, H // patch, patch, W // patch, patch).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C, patch,
                                                                                                   patch)
    tiles = tiles[:, perm].reshape(B, H // patch, W // patch, C, patch, patch)
    return tiles.permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


@torch.no_grad()
def test_shared_trunk_sees_positions_at_random_init():
    """Shuffling the patch tiles changes the pooled features of the random shared trunk (fixed sin-cos table);
    the same ViT without positions is blind to it (the control)."""
    g = torch.Generator().manual_seed(0)
    x, perm = torch.randn(4, 3, 32, 32, generator=g), torch.randperm(64, generator=g)
    changes = {}
    for name, kwargs in (("shared", SHARED_TRUNK), ("no positions", {**SHARED_TRUNK, "pos_embed": "none"})):
        torch.manual_seed(0)
        vit = create_model("vit_micro", img_size=32, patch_size=4, **kwargs).eval()
        a, b = (vit.forward_features(im).mean(1) for im in (x, shuffled_tiles(x, 4, perm)))
        changes[name] = float((a - b).norm() / a.norm())
    assert changes["shared"] > 1e-2, changes
    assert changes["no positions"] < 1e-5, changes


def test_every_objective_records_the_same_trunk_and_starts_from_the_random_init_row():
    records = {}
    for objective in OBJECTIVES:
        cfg = make_config(objective=objective, model="vit_micro", img_size=32, patch_size=4, trunk="shared")
        records[objective] = record = run_record(cfg)
        assert record["backbone"]["kwargs"] == dict(img_size=32, patch_size=4, **SHARED_TRUNK)
        fresh = build_backbone(record, seed=cfg.seed).state_dict()
        trained_from = build_run_objective(cfg).encoder.state_dict()  # AIM's and SimMIM's own re-inits undone
        assert fresh.keys() == trained_from.keys()
        assert all(torch.equal(fresh[k], trained_from[k]) for k in fresh), objective
    keys = {o: compare_mod.trunk_flavour(r)[0] for o, r in records.items()}
    assert keys["mae"] == keys["simmim"] == keys["beit"] != keys["aim"]  # one random row per protocol family
    assert all(r["backbone"] == records["mae"]["backbone"] for r in records.values())
    mae = records["mae"]["probe_protocol"]  # MAE's cls-token protocol reads the patch mean, and says why
    assert mae["pool"] == "mean" and mae["norm"] and "main_linprobe" in mae["source"] and "no cls token" in mae["source"]
    assert run_record(make_config(objective="mae"))["probe_protocol"]["pool"] == "cls"  # the paper trunk keeps it


def test_a_shared_trunk_run_reopens_unchanged(tmp_path):
    from tiny_runs import images as some_images, make_run

    run, obj = make_run(tmp_path / "run", "mae", trunk="shared")
    encoder = mimaim.load_backbone(run)
    assert encoder.cls_token is None
    with torch.no_grad():
        torch.testing.assert_close(encoder(some_images()), obj.encoder(some_images()), rtol=0, atol=0)


@torch.no_grad()
def test_mae_decoder_puts_each_visible_token_back_without_a_cls_token():
    """Two orders of the same kept patches give the same predictions: no visible token is taken for a cls."""
    torch.manual_seed(0)
    mae = build_objective("mae", "vit_micro", 16, 4, {"decoder_embed_dim": 32, "decoder_depth": 1,
                                                        "decoder_num_heads": 2}, **SHARED_TRUNK).eval()
    x = torch.randn(2, 3, 16, 16)
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(0))
    kept = noise.argsort(dim=1)[:, :4]  # mask ratio 0.75 of 16 patches: 4 kept
    other = noise.clone()
    other.scatter_(1, kept, noise.gather(1, kept.flip(1)))  # the same kept set, encoded in reverse order
    a, b = mae(x, noise), mae(x, other)
    torch.testing.assert_close(a.mask, b.mask)
    torch.testing.assert_close(a.pred, b.pred, rtol=1e-5, atol=1e-5)


def test_a_trunk_an_objective_cannot_use_is_refused(images, tmp_path, counted_pretrain):  # noqa: F811
    with pytest.raises(ValueError, match="'aim' cannot use a trunk with class_token=True: it needs False"):
        build_objective("aim", "vit_micro", 16, 4, **{**SHARED_TRUNK, "class_token": True})
    with pytest.raises(ConfigError, match="swin_tiny is a swin backbone.*--trunk paper"):
        check_objective(make_config(objective="simmim", model="swin_tiny", trunk="shared"))
    with pytest.raises(ConfigError, match="rel_pos_bias.*--trunk paper"):
        check_objective(make_config(objective="beit", trunk="shared", objective_options={"rel_pos_bias": True}))
    check_objective(make_config(objective="beit", trunk="shared", objective_options={"mask_ratio": 0.3}))
    with pytest.raises(ConfigError, match="swin"):  # compare's default trunk: before anything trains
        compare_mod.compare("simmim", tmp_path / "c", base_for(images, model="swin_tiny"), probes=PROBES)
    assert counted_pretrain == []
    check_objective(make_config(objective="simmim", model="swin_tiny", trunk="paper"))  # a paper flavour


def test_the_plan_names_the_trunk(images, tmp_path, capsys):  # noqa: F811
    from mimaim.cli import main

    args = ["compare", "--objectives", "mae", "--data", f"imagefolder:{images}", "--model", "vit_micro", "--img-size",
            "16", "--patch-size", "4", "--batch-size", "4", "--epochs", "1", "--out", str(tmp_path / "c"), "--dry-run"]
    assert main(args) == 0
    assert "trunk: shared ViT (vit_micro, no cls token, pos sincos, qkv bias all, init xavier)" in capsys.readouterr().out
    assert main(args + ["--trunk", "paper"]) == 0
    assert "trunk: each paper's own" in capsys.readouterr().out


@pytest.mark.slow  # four tiny pre-trainings + probes
def test_compare_on_the_shared_trunk(images, tmp_path):  # noqa: F811
    out = tmp_path / "cmp"
    rows = compare_mod.compare("mae,simmim,beit@objective.min_block_patches=4,aim", out, base_for(images),
                               probes=PROBES, progress=False)
    cells = ["mae", "simmim", "beit-min_block_patches4", "aim"]
    by_cell = {r["cell"]: r for r in rows}
    # one random-init row per protocol family, on the one trunk every cell trains
    assert list(by_cell) == cells + ["random-init-mae", "random-init-aim"]
    assert by_cell["random-init-mae"]["random_init_of"] == "mae,simmim,beit-min_block_patches4"
    assert by_cell["random-init-aim"]["random_init_of"] == "aim"
    assert by_cell["mae"]["probe_protocol"] == by_cell["beit-min_block_patches4"]["probe_protocol"] != \
        by_cell["aim"]["probe_protocol"]
    backbones = [json.loads(next((out / c / "checkpoints").iterdir()).joinpath("run.json").read_text())["backbone"]
                 for c in cells]
    assert all(b == backbones[0] for b in backbones) and backbones[0]["kwargs"]["class_token"] is False
    trunk = "Trunk: shared ViT (vit_micro, no cls token, pos sincos, qkv bias all, init xavier) for every cell"
    assert trunk in (out / "results.md").read_text()
    with open(out / "results.csv") as f:
        assert {r["trunk"] for r in csv.DictReader(f)} == {"shared"}


def test_mimaim_probe_reads_a_shared_trunk_run_with_its_recorded_protocol(tmp_path, capsys):
    """MAE's cls-token protocol on a trunk without cls token: `mimaim probe` reads the patch mean the run recorded."""
    from conftest import make_image_folder
    from mimaim.cli import main
    from mimaim.engine.trainer import pretrain

    folder = make_image_folder(tmp_path / "images", per_class=10)
    cfg = make_config(objective="mae", trunk="shared", data=f"imagefolder:{folder}", img_size=16, patch_size=4,
                      batch_size=4, epochs=1, max_steps=1, progress=False, out=str(tmp_path / "run"),
                      objective_options={"decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2})
    pretrain(cfg)
    assert main(["probe", str(tmp_path / "run"), "--probes", "knn", "--no-progress"]) == 0
    rows = json.loads((tmp_path / "run" / "probe.json").read_text())
    assert {r["pool"] for r in rows} == {"mean"} and "overridden" not in rows[0]["protocol_source"]
