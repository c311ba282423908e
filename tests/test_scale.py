"""`mimaim scale`: the power-law fit, a tiny grid with its plots and CSVs, bad fractions."""

import csv

import numpy as np
import pytest

import mimaim.studies.compare as compare_mod
from mimaim.config import ConfigError
from mimaim.studies.scale import fit_power_law, parse_fractions, scale


@pytest.mark.parametrize("a, alpha", [(3.0, 0.076), (50.0, 0.5), (0.8, 1.3)])
def test_power_law_fit_recovers_known_exponents(a, alpha):
    n = np.geomspace(1e5, 1e9, 6)
    fit = fit_power_law(n, a * n ** -alpha)
    assert fit["alpha"] == pytest.approx(alpha, rel=1e-6) and fit["a"] == pytest.approx(a, rel=1e-6)
    assert fit["r2"] == pytest.approx(1.0)
    noisy = a * n ** -alpha * np.exp(np.random.default_rng(0).normal(0, 0.01, n.size))
    assert fit_power_law(n, noisy)["alpha"] == pytest.approx(alpha, abs=0.02)


def test_power_law_fit_with_offset_recovers_the_irreducible_term():
    n = np.geomspace(1e5, 1e9, 8)
    fit = fit_power_law(n, 40.0 * n ** -0.3 + 0.5, offset=True)
    assert fit["alpha"] == pytest.approx(0.3, rel=1e-3) and fit["c"] == pytest.approx(0.5, rel=1e-3)
    with pytest.raises(ValueError, match="two model sizes"):
        fit_power_law([1e6, 1e6], [1.0, 0.9])


@pytest.mark.parametrize("bad", ["0", "0.5,1.5", "-0.1", "abc", ""])
def test_bad_data_fraction_is_an_error_naming_the_value(bad):
    with pytest.raises(ConfigError, match="data-fractions"):
        parse_fractions(bad)
    assert parse_fractions("1.0,0.1,0.3") == [0.1, 0.3, 1.0]


@pytest.mark.slow  # several tiny pre-trainings + probes: ~10 s of CPU, 30 s on the shared machine
def test_tiny_scale_grid_writes_plots_and_csv(tmp_path, monkeypatch, capsys):
    from conftest import make_image_folder

    images = make_image_folder(tmp_path / "images", per_class=10)
    calls = []
    real = compare_mod.pretrain
    monkeypatch.setattr(compare_mod, "pretrain", lambda cfg, resume=False, init=None: calls.append(cfg.out) or
                        real(cfg, resume, init))
    base = dict(data=f"imagefolder:{images}", img_size=16, patch_size=4, batch_size=4, epochs=1, max_steps=2,
                log_every=1, progress=False)
    out = tmp_path / "scale"
    result = scale("mae", "vit_micro,vit_tiny", "1.0", out, base, probes=["knn"], progress=False)
    assert len(result["rows"]) == 2 and len(calls) == 2
    micro, tiny = result["rows"]
    assert tiny["parameters"] > micro["parameters"] and micro["train_images"] == 16
    for name in ("scale_results.csv", "scale_fit.csv", "scale_loss_vs_params.png", "scale_accuracy_vs_loss.png",
                 "scale_accuracy_vs_data.png"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "scale_fit.csv") as f:
        fits = list(csv.DictReader(f))
    assert len(fits) == 1 and float(fits[0]["points"]) == 2 and fits[0]["alpha"]
    assert "alpha =" in capsys.readouterr().out
    calls.clear()
    scale("mae", "vit_micro,vit_tiny", "1.0", out, base, probes=["knn"], progress=False)
    assert calls == []  # finished cells are skipped


def test_data_fractions_are_nested_class_balanced_subsets_with_the_same_steps(tmp_path):
    from conftest import make_image_folder
    from mimaim.data import build_source
    from mimaim.data import training_subset
    from mimaim.studies.scale import plan_scale

    images = make_image_folder(tmp_path / "images", per_class=10)
    base = dict(data=f"imagefolder:{images}", img_size=16, patch_size=4, batch_size=2, epochs=3, progress=False)
    cells = plan_scale("mae", ["vit_micro"], [0.25, 0.5, 1.0], tmp_path / "s", base, same_steps=True)
    assert [c.train_images for c in cells] == [4, 8, 16]  # 8 training images per class
    assert [c.cfg.epochs for c in cells] == [12, 6, 3] and len({c.steps for c in cells}) == 1
    train = build_source(base["data"], progress=False).split("train", 0.2)
    small, big = training_subset(train, 0.25, 0), training_subset(train, 0.5, 0)
    assert sorted(small.labels) == [0, 0, 1, 1]
    as_bytes = lambda s: {x.tobytes() if hasattr(x, "tobytes") else x for x in s.items}  # noqa: E731
    assert as_bytes(small) <= as_bytes(big)  # nested
    assert training_subset(train, 1.0, 0) is train


def test_scale_bad_input_stops_before_training(tmp_path, image_folder, monkeypatch):
    monkeypatch.setattr(compare_mod, "pretrain", lambda *a, **k: pytest.fail("trained"))
    base = dict(data=f"imagefolder:{image_folder}", img_size=16, patch_size=4, batch_size=4, progress=False)
    with pytest.raises(ConfigError, match="vit_nosuch"):
        scale("mae", "vit_micro,vit_nosuch", "1.0", tmp_path / "s", base)
    with pytest.raises(ConfigError, match="not in"):
        scale("mae", "vit_micro", "0.0,1.0", tmp_path / "s", base)
    with pytest.raises(ConfigError, match="nosuch"):
        scale("nosuch", "vit_micro", "1.0", tmp_path / "s", base)
