"""``mimaim compare``: every objective on the same trunk, data, augmentation and budget (epochs or training
FLOPs), the question of the AIM paper (2401.08541, Sec. 5, Table 5): does autoregressive pre-training probe
better than masked image modelling? Each cell is an ordinary run directory ``OUT/<cell>/`` (finished cells
skipped, half-finished ones resumed), probed with its objective's protocol; docs/guide.md ("Compare").
"""

from __future__ import annotations

import csv
import json
import math
import re
import sys
import time
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import matplotlib
import torch
from torch.utils.flop_counter import FlopCounterMode

from ..config import ENGINE_ONLY, ConfigError, PretrainConfig, load_yaml, make_config, parse_overrides, typed
from ..data import build_source, training_subset
from ..data import steps_per_epoch as count_steps
from ..engine import runs
from ..engine.build import build_run_objective, check_objective
from ..engine.checkpoint import latest_checkpoint
from ..engine.logging import read_metrics
from ..engine.optim import build_optimizer
from ..engine.trainer import pretrain
from ..eval.finetune import finetune, result_path
from ..eval.probe_run import DEFAULT_PROBES, probe_run
from ..eval.probes import get_probe
from ..eval.recipes import FinetuneConfig
from ..interop.init import initializer
from . import SAME_CROP_SCALE, VARIANTS

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the headless backend is chosen)


@dataclass
class Cell:
    name: str  # the run directory's name
    objective: str
    options: dict
    cfg: PretrainConfig
    flops_per_image: float = float("nan")
    steps: int = 0
    train_images: int = 0


# --------------------------------------------------------------------------- parsing
def parse_objective_spec(spec: str) -> tuple[str, dict]:
    """``mae`` | a ``VARIANTS`` name | ``objective@key=value@...`` (the keys of ``--set``) -> (objective,
    settings of the cell), checked: the objective's options over its recipe's, and every other key."""
    objective, *pairs = spec.strip().split("@")
    settings = parse_overrides(pairs, f"--objectives {spec!r}:")
    if spec in VARIANTS:
        objective, settings = VARIANTS[spec][0], {"objective_options": dict(VARIANTS[spec][1])}
    try:
        check_objective(make_config(settings, objective=objective))
    except ValueError as err:
        hint = (f" The variant {spec!r} maps to {objective} with {settings}; check `mimaim list` for the options "
                "this objective accepts." if spec in VARIANTS else "")
        raise ConfigError(f"--objectives {spec!r}: {err}.{hint}") from None
    return objective, settings


def cell_name(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", spec.replace("objective.", "").replace("=", "")).strip("-")


def parse_list(value: str | Sequence[str]) -> list[str]:
    items = value.split(",") if isinstance(value, str) else list(value)
    return [x.strip() for x in items if x.strip()]


# --------------------------------------------------------------------------- measuring
def count_training_flops(cfg: PretrainConfig, batch: int = 2) -> float:
    """FLOPs of one training step per image: forward + backward of the whole objective, counted by
    ``FlopCounterMode`` on random images with the objective's own masking (no optimiser, no data loading)."""
    objective = build_run_objective(cfg).train()
    g = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():  # one untimed full batch first: objectives with lazy state (BEiT's k-means) set it up
        full = min(cfg.batch_size, 256)
        objective(torch.randn(full, 3, cfg.img_size, cfg.img_size, generator=g), objective.draw_masking(full, g))
    images = torch.randn(batch, 3, cfg.img_size, cfg.img_size, generator=g)
    masking = objective.draw_masking(batch, g)
    with FlopCounterMode(display=False) as counter:
        objective(images, masking).loss.backward()
    return counter.get_total_flops() / batch


def time_training_steps(cfg: PretrainConfig, steps: int = 2) -> float:
    """Seconds per optimiser step on random images (one warm-up step first); no data loading."""
    objective = build_run_objective(cfg).train()
    opt = build_optimizer(objective, 1e-4, cfg.weight_decay, cfg.betas)
    g = torch.Generator().manual_seed(cfg.seed)
    images = torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size, generator=g)
    times = []
    for _ in range(steps + 1):
        masking = objective.draw_masking(cfg.batch_size, g)
        t = time.perf_counter()
        objective(images, masking).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return sum(times[1:]) / steps


