"""Online probes (``--online-probe linear,knn``, engine/online_probe.py): logged columns, the training untouched
(bitwise the same losses and weights with and without), off without labels, the interval's FLOPs budget, the one
read-out shared with ``mimaim probe``; slow: the final online linear figure within 1.5 points of the offline one."""

import csv

import pytest
import torch
from safetensors.torch import load_file

from mimaim.config import ConfigError, make_config
from mimaim.engine.build import check_objective
from mimaim.engine.checkpoint import latest_checkpoint
from mimaim.engine.feature_probes import knn_top1
from mimaim.engine.logging import MetricsLogger, read_metrics
from mimaim.engine.online_probe import OVERHEAD, OnlineProbe, default_every, probe_flops
from mimaim.engine.trainer import pretrain
from mimaim.objectives import list_objectives

TINY = dict(model="vit_micro", img_size=16, patch_size=4, batch_size=4, epochs=2, warmup_epochs=1,
            objective_options={"decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2},
            num_workers=0, progress=False, log_every=2, val_fraction=0.25)


def run(tmp_path, image_folder, name, **kw):
    cfg = make_config({**TINY, "data": f"imagefolder:{image_folder}", "out": str(tmp_path / name), **kw})
    return pretrain(cfg)


def test_probe_columns_logged_and_training_bitwise_unchanged(tmp_path, image_folder, one_torch_thread):
    """Probed every 3 steps (an extra log row at step 3) and at the last; the same per-step losses and final weights
    as a run without the probe (it never draws from the training RNG and puts the train mode back)."""
    on = run(tmp_path, image_folder, "on", epochs=3, online_probe=("linear", "knn"), online_probe_every=3)
    off = run(tmp_path, image_folder, "off", epochs=3, log_every=1)
    rows_on, rows_off = read_metrics(on), read_metrics(off)
    assert [int(r["step"]) for r in rows_on] == [2, 3, 4, 6]  # 10 train images, batch 4: 2 steps x 3 epochs
    assert [int(r["step"]) for r in rows_on if r["online_linear"]] == [3, 6]
    assert all(0 <= float(r[k]) <= 100 for r in rows_on if r["online_linear"] for k in ("online_linear", "online_knn"))
    flops = [float(r["flops"]) for r in rows_on]
    assert flops[0] > 0 and flops == pytest.approx([flops[0] / 2 * int(r["step"]) for r in rows_on], rel=1e-5)  # %.6g
    per_step = run(tmp_path, image_folder, "on1", epochs=3, log_every=1, online_probe=("linear", "knn"),
                   online_probe_every=1)
    assert [r["loss"] for r in read_metrics(per_step)] == [r["loss"] for r in rows_off]
    a, b = (load_file(str(latest_checkpoint(d) / "model.safetensors")) for d in (on, off))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_probe_off_without_labels_says_so(tmp_path, capfd, one_torch_thread):
    from conftest import make_image_folder

    flat = make_image_folder(tmp_path / "flat", classes=("only",), per_class=8)
    out = run(tmp_path, flat / "only", "flat", online_probe=("linear",), max_steps=2)
    err = capfd.readouterr().err
    assert "online probe off" in err and "has no labels" in err
    assert "online_linear" not in read_metrics(out)[0]


def test_unknown_online_probe_is_refused():
    with pytest.raises(ConfigError, match="online_probe: unknown probe.*choose from linear, knn"):
        make_config({"online_probe": "linear,attentive"})


@pytest.mark.parametrize("objective", list_objectives())
def test_default_interval_keeps_the_probe_within_its_flops_share(objective):
    """(slice images x read-out FLOPs) / (interval x batch x training FLOPs) <= 3%, and one step fewer would not."""
    cfg = make_config({"objective": objective})
    train_flops, read_flops = probe_flops(cfg, check_objective(cfg)[2])
    assert train_flops > read_flops > 0
    images = 1797  # digits: every image is in the train or the held-out slice
    every = default_every(images, read_flops, cfg.batch_size, train_flops)
    share = images * read_flops / (cfg.batch_size * train_flops)
    assert share / every <= OVERHEAD < share / (every - 1)


def test_metrics_header_widens_for_a_later_column(tmp_path):
    log = MetricsLogger(tmp_path)
    log.log(1, {"loss": 1.0})
    log.log(2, {"loss": 0.5, "online_linear": 50.0, "flops": 10.0})
    log.log(3, {"loss": 0.25})
    log.close()
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.reader(f))
    assert rows == [["step", "loss", "online_linear", "flops"], ["1", "1", "", ""], ["2", "0.5", "50", "10"],
                    ["3", "0.25", "", ""]]


