"""``mimaim probe``: freeze a run's encoder and probe it beside the same architecture at random init."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from ..data import DataError, build_source
from ..engine.runs import load_run
from ..engine.trainer import build_run_objective
from .features import cached_features, extract_features
from .probes import get_probe

DEFAULT_PROBES = ("linear", "attentive", "knn")


def labelled_splits(data: str, val_fraction: float):
    source = build_source(data, progress=False)
    if not source.has_labels:
        raise DataError(f"data {data!r} has no labels: probes need class sub-folders "
                        "(imagefolder:PATH/<class>/<image>); pass a labelled --data")
    train, val = source.split("train", val_fraction), source.split("val", val_fraction)
    if len(val) == 0:
        raise DataError(f"the held-out split of {data!r} is empty; raise --val-fraction")
    return train, val, len(source.classes)


def probe_encoder(backbone, train, val, num_classes: int, img_size: int, probes: Sequence[str],
                  layers: Sequence[int] | None = None, pool: str = "auto", device="cpu",
                  cache_dir: Path | None = None, cache_key: str = "", progress: bool = False) -> dict[str, float]:
    """Top-1 (%) of each probe on ``val`` after fitting on ``train``'s frozen features."""
    specs = [get_probe(p) for p in probes]
    keep_tokens = any(s.needs_tokens for s in specs)
    feats = {}
    for name, split in (("train", train), ("val", val)):
        key = f"{cache_key}|{name}|{split.name}|{len(split)}|{layers}|{pool}|{keep_tokens}|{img_size}"
        feats[name] = cached_features(cache_dir if cache_key else None, key, lambda s=split, n=name: extract_features(
            backbone, s, img_size, layers=layers, pool=pool, keep_tokens=keep_tokens, device=device,
            progress=progress, desc=f"{n} features"))
    results = {}
    for spec in specs:
        results[spec.name] = spec.fn(feats["train"], feats["val"], num_classes,
                                     num_heads=getattr(backbone, "num_heads", 1))
    return results


def probe_run(run_dir: str | Path, data: str | None = None, probes: Sequence[str] = DEFAULT_PROBES,
              layers: Sequence[int] | None = None, pool: str = "auto", random_init: bool = True,
              device: str = "cpu", progress: bool = True) -> list[dict]:
    """Rows: the pre-trained encoder and (optionally) the same architecture freshly initialised."""
    run_dir = Path(run_dir)
    cfg, objective, ckpt = load_run(run_dir, device=device)
    data = data or cfg.data
    train, val, num_classes = labelled_splits(data, cfg.val_fraction)
    rows = []
    encoders = [("pre-trained", objective.encoder, f"{ckpt}")]
    if random_init:
        encoders.append(("random init", build_run_objective(cfg).encoder, f"random-{cfg.model}-{cfg.seed}"))
    for label, encoder, key in encoders:
        scores = probe_encoder(encoder, train, val, num_classes, cfg.img_size, probes, layers, pool, device,
                               cache_dir=run_dir / "features", cache_key=f"{key}|{data}", progress=progress)
        rows.append({"encoder": label, "checkpoint": ckpt.name if label == "pre-trained" else "-",
                     "data": data, "train_images": len(train), "val_images": len(val),
                     **{f"{p}_top1": round(v, 2) for p, v in scores.items()}})
    (run_dir / "probe.json").write_text(json.dumps(rows, indent=2))
    return rows


def format_table(rows: list[dict]) -> str:
    cols = [c for c in rows[0] if c.endswith("_top1")]
    header = "| encoder | " + " | ".join(c.replace("_top1", " top-1 (%)") for c in cols) + " |"
    sep = "|---|" + "---|" * len(cols)
    lines = [header, sep] + [f"| {r['encoder']} | " + " | ".join(f"{r[c]:.2f}" for c in cols) + " |" for r in rows]
    return "\n".join(lines)
