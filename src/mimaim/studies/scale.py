"""``mimaim scale``: one objective over a grid of model sizes and data fractions, for the AIM paper's scaling
claims (2401.08541, Sec. 5.1, Fig. 1 and 4). By default a fraction f trains ``round(epochs / f)`` epochs (the
full data's steps: fewer distinct images, not less compute); one fit ``L(N) = a * N^(-alpha) [+ c]`` per fraction.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import ConfigError, make_config
from ..models import list_models
from ..eval.probe_run import DEFAULT_PROBES
from ..objectives import get_objective_class
from .compare import (Cell, cell_steps, check_probe_data, estimate_seconds, final_loss, format_grid, markdown_table,
                      measure_flops, parse_list, parse_objective_spec, plot_online_probe, plt, print_estimate,
                      probe_cell, run_cell, save_plot, split_sizes, write_csv)


def fit_power_law(n: Sequence[float], loss: Sequence[float], offset: bool = False) -> dict:
    """Fit ``loss = a * n^(-alpha) (+ c)``; -> {a, alpha, c, r2, points} (r2 of log loss)."""
    n, loss = np.asarray(n, dtype=float), np.asarray(loss, dtype=float)
    ok = np.isfinite(n) & np.isfinite(loss) & (n > 0) & (loss > 0)
    n, loss = n[ok], loss[ok]
    if len(np.unique(n)) < 2:
        raise ValueError(f"a power law needs at least two model sizes, got {len(np.unique(n))}")
    slope, intercept = np.polyfit(np.log(n), np.log(loss), 1)
    a, alpha, c = float(np.exp(intercept)), float(-slope), 0.0
    if offset:
        if len(np.unique(n)) < 3:
            raise ValueError("a power law with an offset needs at least three model sizes")
        from scipy.optimize import curve_fit

        scale = n.min()

        def f(x, log_a, alpha_, c_):  # in units of the smallest model, for conditioning
            return np.exp(log_a) * (x / scale) ** (-alpha_) + c_
        p0 = (math.log(a * scale ** (-alpha)), max(alpha, 1e-3), 0.0)
        (log_a, alpha, c), _ = curve_fit(f, n, loss, p0=p0, bounds=([-np.inf, 0.0, 0.0], [np.inf, 10.0, loss.min()]),
                                         maxfev=20000)
        a = float(np.exp(log_a) * scale ** alpha)
        alpha, c = float(alpha), float(c)
    pred = a * n ** (-alpha) + c
    resid = np.log(loss) - np.log(pred)
    total = np.log(loss) - np.log(loss).mean()
    r2 = 1.0 - float((resid ** 2).sum() / max((total ** 2).sum(), 1e-12))
    return {"a": a, "alpha": alpha, "c": c, "r2": r2, "points": int(len(n))}


def parse_fractions(value: str | Sequence[float]) -> list[float]:
    items = parse_list(value) if isinstance(value, str) else list(value)
    fractions = []
    for item in items:
        try:
            f = float(item)
        except ValueError:
            raise ConfigError(f"--data-fractions: {item!r} is not a number; pass e.g. 0.1,0.3,1.0") from None
        if not 0 < f <= 1:
            raise ConfigError(f"--data-fractions: {item} is not in (0, 1]; a fraction is the share of the training "
                              "split to train on, e.g. 0.1,0.3,1.0")
        fractions.append(f)
    if not fractions:
        raise ConfigError("--data-fractions is empty; pass e.g. 0.1,0.3,1.0")
    return sorted(set(fractions))


def plan_scale(objective_spec: str, models: Sequence[str], fractions: Sequence[float], out: Path, base: dict,
               same_steps: bool) -> list[Cell]:
    objective, settings = parse_objective_spec(objective_spec)
    models = parse_list(models)
    if not models:
        raise ConfigError("--models is empty; pass e.g. vit_micro,vit_tiny,vit_small")
    for m in models:
        if m not in list_models():
            raise ConfigError(f"--models: unknown model {m!r}; choose from {', '.join(list_models())}")
    cells = []
    for model in models:
        for f in fractions:
            name = f"{model}-f{f:g}"
            cfg = make_config(base, **settings, objective=objective, model=model, data_fraction=f,
                              out=str(out / name))
            if same_steps and f < 1:
                cfg.epochs = max(1, round(cfg.epochs / f))
            cells.append(Cell(name, objective, settings.get("objective_options", {}), cfg))
    sizes, flops = {}, {}
    for cell in cells:
        f = cell.cfg.data_fraction
        if f not in sizes:
            sizes[f] = split_sizes(cell.cfg)
            check_probe_data(cell.cfg, *sizes[f])
        cell.train_images = sizes[f][0]
        cell.steps = cell_steps(cell)
        if cell.cfg.model not in flops:  # the data fraction does not change a step's FLOPs
            flops[cell.cfg.model] = measure_flops(cell)
        cell.flops_per_image = flops[cell.cfg.model]
    return cells


def scale(objective: str, models: str | Sequence[str], data_fractions: str | Sequence[float], out: str | Path,
          base: dict | None = None, probes: Sequence[str] | None = None, layers: Sequence[int] | None = None,
          same_steps: bool = True, offset: bool = False, dry_run: bool = False, device: str = "cpu",
          progress: bool = True) -> dict:
    """Run the grid; write OUT/scale_results.csv, OUT/scale_fit.csv and three PNGs. -> {rows, fits}."""
    out = Path(out)
    base = dict(base or {})
    base.setdefault("progress", progress)
    fractions = parse_fractions(data_fractions)
    probes = list(probes or [p for p in DEFAULT_PROBES if p != "attentive"])
    cells = plan_scale(objective, models, fractions, out, base, same_steps)
    val_images = split_sizes(cells[0].cfg)[1]
    print(f"mimaim scale: {objective} over models {', '.join(dict.fromkeys(c.cfg.model for c in cells))} x data "
          f"fractions {', '.join(f'{f:g}' for f in fractions)}; budget: "
          f"{'the same steps for every fraction' if same_steps else 'the same epochs'}; probes {', '.join(probes)}"
          f" -> {out}")
    print(format_grid(cells))
    if dry_run:
        est = estimate_seconds(cells, probes, val_images, random_init=False, finetune_epochs=0)
        return {"rows": print_estimate(est), "fits": []}

    out.mkdir(parents=True, exist_ok=True)
    for i, cell in enumerate(cells):
        print(f"[{i + 1}/{len(cells)}] {cell.name}: {run_cell(cell.cfg)}", file=sys.stderr, flush=True)
    rows = []
    for cell in cells:
        run_dir = Path(cell.cfg.out)
        probe_rows = probe_cell(run_dir, probes, layers, False, device, progress)
        summary = json.loads((run_dir / "summary.json").read_text())
        rows.append({"cell": cell.name, "model": cell.cfg.model, "parameters": summary["encoder_parameters"],
                     "data_fraction": cell.cfg.data_fraction, "train_images": cell.train_images,
                     "epochs": cell.cfg.epochs, "steps": summary["steps"],
                     "pretrain_loss": round(final_loss(run_dir), 5),
                     **{k: v for k, v in probe_rows[0].items() if k.endswith("_top1")},
                     "flops_per_image": cell.flops_per_image,
                     "train_flops": cell.flops_per_image * summary["steps"] * cell.cfg.batch_size,
                     "wall_time_s": summary.get("wall_time_s")})
    fits, floor = [], get_objective_class(cells[0].objective).loss_floor  # fitted: loss - floor (>= 0)
    for f in fractions:
        sel = [r for r in rows if r["data_fraction"] == f]
        try:
            fit = fit_power_law([r["parameters"] for r in sel], [r["pretrain_loss"] - floor for r in sel], offset)
        except ValueError as err:
            print(f"no power-law fit at data fraction {f:g}: {err}", file=sys.stderr)
            continue
        fits.append({"data_fraction": f, "loss_floor": floor, **fit})
        lhs = f"L - ({floor:g})" if floor else "L"
        print(f"power law at data fraction {f:g}: {lhs} = {fit['a']:.4g} * N^(-{fit['alpha']:.4f})"
              + (f" + {fit['c']:.4g}" if offset else "") + f"  (alpha = {fit['alpha']:.4f}, R^2 of log L "
              f"{fit['r2']:.3f}, {fit['points']} sizes)")
    write_csv(out / "scale_results.csv", rows)
    if fits:
        write_csv(out / "scale_fit.csv", fits)
    acc = f"{probes[0]}_top1"
    plot_loss_vs_params(out / "scale_loss_vs_params.png", rows, fits, objective, floor)
    plot_accuracy_vs_loss(out / "scale_accuracy_vs_loss.png", rows, acc, objective)
    plot_accuracy_vs_data(out / "scale_accuracy_vs_data.png", rows, acc, objective)
    if plot_online_probe(out / "online_probe.png", [(c.name, Path(c.cfg.out)) for c in cells]):
        print(f"wrote {out / 'online_probe.png'} (online probe vs training FLOPs)")
    columns = [("model", "model"), ("parameters", "parameters"), ("data_fraction", "data fraction"),
               ("train_images", "images"), ("epochs", "epochs"), ("pretrain_loss", "pre-training loss"),
               *[(f"{p}_top1", f"{p} top-1 (%)") for p in probes], ("train_flops", "training FLOPs")]
    print(markdown_table(rows, columns))
    print(f"wrote {out / 'scale_results.csv'}, {out / 'scale_fit.csv'} and the scale_*.png plots in {out}")
    return {"rows": rows, "fits": fits}


# --------------------------------------------------------------------------- plots
def plot_loss_vs_params(path: Path, rows: list[dict], fits: list[dict], objective: str, floor: float = 0.0) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
    for f in sorted({r["data_fraction"] for r in rows}):
        sel = sorted((r for r in rows if r["data_fraction"] == f), key=lambda r: r["parameters"])
        xs = [r["parameters"] for r in sel]
        points = ax.scatter(xs, [r["pretrain_loss"] - floor for r in sel], zorder=3)
        fit = next((x for x in fits if x["data_fraction"] == f), None)
        label = f"data {f:g}"
        if fit is not None:
            grid = np.geomspace(min(xs), max(xs), 50)
            ax.plot(grid, fit["a"] * grid ** (-fit["alpha"]) + fit["c"], color=points.get_facecolor()[0],
                    label=f"{label}: alpha = {fit['alpha']:.3f}")
        else:
            points.set_label(label)
    ax.set(xscale="log", yscale="log", xlabel="encoder parameters",
           ylabel="final pre-training loss" + (f" - ({floor:g})" if floor else ""),
           title=f"{objective}: loss vs model size (fit L = a N^-alpha)")
    save_plot(fig, ax, path)


def plot_accuracy_vs_loss(path: Path, rows: list[dict], acc: str, objective: str) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
    for f in sorted({r["data_fraction"] for r in rows}):
        sel = [r for r in rows if r["data_fraction"] == f]
        ax.scatter([r["pretrain_loss"] for r in sel], [r.get(acc, float("nan")) for r in sel], label=f"data {f:g}")
        for r in sel:
            ax.annotate(r["model"], (r["pretrain_loss"], r.get(acc, float("nan"))), fontsize=6)
    ax.set(xlabel="final pre-training loss", ylabel=f"{acc.replace('_top1', '')} probe top-1 (%)",
           title=f"{objective}: downstream accuracy vs pre-training loss")
    save_plot(fig, ax, path)


def plot_accuracy_vs_data(path: Path, rows: list[dict], acc: str, objective: str) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
    for model in dict.fromkeys(r["model"] for r in rows):
        sel = sorted((r for r in rows if r["model"] == model), key=lambda r: r["data_fraction"])
        ax.plot([r["data_fraction"] for r in sel], [r.get(acc, float("nan")) for r in sel], marker="o", label=model)
    ax.set(xscale="log", xlabel="fraction of the training split", ylabel=f"{acc.replace('_top1', '')} probe top-1 (%)",
           title=f"{objective}: accuracy vs data")
    save_plot(fig, ax, path)