@torch.no_grad()
def time_feature_extraction(cfg: PretrainConfig, batch: int = 64) -> float:
    """Seconds per image of the frozen-encoder forward the probes run (the backbone alone, as probes build it)."""
    encoder = runs.build_backbone(runs.run_record(cfg), seed=cfg.seed).eval()
    images = torch.randn(batch, 3, cfg.img_size, cfg.img_size)
    encoder.forward_features(images[:2])
    t = time.perf_counter()
    encoder.forward_features(images)
    return (time.perf_counter() - t) / batch


# --------------------------------------------------------------------------- cells
def split_sizes(cfg: PretrainConfig) -> tuple[int, int, bool]:
    """(training images after data_fraction, held-out images, labelled?) from a scan (no decoding)."""
    source = build_source(cfg.data, cache="off", progress=False)
    train = training_subset(source.split("train", cfg.val_fraction), cfg.data_fraction, cfg.seed)
    return len(train), len(source.split("val", cfg.val_fraction)), source.has_labels


def check_probe_data(cfg: PretrainConfig, train_images: int, val_images: int, labelled: bool) -> None:
    """Stop before any training when the cells could not be trained or probed."""
    if not labelled:
        raise ConfigError(f"--data {cfg.data!r} has no labels, so the cells cannot be probed; pass a labelled "
                          "folder (imagefolder:PATH/<class>/<image>) or shards with an integer `cls`")
    if val_images == 0:
        raise ConfigError(f"the held-out split of {cfg.data!r} is empty at val_fraction {cfg.val_fraction}; "
                          "raise --val-fraction or add images")
    if cfg.batch_size > train_images:
        raise ConfigError(f"--batch-size {cfg.batch_size} is larger than the {train_images} training images of "
                          f"{cfg.data!r} (data fraction {cfg.data_fraction}); lower --batch-size")


def check_cell_config(run_dir: Path, cfg: PretrainConfig) -> None:
    """A cell already on disk must have been made by the same recipe (else results would mix)."""
    path = run_dir / "config.yaml"
    if not path.exists():
        return
    saved = make_config(load_yaml(path)).to_dict()
    wanted = cfg.to_dict()
    diff = {k: (saved.get(k), v) for k, v in wanted.items() if k not in ENGINE_ONLY and saved.get(k) != v}
    if diff:
        detail = "; ".join(f"{k}: on disk {a!r}, asked {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ConfigError(f"{run_dir} was started with a different recipe ({detail}); use a new --out, or delete "
                          f"{run_dir} to train it again")


def run_cell(cfg: PretrainConfig) -> str:
    """Train one cell unless finished: -> 'finished' (skipped) | 'resumed' | 'trained'."""
    run_dir = Path(cfg.out)
    check_cell_config(run_dir, cfg)
    if (run_dir / "summary.json").exists():
        return "finished"
    resume = latest_checkpoint(run_dir) is not None
    pretrain(cfg, resume=resume, init=initializer(cfg.init))
    return "resumed" if resume else "trained"


