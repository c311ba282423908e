"""``mimaim probe``: freeze a run's encoder and probe it beside the same architecture at random init.

The run is read through its backbone alone (``engine.runs.open_backbone``; no objective, head or
tokenizer), with the objective's probe protocol (docs/methods.md sec. 7) unless overridden.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch

from ..data import eval_transform
from ..engine.runs import build_backbone, open_backbone
from ..objectives import ProbeProtocol, get_objective_class
from .features import POOLS, cached_features, encode, extract_features, pool_tokens
from . import attentive  # noqa: F401  (registers the "attentive" probe)
from .probes import get_probe, labelled_splits

DEFAULT_PROBES = ("linear", "attentive", "knn")


def resolve_protocol(objective: str, pool: str = "auto", layers: Sequence[int] | None = None,
                     norm: bool | None = None, recorded: dict | None = None) -> ProbeProtocol:
    """The run's recorded protocol (its objective's on its trunk), else the objective's (``ProbeProtocol()`` for an
    unknown name), with any explicit override applied; ``source`` says which parts were overridden."""
    try:
        proto = ProbeProtocol(**{**recorded, "layers": tuple(recorded["layers"]) if recorded["layers"] else None}) \
            if recorded else get_objective_class(objective).probe_protocol
    except (KeyError, ValueError):
        proto = ProbeProtocol(source="mimaim default (objective not registered)")
    if pool not in ("auto", *POOLS):
        raise ValueError(f"pool must be auto, cls or mean; got {pool!r}")
    changes = {}
    if pool != "auto" and pool != proto.pool:
        changes["pool"] = pool
    if layers is not None and (tuple(layers) != tuple(proto.layers or ()) or proto.layers is None):
        changes["layers"] = tuple(int(i) for i in layers)
    if norm is not None and norm != proto.norm:
        changes["norm"] = bool(norm)
    if not changes:
        return proto
    told = ", ".join(f"{k}={v}" for k, v in changes.items())
    return replace(proto, **changes, source=f"{objective}'s protocol overridden by {told} (declared: {proto.source})")


def describe_protocol(proto: ProbeProtocol) -> str:
    """One line: what the probes read, e.g. 'mean of patch tokens of blocks (-2, -1) averaged, no final norm'."""
    pooled = "cls token" if proto.pool == "cls" else "mean of patch tokens"
    where = "the last block" if proto.layers is None else f"blocks {tuple(proto.layers)} averaged"
    return f"{pooled} of {where}, {'after the final norm' if proto.norm else 'no final norm'}"


def probe_encoder(backbone, train, val, num_classes: int, img_size: int, probes: Sequence[str],
                  layers: Sequence[int] | None = None, pool: str = "mean", device="cpu",
                  cache_dir: Path | None = None, cache_key: str = "", progress: bool = False,
                  norm: bool = True) -> dict[str, float]:
    """Top-1 (%) of each probe on ``val`` after fitting on ``train``'s frozen features."""
    specs = [get_probe(p) for p in probes]
    keep_tokens = any(s.needs_tokens for s in specs)
    layers = list(layers) if layers is not None else None
    feats = {}
    for name, split in (("train", train), ("val", val)):
        key = f"{cache_key}|{name}|{split.name}|{len(split)}|{layers}|{pool}|norm={norm}|{keep_tokens}|{img_size}"
        feats[name] = cached_features(cache_dir if cache_key else None, key, lambda s=split, n=name: extract_features(
            backbone, s, img_size, layers=layers, pool=pool, norm=norm, keep_tokens=keep_tokens, device=device,
            progress=progress, desc=f"{n} features"))
    heads = getattr(backbone, "num_heads", 1)
    return {spec.name: spec.fn(feats["train"], feats["val"], num_classes, num_heads=heads) for spec in specs}


BLIND_BELOW = 1e-3  # a trunk without positions moves by float rounding (~1e-7), MAE's random trunk by ~5e-2


