"""`mimaim compare`: a tiny two-cell comparison, resume/skip, dry run, bad input stops before training."""

import json
import shutil

import pytest

import mimaim.studies.compare as compare_mod
from mimaim.config import ConfigError
from mimaim.studies.compare import VARIANTS, compare, parse_objective_spec

PROBES = ["linear", "knn"]


def base_for(images, **kw):
    return {**dict(data=f"imagefolder:{images}", model="vit_micro", img_size=16, patch_size=4, batch_size=4,
                   epochs=1, max_steps=2, log_every=1, progress=False), **kw}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from conftest import make_image_folder
    return make_image_folder(tmp_path_factory.mktemp("compare") / "images")


@pytest.fixture
def counted_pretrain(monkeypatch):
    calls = []
    real = compare_mod.pretrain

    def wrapped(cfg, resume=False):
        calls.append((cfg.out, resume))
        return real(cfg, resume=resume)
    monkeypatch.setattr(compare_mod, "pretrain", wrapped)
    return calls


@pytest.mark.slow  # several tiny pre-trainings + probes: ~10 s of CPU, 30 s on the shared machine
def test_tiny_compare_writes_table_plots_and_resumes_without_retraining(images, tmp_path, counted_pretrain, capsys):
    out = tmp_path / "cmp"
    specs = "mae,mae@mask_ratio=0.5"
    rows = compare(specs, out, base_for(images), probes=PROBES, progress=False)
    assert [r["cell"] for r in rows] == ["mae", "mae-mask_ratio0.5", "random-init"]
    assert len(counted_pretrain) == 2 and not any(resume for _, resume in counted_pretrain)
    for name in ("results.csv", "results.md", "loss_curves.png", "probe_accuracy.png"):
        assert (out / name).stat().st_size > 0, name
    table = (out / "results.md").read_text()
    assert "linear top-1 (%)" in table and "knn top-1 (%)" in table and "random init" in table
    for r in rows:
        assert 0 <= r["linear_top1"] <= 100 and 0 <= r["knn_top1"] <= 100
    assert rows[0]["train_flops"] == pytest.approx(rows[0]["flops_per_image"] * 2 * 4)
    # the 50% cell's encoder sees twice the tokens of the 75% one: more FLOPs per image
    assert rows[1]["flops_per_image"] > rows[0]["flops_per_image"] > 0
    for cell in ("mae", "mae-mask_ratio0.5"):  # each cell is an ordinary run directory
        assert (out / cell / "summary.json").exists() and (out / cell / "config.yaml").exists()

    # interrupt cell 2 after its checkpoint: no summary -> it resumes; cell 1 is left untouched
    finished = {p: p.stat().st_mtime_ns for p in (out / "mae").rglob("*") if p.is_file()}
    (out / "mae-mask_ratio0.5" / "summary.json").unlink()
    counted_pretrain.clear()
    rows2 = compare(specs, out, base_for(images), probes=PROBES, progress=False)
    assert counted_pretrain == [(str(out / "mae-mask_ratio0.5"), True)]
    assert {p: p.stat().st_mtime_ns for p in (out / "mae").rglob("*") if p.is_file()} == finished
    assert rows2[0]["linear_top1"] == rows[0]["linear_top1"]

    # everything finished: nothing trains
    counted_pretrain.clear()
    compare(specs, out, base_for(images), probes=PROBES, progress=False)
    assert counted_pretrain == []

    # a different recipe in the same folder is refused, naming the field
    with pytest.raises(ConfigError, match="epochs"):
        compare(specs, out, base_for(images, epochs=2), probes=PROBES, progress=False)


def test_dry_run_prints_flops_and_estimate_and_trains_nothing(images, tmp_path, counted_pretrain, capsys):
    est = compare("mae", tmp_path / "dry", base_for(images), probes=PROBES, dry_run=True, progress=False)
    printed = capsys.readouterr().out
    assert "FLOPs/image" in printed and "estimated wall time" in printed and "s/step" in printed
    assert est[0]["step_s"] > 0 and counted_pretrain == [] and not (tmp_path / "dry").exists()


def test_flops_budget_gives_each_cell_whole_epochs(images, tmp_path, counted_pretrain):
    cells = compare_mod.plan_cells(["mae", "mae@mask_ratio=0.5"], tmp_path, base_for(images), budget_flops=1e10)
    per_epoch = [c.flops_per_image * 2 * 4 for c in cells]  # 10 training images, batch 4: 2 steps per epoch
    assert [c.cfg.epochs for c in cells] == [round(1e10 / p) for p in per_epoch]
    assert cells[0].cfg.epochs > cells[1].cfg.epochs  # the cheaper objective gets more epochs
    with pytest.raises(ConfigError, match="budget-flops"):
        compare_mod.plan_cells(["mae"], tmp_path, base_for(images), budget_flops=1e3)


@pytest.mark.parametrize("specs, message", [
    ("mae,nosuch", "unknown objective 'nosuch'"),
    ("mae@no_such_option=1", "no_such_option"),
    ("mae,mae", "twice"),
])
def test_bad_objectives_stop_before_training(images, tmp_path, counted_pretrain, specs, message):
    with pytest.raises(ConfigError, match=message):
        compare(specs, tmp_path / "bad", base_for(images), probes=PROBES, progress=False)
    assert counted_pretrain == []


def test_bad_model_data_and_budget_stop_before_training(images, tmp_path, counted_pretrain):
    from PIL import Image
    with pytest.raises((ConfigError, ValueError), match="vit_nosuch"):
        compare("mae", tmp_path / "bad", base_for(images, model="vit_nosuch"), probes=PROBES)
    loose = tmp_path / "loose"
    loose.mkdir()
    for i in range(6):
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(loose / f"{i}.png")
    with pytest.raises(ConfigError, match="no labels"):
        compare("mae", tmp_path / "bad", base_for(loose), probes=PROBES)
    with pytest.raises(ConfigError, match="batch-size"):
        compare("mae", tmp_path / "bad", base_for(images, batch_size=64), probes=PROBES)
    with pytest.raises(ConfigError, match="probes"):
        compare("mae", tmp_path / "bad", base_for(images), probes=["nosuch"])
    assert counted_pretrain == []


def test_variants_map_to_aim_options_or_fail_clearly():
    from mimaim.objectives import list_objectives
    if "aim" not in list_objectives():
        with pytest.raises(ConfigError, match="unknown objective 'aim'"):
            parse_objective_spec("aim-causal")
        return
    for name, (objective, options) in VARIANTS.items():
        assert parse_objective_spec(name) == (objective, options)
    assert parse_objective_spec("aim@attention=causal") == ("aim", {"attention": "causal"})
    with pytest.raises(ConfigError, match="attention"):
        parse_objective_spec("aim@attention=sideways")


def test_cli_compare_dry_run(images, tmp_path, capsys):
    from mimaim.cli import main
    rc = main(["compare", "--objectives", "mae", "--data", f"imagefolder:{images}", "--model", "vit_micro",
               "--img-size", "16", "--patch-size", "4", "--batch-size", "4", "--epochs", "1", "--probes", "knn",
               "--out", str(tmp_path / "c"), "--dry-run", "--no-progress"])
    assert rc == 0 and "FLOPs/image" in capsys.readouterr().out
    rc = main(["compare", "--objectives", "nosuch", "--data", f"imagefolder:{images}", "--out", str(tmp_path / "c")])
    assert rc == 2 and "nosuch" in capsys.readouterr().err