def final_loss(run_dir: Path) -> float:
    """Mean training loss over the last 10% of logged steps (``metrics.csv``): less noisy than one window."""
    rows = [float(r["loss"]) for r in read_metrics(run_dir) if r.get("loss")]
    tail = rows[-max(1, len(rows) // 10):]
    return sum(tail) / len(tail) if tail else float("nan")


def probe_cell(run_dir: Path, probes: Sequence[str], layers: Sequence[int] | None, random_init: bool,
               device: str, progress: bool, pool: str = "auto") -> list[dict]:
    """``probe_run`` on a cell (its objective's protocol unless ``pool`` / ``layers`` override it), memoised in
    ``compare_probe.json`` against its checkpoint and settings."""
    memo = run_dir / "compare_probe.json"
    key = {"checkpoint": latest_checkpoint(run_dir).name, "probes": list(probes),
           "layers": list(layers) if layers else None, "pool": pool, "random_init": random_init, "format": 3}
    if memo.exists():
        saved = json.loads(memo.read_text())
        if saved.get("key") == key:
            return saved["rows"]
    rows = probe_run(run_dir, probes=probes, layers=layers, pool=pool, random_init=random_init, device=device,
                     progress=progress)
    memo.write_text(json.dumps({"key": key, "rows": rows}, indent=2))
    return rows


#: backbone arguments that change training only, not the architecture read at evaluation
_NOT_ARCHITECTURE = {"drop_path_rate", "drop_rate", "attn_drop_rate"}


def trunk_flavour(record: dict) -> tuple[str, str]:
    """(key, words) of a run record's trunk (backbone name and architecture arguments) and probe protocol: cells
    with the same key share one random-init row (on the paper trunks MAE and MAE@mask_ratio=0.5 do, MAE and AIM
    do not; on the shared trunk, one row per protocol family: AIM's last-six-block mean apart)."""
    backbone, protocol = record["backbone"], {k: v for k, v in record["probe_protocol"].items() if k != "source"}
    kwargs = {k: v for k, v in backbone["kwargs"].items() if k not in _NOT_ARCHITECTURE}
    key = json.dumps({"name": backbone["name"], "kwargs": kwargs, "protocol": protocol}, sort_keys=True, default=str)
    traits = [backbone["name"], "cls token" if kwargs.get("class_token", True) else "no cls token"]
    for k, words in (("pos_embed", "pos"), ("qkv_bias", "qkv bias"), ("rel_pos_bias", "rel. bias"),
                     ("init_values", "layer scale"), ("patch_norm", "patch norm"), ("weight_init", "init")):
        if kwargs.get(k) not in (None, False):
            traits.append(f"{words} {kwargs[k]}")
    return key, ", ".join(traits)


def finetune_cell(run_dir: Path, fcfg, img_size: int) -> dict:
    """``finetune`` on a cell (pre-trained at ``img_size``) unless its result for the same settings is on disk."""
    path = result_path(run_dir, fcfg, img_size)
    wanted = {k: v for k, v in dataclasses.asdict(fcfg).items() if k not in ("progress", "device")}
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("config") == json.loads(json.dumps(wanted)):
            return saved
    return finetune(run_dir, fcfg)


# --------------------------------------------------------------------------- planning
def plan_cells(specs: Sequence[str], out: Path, base: dict, budget_flops: float | None) -> list[Cell]:
    """Parse, validate and size every cell before anything trains."""
    specs = parse_list(specs)
    if not specs:
        raise ConfigError("--objectives is empty; pass e.g. --objectives mae,aim")
    if len(set(specs)) != len(specs):
        raise ConfigError(f"--objectives lists a name twice: {', '.join(specs)}")
    cells = []
    for spec in specs:
        objective, settings = parse_objective_spec(spec)
        name = cell_name(spec)
        cfg = make_config(base, **settings, objective=objective, out=str(out / name))
        check_objective(cfg)  # a trunk the objective cannot use stops here
        cells.append(Cell(name, objective, settings.get("objective_options", {}), cfg))
    train_images, val_images, labelled = split_sizes(cells[0].cfg)
    check_probe_data(cells[0].cfg, train_images, val_images, labelled)
    for cell in cells:
        cfg = cell.cfg
        cell.train_images = train_images
        cell.flops_per_image = measure_flops(cell, required=bool(budget_flops))
        if budget_flops:
            per_epoch = cell.flops_per_image * count_steps(train_images, cfg.batch_size, cfg.accum_steps) * \
                cfg.batch_size
            cfg.epochs = round(budget_flops / per_epoch)
            if cfg.epochs < 1:
                raise ConfigError(f"--budget-flops {budget_flops:.3g} is less than half an epoch of {cell.name} "
                                  f"({per_epoch:.3g} FLOPs per epoch); raise it to at least {per_epoch:.3g}")
        cell.steps = cell_steps(cell)
        if cell.steps < 1:
            raise ConfigError(f"cell {cell.name} would train for 0 steps; raise --epochs or --max-steps")
    return cells


def measure_flops(cell: Cell, required: bool = False) -> float:
    """``count_training_flops`` of a cell; NaN with a warning when it fails, unless the FLOPs set the budget."""
    try:
        return count_training_flops(cell.cfg)
    except Exception as err:  # noqa: BLE001 - FLOPs are a column, unless they set the budget
        if required:
            raise
        print(f"warning: could not count FLOPs of {cell.name}: {err}", file=sys.stderr)
        return float("nan")


def cell_steps(cell: Cell) -> int:
    """Optimiser steps of a cell: its epochs over its training images, capped by ``max_steps``."""
    cfg = cell.cfg
    steps = count_steps(cell.train_images, cfg.batch_size, cfg.accum_steps) * cfg.epochs
    return steps if cfg.max_steps is None else min(steps, cfg.max_steps)


def format_grid(cells: Sequence[Cell]) -> str:
    lines = ["| cell | objective | options | model | epochs | steps | batch | FLOPs/image | training FLOPs |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        total = c.flops_per_image * c.steps * c.cfg.batch_size
        lines.append(f"| {c.name} | {c.objective} | {c.options or '-'} | {c.cfg.model} | {c.cfg.epochs} | "
                     f"{c.steps} | {c.cfg.batch_size} | {c.flops_per_image:.3g} | {total:.3g} |")
    return "\n".join(lines)


def estimate_seconds(cells: Sequence[Cell], probes: Sequence[str], val_images: int, random_init: bool,
                     finetune_epochs: int) -> list[dict]:
    """Per cell: seconds per step and the estimated wall time, from a short measurement."""
    out, seen = [], set()  # one random-init row per trunk
    for c in cells:
        step_s = time_training_steps(c.cfg)
        per_image = time_feature_extraction(c.cfg)
        key = trunk_flavour(runs.run_record(c.cfg))[0]
        first = random_init and key not in seen
        seen.add(key)
        passes = 2 if first else 1  # the random-init row reads (and fine-tunes) the trunk once more
        probe_s = per_image * (c.train_images + val_images) * passes
        # fine-tuning runs the whole trunk forward and backward: about 3 forward passes per image
        ft_s = 3 * per_image * c.train_images * finetune_epochs * passes
        pre_s = step_s * c.steps
        out.append({"cell": c.name, "step_s": step_s, "pretrain_s": pre_s, "probe_s": probe_s, "finetune_s": ft_s,
                    "total_s": pre_s + probe_s + ft_s})
    return out


# --------------------------------------------------------------------------- the harness
def compare(objectives: str | Sequence[str], out: str | Path, base: dict | None = None,
            budget_flops: float | None = None, same_augmentation: bool = True,
            crop_scale: tuple[float, float] = SAME_CROP_SCALE, probes: Sequence[str] | None = None,
            layers: Sequence[int] | None = None, pool: str = "auto", random_init: bool = True,
            finetune_epochs: int = 0, finetune_options: dict | None = None, dry_run: bool = False,
            device: str = "cpu", progress: bool = True, trunk: str = "shared") -> list[dict]:
    """Pre-train, probe (and fine-tune) every objective; write OUT/results.{csv,md} and PNGs.

    ``base`` holds ``PretrainConfig`` fields shared by every cell (data, model, epochs, ...; its ``trunk`` wins);
    ``trunk``: "shared" (one ViT for every objective) or "paper" (each objective's own flavour);
    ``finetune_options``: ``FinetuneConfig`` fields of the fine-tune column. Returns the table's rows
    (an estimate per cell with ``dry_run``).
    """
    out, base = Path(out), {"progress": progress, "trunk": trunk, **(base or {})}
    if same_augmentation:
        base["augmentation"] = {"crop_scale": list(crop_scale), "color_jitter": 0.0, "hflip": True,
                                "interpolation": "bicubic"}
    if budget_flops is not None and budget_flops <= 0:
        raise ConfigError(f"--budget-flops must be positive, got {budget_flops}")
    probes = list(probes or DEFAULT_PROBES)
    for p in probes:
        try:
            get_probe(p)
        except ValueError as err:
            raise ConfigError(f"--probes: {err}") from None
    ft = FinetuneConfig(**typed(FinetuneConfig, {**(finetune_options or {}), "epochs": finetune_epochs,
                                                 "device": device, "progress": progress}, "finetune.")).validate() \
        if finetune_epochs else None

    cells = plan_cells(objectives, out, base, budget_flops)
    _, val_images, _ = split_sizes(cells[0].cfg)
    cfg = cells[0].cfg
    budget = f"{budget_flops:.3g} training FLOPs per cell" if budget_flops else f"{cfg.epochs} epochs"
    aug = f"same for all: crop scale {tuple(crop_scale)} + flip" if same_augmentation else \
        "each objective's paper recipe"
    print(f"mimaim compare: {len(cells)} cells on {cfg.model}/{cfg.patch_size} at {cfg.img_size}px, data {cfg.data} "
          f"({cells[0].train_images} training / {val_images} held-out images), budget {budget}, augmentation {aug}, "
          f"probes {', '.join(probes)}{f', fine-tune {finetune_epochs} epochs' if ft else ''} -> {out}\n"
          f"trunk: {describe_trunk(cells)}")
    print(format_grid(cells))
    if dry_run:
        return print_estimate(estimate_seconds(cells, probes, val_images, random_init, finetune_epochs), bool(ft))
    out.mkdir(parents=True, exist_ok=True)
    for i, cell in enumerate(cells):
        status = run_cell(cell.cfg)
        print(f"[{i + 1}/{len(cells)}] {cell.name}: {status}", file=sys.stderr, flush=True)
    rows = result_rows(cells, probes, layers, pool, random_init, device, progress, ft)
    write_results(out, rows, cells, budget, aug, val_images)
    return rows


def describe_trunk(cells: Sequence[Cell]) -> str:
    """The trunk every cell trains, in words, for the plan and results.md."""
    kinds = {c.cfg.trunk for c in cells}
    if kinds == {"shared"}:
        return f"shared ViT ({trunk_flavour(runs.run_record(cells[0].cfg))[1]}) for every cell"
    return "each paper's own (see the random-init rows)" if kinds == {"paper"} else "per cell (column trunk)"


def print_estimate(est: list[dict], finetune: bool = False) -> list[dict]:
    print("\nestimated wall time (from timing 2 training steps and one feature batch per cell on this machine; "
          "data loading and the probes' own training not included):")
    for e in est:
        print(f"  {e['cell']}: {e['step_s']:.3f} s/step -> pre-train {e['pretrain_s'] / 60:.1f} min, "
              f"probe features {e['probe_s'] / 60:.1f} min"
              + (f", fine-tune {e['finetune_s'] / 60:.1f} min" if finetune else ""))
    print(f"  total: about {sum(e['total_s'] for e in est) / 3600:.2f} h")
    return est


def result_rows(cells: Sequence[Cell], probes, layers, pool, random_init, device, progress, ft) -> list[dict]:
    """One row per cell, then one random-init row per trunk and probe protocol (``trunk_flavour``): every cell
    is read against its own architecture at init, with its protocol."""
    flavours, flavour_of = {}, {}
    for cell in cells:
        key, words = trunk_flavour(runs.read_record(latest_checkpoint(Path(cell.cfg.out))))
        flavour_of[cell.name] = flavours.setdefault(key, {"first": cell, "cells": [], "words": words})
        flavour_of[cell.name]["cells"].append(cell.name)
    rows, random_rows = [], []
    for cell in cells:
        run_dir, flavour = Path(cell.cfg.out), flavour_of[cell.name]
        first = random_init and flavour["first"] is cell
        probe_rows = probe_cell(run_dir, probes, layers, first, device, progress, pool=pool)
        summary = json.loads((run_dir / "summary.json").read_text())
        row = {"cell": cell.name, "objective": cell.objective, "options": json.dumps(cell.options),
               "model": cell.cfg.model, "trunk": cell.cfg.trunk, "epochs": cell.cfg.epochs, "steps": summary["steps"],
               "pretrain_loss": round(final_loss(run_dir), 5), **_probe_columns(probe_rows[0]),
               "images_per_s": summary.get("images_per_s"), "wall_time_s": summary.get("wall_time_s"),
               "flops_per_image": cell.flops_per_image,
               "train_flops": cell.flops_per_image * summary["steps"] * cell.cfg.batch_size}
        if ft:
            row["finetune_top1"] = finetune_cell(run_dir, ft, cell.cfg.img_size)["top1"]
        rows.append(row)
        if first:
            rnd = {"cell": f"random-init-{cell.name}", "options": "{}", "model": cell.cfg.model,
                   "trunk": cell.cfg.trunk, "epochs": 0,
                   "objective": f"random init ({flavour['words']}; for {', '.join(flavour['cells'])})",
                   "steps": 0, "pretrain_loss": float("nan"), **_probe_columns(probe_rows[1]),
                   "images_per_s": float("nan"), "wall_time_s": 0.0, "flops_per_image": cell.flops_per_image,
                   "train_flops": 0.0, "random_init_of": ",".join(flavour["cells"])}
            if ft:
                random_ft = dataclasses.replace(ft, init="random")
                rnd["finetune_top1"] = finetune_cell(run_dir, random_ft, cell.cfg.img_size)["top1"]
            random_rows.append(rnd)
    return rows + random_rows


def _probe_columns(probe_row: dict) -> dict:
    return {**{k: v for k, v in probe_row.items() if k.endswith("_top1")},
            "probe_protocol": probe_row.get("protocol", "-"), "protocol_source": probe_row.get("protocol_source", "-")}


# --------------------------------------------------------------------------- outputs
def write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.3g}" if abs(v) >= 1e5 else f"{v:.4g}"
    return str(v)


def markdown_table(rows: list[dict], columns: Sequence[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(title for _, title in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k, "-")) for k, _ in columns) + " |")
    return "\n".join(lines)


def write_results(out: Path, rows: list[dict], cells: Sequence[Cell], budget: str, aug: str, val_images: int) -> None:
    write_csv(out / "results.csv", rows)
    probe_cols = [k for k in rows[0] if k.endswith("_top1")]
    columns = [("objective", "objective"), ("cell", "cell"), ("pretrain_loss", "pre-training loss"),
               *[(k, k.replace("_top1", " top-1 (%)")) for k in probe_cols],
               ("probe_protocol", "probe protocol"),
               ("images_per_s", "images/s"), ("wall_time_s", "wall time (s)"), ("train_flops", "training FLOPs")]
    cfg = cells[0].cfg
    sources = dict.fromkeys(f"{r['cell']}: {r['protocol_source']}" for r in rows
                            if r.get("protocol_source") not in (None, "-") and not r.get("random_init_of"))
    header = (f"# mimaim compare\n\n{cfg.model}/{cfg.patch_size} at {cfg.img_size}px on `{cfg.data}`; held-out "
              f"split: the last {cfg.val_fraction:.0%} of each class ({val_images} images). Budget: {budget}. "
              f"Trunk: {describe_trunk(cells)}. Augmentation: {aug}. Probes: each cell is read with its own "
              "objective's probe protocol (column 'probe protocol'; sources below), and each random-init row with "
              "the protocol of the cells whose trunk and protocol it shares, so every pre-trained cell is read "
              "against its own architecture at init. "
              "Pre-training loss: mean over the last 10% of logged steps (each objective's own loss, not "
              "comparable across objectives). FLOPs: forward + backward of the whole objective, counted by torch "
              "FlopCounterMode.\n\n")
    footer = "\n\nProbe protocol sources:\n" + "".join(f"- {line}\n" for line in sources) if sources else "\n"
    (out / "results.md").write_text(header + markdown_table(rows, columns) + footer)
    plot_loss_curves(out / "loss_curves.png", [(c.name, Path(c.cfg.out)) for c in cells])
    plot_probe_accuracy(out / "probe_accuracy.png", rows, probe_cols)
    online = plot_online_probe(out / "online_probe.png", [(c.name, Path(c.cfg.out)) for c in cells])
    print(markdown_table(rows, columns))
    print(f"wrote {out / 'results.csv'}, {out / 'results.md'}, {out / 'loss_curves.png'}, "
          f"{out / 'probe_accuracy.png'}" + (f", {out / 'online_probe.png'}" if online else ""))


def save_plot(fig, ax, path: Path, **legend) -> None:
    ax.legend(fontsize=8, **legend)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_loss_curves(path: Path, runs: Sequence[tuple[str, Path]]) -> str:
    """Every run's logged loss against epochs -> the y scale used: log, or symlog when a loss goes below 0."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    lowest = math.inf
    for name, run_dir in runs:
        rows = read_metrics(run_dir)
        if rows:
            losses = [float(r["loss"]) for r in rows]
            lowest = min(lowest, *losses)
            ax.plot([float(r["epoch"]) for r in rows], losses, label=name)
    ax.set(xlabel="epoch", ylabel="training loss (each objective's own)", title="pre-training loss")
    if lowest > 0:
        ax.set_yscale("log")
    else:  # a loss that goes negative (NEPA's -cosine): log away from zero, linear around it
        ax.set_yscale("symlog", linthresh=0.1)
    save_plot(fig, ax, path)
    return ax.get_yscale()


def plot_online_probe(path: Path, runs: Sequence[tuple[str, Path]]) -> bool:
    """Online-probe top-1 against training FLOPs (``--online-probe``: metrics.csv's ``flops`` and ``online_*``
    columns), a colour per run, linear solid and k-NN dashed; nothing when no run has them -> whether drawn."""
    curves = []
    for name, run_dir in runs:
        rows = [r for r in read_metrics(run_dir) if r.get("flops") and (r.get("online_linear") or r.get("online_knn"))]
        for col, style in (("online_linear", "-"), ("online_knn", "--")):
            points = [(float(r["flops"]), float(r[col])) for r in rows if r.get(col)]
            if points:
                curves.append((name, col, style, points))
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    colours = {name: f"C{i}" for i, name in enumerate(dict.fromkeys(c[0] for c in curves))}
    for name, col, style, points in curves:
        ax.plot(*zip(*points), style, marker="o", markersize=3, color=colours[name],
                label=f"{name} {col.replace('online_', '')}")
    ax.set(xlabel="training FLOPs", ylabel="held-out top-1 (%)", xscale="log",
           title="online probe (unmasked trunk) vs compute")
    save_plot(fig, ax, path, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return True


def plot_probe_accuracy(path: Path, rows: list[dict], columns: Sequence[str]) -> None:
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(rows) + 2), 4), dpi=120)
    width = 0.8 / max(1, len(columns))
    for j, col in enumerate(columns):
        values = [r.get(col, float("nan")) for r in rows]
        xs = [i + (j - (len(columns) - 1) / 2) * width for i in range(len(rows))]
        bars = ax.bar(xs, values, width, label=col.replace("_top1", ""))
        ax.bar_label(bars, fmt="%.1f", fontsize=6)
    ax.set_xticks(range(len(rows)), [r["cell"] for r in rows], rotation=20, fontsize=8)
    ax.set(ylabel="held-out top-1 (%)", title="probe accuracy")
    save_plot(fig, ax, path, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, never over them