@torch.no_grad()
def position_change(backbone, images: torch.Tensor, proto: ProbeProtocol) -> float:
    """Relative change of the probe's pooled features of ``images`` (B, C, H, W) when their patch tiles are
    shuffled (one permutation for all): ~0 when the trunk cannot tell where a patch is."""
    (h, w), p, (B, C) = backbone.grid_size, backbone.patch_size, images.shape[:2]
    tiles = images.reshape(B, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, C, p, p)
    perm = torch.randperm(h * w, generator=torch.Generator().manual_seed(0))
    shuffled = tiles[:, perm].reshape(B, h, w, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(images.shape)
    feats = [pool_tokens(encode(backbone, x, proto.layers, proto.norm), backbone.num_prefix_tokens, proto.pool)
             for x in (images, shuffled)]
    return ((feats[1] - feats[0]).norm() / feats[0].norm()).item()


def _run_dir_of(path: Path) -> Path:
    """Where probe outputs go: the run directory (``path``, or the run its checkpoint folder belongs to)."""
    if (path / "config.yaml").exists():
        return path
    run = path.resolve().parent.parent  # RUN/checkpoints/<step>
    return run if (run / "config.yaml").exists() else path


def probe_run(run_dir: str | Path, data: str | None = None, probes: Sequence[str] = DEFAULT_PROBES,
              layers: Sequence[int] | None = None, pool: str = "auto", norm: bool | None = None,
              random_init: bool = True, device: str = "cpu", progress: bool = True,
              checkpoint: str | Path | None = None) -> list[dict]:
    """Rows: the pre-trained encoder and (optionally) the same architecture freshly initialised.

    ``run_dir``: a run directory or one of its checkpoint folders. Both rows use the same
    protocol (the objective's, see ``resolve_protocol``), recorded in each row.
    """
    backbone, record, ckpt = open_backbone(run_dir, device=device, checkpoint=checkpoint)
    ckpt, out_dir, run_cfg = Path(ckpt), _run_dir_of(Path(run_dir)), record["config"]
    objective, model, img_size = record["objective"], record["backbone"]["name"], record["img_size"]
    seed, data = run_cfg["seed"], data or run_cfg["data"]
    proto = resolve_protocol(objective, pool, layers, norm, record.get("probe_protocol"))
    layers = list(proto.layers) if proto.layers is not None else None
    train, val, num_classes = labelled_splits(data, run_cfg["val_fraction"])
    encoders = [("pre-trained", backbone, f"{ckpt}")]
    if random_init:
        encoders.append(("random init", build_backbone(record, seed=seed), f"random-{model}-{objective}-{seed}"))
    held_out = torch.stack([eval_transform(img_size)(val.load(i)) for i in range(min(8, len(val)))]).to(device)
    rows = []
    for label, encoder, key in encoders:
        encoder = encoder.to(device).eval()
        moved = position_change(encoder, held_out, proto)
        scores = probe_encoder(encoder, train, val, num_classes, img_size, probes, layers,
                               proto.pool, device, cache_dir=out_dir / "features", cache_key=f"{key}|{data}",
                               progress=progress, norm=proto.norm)
        rows.append({"encoder": label, "checkpoint": ckpt.name if label == "pre-trained" else "-",
                     "objective": objective, "model": model, "data": data, "train_images": len(train),
                     "val_images": len(val), "pool": proto.pool, "layers": layers, "norm": proto.norm,
                     "protocol": describe_protocol(proto), "protocol_source": proto.source, "position_change": moved,
                     **{f"{p}_top1": round(v, 2) for p, v in scores.items()}})
    (out_dir / "probe.json").write_text(json.dumps(rows, indent=2))
    blind = [f"{r['position_change']:.0e} ({r['encoder']})" for r in rows if r["position_change"] < BLIND_BELOW]
    if blind:
        print(f"warning: the {model} trunk of this {objective} run is position-blind: shuffling the patches of "
              f"held-out images moves its probe features by {', '.join(blind)} relative; give it positions from "
              "step 0 as --recipe quick does: --set objective.abs_pos_emb=true (BEiT), objective.use_ape=true "
              "(SimMIM)", file=sys.stderr)
    return rows


def format_table(rows: list[dict]) -> str:
    """The protocol line, then a markdown table of top-1 per probe and encoder."""
    cols = [c for c in rows[0] if c.endswith("_top1")]
    lines = ["| encoder | " + " | ".join(c.replace("_top1", " top-1 (%)") for c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    lines += [f"| {r['encoder']} | " + " | ".join(f"{r[c]:.2f}" for c in cols) + " |" for r in rows]
    return "\n".join([f"probe protocol: {rows[0]['protocol']} (source: {rows[0]['protocol_source']})"] + lines)