def test_one_read_out_and_one_knn_for_online_and_offline():
    import mimaim.eval.features as features
    import mimaim.eval.probes as probes
    import mimaim.models.readout as readout

    assert features.encode is readout.encode and features.pool_tokens is readout.pool_tokens
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 8, generator=g), torch.randint(0, 3, (40,), generator=g)
    offline = probes.knn_probe({"pooled": x[:30], "labels": y[:30]}, {"pooled": x[30:], "labels": y[30:]}, 3)
    assert offline == knn_top1(x[:30], y[:30], x[30:], y[30:], 3)


def test_aim_is_read_bidirectionally_as_offline(tmp_path, one_torch_thread):
    """The online read-out of AIM's live trunk equals ``mimaim probe``'s features of its checkpoint (AIM's protocol:
    last 6 blocks averaged, no final norm, no causal mask); the logged k-NN is the k-NN of those features."""
    from types import SimpleNamespace

    from mimaim.data import build_source
    from mimaim.engine.runs import open_backbone
    from mimaim.eval.features import extract_features

    cfg = make_config({"objective": "aim", "max_steps": 1, "batch_size": 8, "num_workers": 0, "progress": False,
                       "out": str(tmp_path / "aim"), "online_probe": "knn", "online_probe_images": 16})
    out = pretrain(cfg)
    backbone = open_backbone(out)[0]
    live = SimpleNamespace(source=build_source("digits"), objective=SimpleNamespace(encoder=backbone), model=backbone)
    probe = OnlineProbe(cfg, live, torch.device("cpu"), 1, say=lambda m: None)
    feats = {name: extract_features(backbone, probe.splits[name], cfg.img_size, layers=(-6, -5, -4, -3, -2, -1),
                                    pool="mean", norm=False) for name in ("train", "val")}
    online, labels = probe.features("val")
    torch.testing.assert_close(online, feats["val"]["pooled"], rtol=1e-5, atol=1e-5)
    assert torch.equal(labels, feats["val"]["labels"])
    backbone.train()
    probe.features("val")
    assert all(m.training for m in backbone.modules())  # the probe reads in eval mode and puts train mode back
    knn = knn_top1(feats["train"]["pooled"], feats["train"]["labels"], feats["val"]["pooled"], feats["val"]["labels"],
                   10)
    assert float(read_metrics(out)[-1]["online_knn"]) == pytest.approx(knn, abs=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("objective", list_objectives())
def test_final_online_linear_is_within_1_5_points_of_mimaim_probe(tmp_path, objective):
    """A short digits run (the default run's settings, 1 epoch): online linear and k-NN at the end vs
    ``mimaim probe``."""
    from mimaim.eval.probe_run import probe_run

    cfg = make_config({"objective": objective, "epochs": 1, "progress": False, "out": str(tmp_path / objective),
                       "online_probe": "linear,knn"})
    out = pretrain(cfg)
    online = read_metrics(out)[-1]
    offline = probe_run(out, probes=("linear", "knn"), random_init=False, progress=False)[0]
    assert abs(float(online["online_linear"]) - offline["linear_top1"]) <= 1.5, (online, offline)
    assert abs(float(online["online_knn"]) - offline["knn_top1"]) <= 1.5, (online, offline)


def test_studies_plot_online_accuracy_against_flops_only_when_logged(tmp_path):
    from mimaim.studies.compare import plot_online_probe

    for name, online in (("probed", True), ("plain", False)):
        (tmp_path / name).mkdir()
        log = MetricsLogger(tmp_path / name)
        for step in (10, 20):
            log.log(step, {"loss": 1.0 / step, **({"flops": 1e9 * step, "online_linear": 40.0 + step,
                                                    "online_knn": 30.0 + step} if online and step == 20 else {})})
        log.close()
    assert not plot_online_probe(tmp_path / "none.png", [("plain", tmp_path / "plain")])
    assert not (tmp_path / "none.png").exists()
    assert plot_online_probe(tmp_path / "online.png", [("plain", tmp_path / "plain"), ("probed", tmp_path / "probed")])
    assert (tmp_path / "online.png").stat().st_size > 1000
