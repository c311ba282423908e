"""`mimaim compare`: same budget per cell, protocol per cell, random-init row per trunk flavour, resume/skip, dry run, bad input."""

import json

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

    def wrapped(cfg, resume=False, init=None):
        calls.append((cfg.out, resume))
        return real(cfg, resume=resume, init=init)
    monkeypatch.setattr(compare_mod, "pretrain", wrapped)
    return calls


@pytest.mark.slow  # three tiny pre-trainings + probes: ~15 s of CPU, ~40 s on the shared machine
def test_tiny_compare_same_budget_protocol_per_cell_random_row_per_flavour_and_resume(images, tmp_path,
                                                                                       counted_pretrain):
    from mimaim.engine.runs import build_backbone, open_backbone
    from mimaim.eval.probe_run import describe_protocol, labelled_splits, probe_encoder, resolve_protocol

    out = tmp_path / "cmp"
    specs = "mae,mae@objective.mask_ratio=0.5,aim"
    rows = compare(specs, out, base_for(images), probes=PROBES, progress=False, trunk="paper")
    by_cell = {r["cell"]: r for r in rows}
    # one random-init row per trunk flavour: MAE's ViT (shared by both MAE cells) and AIM's trunk
    assert list(by_cell) == ["mae", "mae-mask_ratio0.5", "aim", "random-init-mae", "random-init-aim"]
    assert by_cell["random-init-mae"]["random_init_of"] == "mae,mae-mask_ratio0.5"
    assert by_cell["random-init-aim"]["random_init_of"] == "aim"
    assert len(counted_pretrain) == 3 and not any(resume for _, resume in counted_pretrain)

    # the same budget for every cell: same epochs, steps and batch; the configs differ only in objective and out
    configs = {c: (out / c / "config.yaml").read_text() for c in ("mae", "mae-mask_ratio0.5", "aim")}
    for c in configs:
        summary = json.loads((out / c / "summary.json").read_text())
        assert summary["steps"] == by_cell[c]["steps"] == 2 and by_cell[c]["epochs"] == 1
    import yaml
    loaded = {c: yaml.safe_load(t) for c, t in configs.items()}
    differing = {k for k in loaded["mae"] if len({json.dumps(v.get(k), sort_keys=True) for v in loaded.values()}) > 1}
    assert differing <= {"objective", "objective_options", "out"}, differing
    assert rows[0]["train_flops"] == pytest.approx(rows[0]["flops_per_image"] * 2 * 4)
    assert rows[1]["flops_per_image"] > rows[0]["flops_per_image"] > 0  # mask 50% encodes more tokens than 75%

    # each cell (and its random row) is read with its own objective's protocol, and results.md says which
    mae_p, aim_p = describe_protocol(resolve_protocol("mae")), describe_protocol(resolve_protocol("aim"))
    assert by_cell["mae"]["probe_protocol"] == by_cell["random-init-mae"]["probe_protocol"] == mae_p
    assert by_cell["aim"]["probe_protocol"] == by_cell["random-init-aim"]["probe_protocol"] == aim_p
    assert mae_p != aim_p
    table = (out / "results.md").read_text()
    assert mae_p in table and aim_p in table and "main_linprobe" in table and "AverageLayers" in table
    md_rows = {line.split(" | ")[1]: line for line in table.splitlines() if line.startswith("| random init")}
    assert set(md_rows) == {"random-init-mae", "random-init-aim"}

    # the random rows' numbers are the probe of the cell's architecture at init, under the cell's protocol
    backbone, record, _ = open_backbone(out / "aim")
    train, val, classes = labelled_splits(record["config"]["data"], record["config"]["val_fraction"])
    proto = resolve_protocol("aim")
    fresh = probe_encoder(build_backbone(record, seed=record["config"]["seed"]), train, val, classes, 16, ["knn"],
                          list(proto.layers), proto.pool, norm=proto.norm)
    trained = probe_encoder(backbone, train, val, classes, 16, ["knn"], list(proto.layers), proto.pool,
                            norm=proto.norm)
    assert by_cell["random-init-aim"]["knn_top1"] == round(fresh["knn"], 2)
    assert by_cell["aim"]["knn_top1"] == round(trained["knn"], 2)
    for r in rows:
        assert f"{r['knn_top1']:.4g}" in table or f"{r['knn_top1']:g}" in table

    # interrupt cell 2 after its checkpoint: no summary -> it resumes; cell 1 is left untouched
    finished = {p: p.stat().st_mtime_ns for p in (out / "mae").rglob("*") if p.is_file()}
    (out / "mae-mask_ratio0.5" / "summary.json").unlink()
    counted_pretrain.clear()
    rows2 = compare(specs, out, base_for(images), probes=PROBES, progress=False, trunk="paper")
    assert counted_pretrain == [(str(out / "mae-mask_ratio0.5"), True)]
    assert {p: p.stat().st_mtime_ns for p in (out / "mae").rglob("*") if p.is_file()} == finished
    assert rows2[0]["linear_top1"] == rows[0]["linear_top1"]

    # everything finished: nothing trains
    counted_pretrain.clear()
    compare(specs, out, base_for(images), probes=PROBES, progress=False, trunk="paper")
    assert counted_pretrain == []

    # a different recipe in the same folder is refused, naming the field
    with pytest.raises(ConfigError, match="epochs"):
        compare(specs, out, base_for(images, epochs=2), probes=PROBES, progress=False, trunk="paper")


def test_trunk_flavours_group_cells_by_architecture():
    """MAE and MAE@0.5 share a trunk; BEiT and SimMIM share the BEiT-style ViT (drop path aside); AIM has its own."""
    import mimaim.engine.runs as runs
    from mimaim.config import make_config

    records = {}
    for spec in ("mae", "mae@objective.mask_ratio=0.5", "beit", "simmim", "aim"):
        objective, settings = compare_mod.parse_objective_spec(spec)
        records[spec] = runs.run_record(make_config(settings, objective=objective, model="vit_micro", img_size=16,
                                                    patch_size=4, recipe="paper"))
    keys = {spec: compare_mod.trunk_flavour(records[spec])[0] for spec in records}
    assert keys["mae"] == keys["mae@objective.mask_ratio=0.5"]
    assert keys["beit"] == keys["simmim"]
    assert len({keys["mae"], keys["beit"], keys["aim"]}) == 3
    assert "no cls token" in compare_mod.trunk_flavour(records["aim"])[1]
    assert "rel. bias" in compare_mod.trunk_flavour(records["beit"])[1]


def test_dry_run_prints_flops_and_estimate_and_trains_nothing(images, tmp_path, counted_pretrain, capsys):
    est = compare("mae", tmp_path / "dry", base_for(images), probes=PROBES, dry_run=True, progress=False)
    printed = capsys.readouterr().out
    assert "FLOPs/image" in printed and "estimated wall time" in printed and "s/step" in printed
    assert est[0]["step_s"] > 0 and counted_pretrain == [] and not (tmp_path / "dry").exists()


def test_flops_budget_gives_each_cell_whole_epochs(images, tmp_path, counted_pretrain):
    cells = compare_mod.plan_cells(["mae", "mae@objective.mask_ratio=0.5"], tmp_path, base_for(images), budget_flops=1e10)
    per_epoch = [c.flops_per_image * 2 * 4 for c in cells]  # 10 training images, batch 4: 2 steps per epoch
    assert [c.cfg.epochs for c in cells] == [round(1e10 / p) for p in per_epoch]
    assert cells[0].cfg.epochs > cells[1].cfg.epochs  # the cheaper objective gets more epochs
    with pytest.raises(ConfigError, match="budget-flops"):
        compare_mod.plan_cells(["mae"], tmp_path, base_for(images), budget_flops=1e3)


@pytest.mark.parametrize("specs, message", [
    ("mae,nosuch", "objective: unknown value 'nosuch'"),
    ("mae@objective.no_such_option=1", "no_such_option"),
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
        with pytest.raises(ConfigError, match="unknown value 'aim'"):
            parse_objective_spec("aim-causal")
        return
    for name, (objective, options) in VARIANTS.items():
        assert parse_objective_spec(name) == (objective, {"objective_options": options})
    assert parse_objective_spec("aim@objective.attention=causal") == ("aim", {"objective_options": {"attention": "causal"}})
    assert parse_objective_spec("aim@epochs=3") == ("aim", {"epochs": "3"})  # any setting of one cell
    with pytest.raises(ConfigError, match="attention"):
        parse_objective_spec("aim@objective.attention=sideways")
    with pytest.raises(ConfigError, match="unknown config key 'attention'.*objective.KEY"):
        parse_objective_spec("aim@attention=causal")


def test_cli_compare_dry_run(images, tmp_path, capsys):
    from mimaim.cli import main
    rc = main(["compare", "--objectives", "mae", "--data", f"imagefolder:{images}", "--model", "vit_micro",
               "--img-size", "16", "--patch-size", "4", "--batch-size", "4", "--epochs", "1", "--probes", "knn",
               "--out", str(tmp_path / "c"), "--dry-run", "--no-progress"])
    assert rc == 0 and "FLOPs/image" in capsys.readouterr().out
    rc = main(["compare", "--objectives", "nosuch", "--data", f"imagefolder:{images}", "--out", str(tmp_path / "c")])
    assert rc == 2 and "nosuch" in capsys.readouterr().err
