"""Frozen-encoder features for probes, extracted once and cached, as an objective's ``ProbeProtocol``
says (docs/methods.md sec. 7): the last block or the mean of ``layers`` (AIM: ml-aim's ``AverageLayers``),
each after the final norm when ``norm``, pooled by cls or patch mean; all tokens in bf16 on request.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import torch

from ..data import Source, eval_transform

POOLS = ("cls", "mean")


def pool_tokens(tokens: torch.Tensor, num_prefix_tokens: int, pool: str = "mean") -> torch.Tensor:
    """(B, T, D) -> (B, D): the cls token (``pool="cls"``) or the mean of patch tokens (``"mean"``)."""
    if pool == "cls":  # probe_run.resolve_protocol has checked the name
        if num_prefix_tokens == 0:
            raise ValueError("pool 'cls' needs a backbone with a cls token, and this one has none; "
                             "probe it with --pool mean")
        return tokens[:, 0]
    return tokens[:, num_prefix_tokens:].mean(dim=1)


@torch.no_grad()
def encode(backbone, images: torch.Tensor, layers: Sequence[int] | None = None, norm: bool = True) -> torch.Tensor:
    """(B, C, H, W) -> (B, T, D) frozen tokens, prefix tokens first (see the module docstring)."""
    if layers is None and norm:
        return backbone.forward_features(images)
    if layers is not None and not list(layers):
        raise ValueError("layers is empty; pass block indices such as -6,-5,-4,-3,-2,-1, or None for the last")
    out = backbone.forward_intermediates(images, indices=1 if layers is None else list(layers), norm=norm,
                                         return_prefix_tokens=True, stop_early=True, output_fmt="NLC",
                                         intermediates_only=True)
    maps = [torch.cat([t[1], t[0]], dim=1) if isinstance(t, tuple) else t for t in out]  # (prefix, spatial)
    if len({t.shape for t in maps}) > 1:
        raise ValueError(f"layers {list(layers)} give token maps of different shapes {[tuple(t.shape) for t in maps]} "
                         "(a Swin's layers are its stages, each with its own width and grid): average one shape")
    return torch.stack(maps).mean(dim=0)


@torch.no_grad()
def extract_features(backbone, source: Source, img_size: int, layers: Sequence[int] | None = None,
                     pool: str = "mean", norm: bool = True, keep_tokens: bool = False, batch_size: int = 256,
                     device: str | torch.device = "cpu", progress: bool = False, desc: str = "features") -> dict:
    """-> {"pooled": (N, D) float32, "labels": (N,), and "tokens": (N, T, D) bf16 if asked}."""
    from tqdm.auto import tqdm

    device = torch.device(device)
    transform = eval_transform(img_size)
    backbone = backbone.to(device).eval()
    pooled, tokens, labels = [], [], []
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for start in tqdm(range(0, len(source), batch_size), desc=desc, disable=not progress, unit="batch"):
        batch, batch_labels = [], []
        for i in range(start, min(start + batch_size, len(source))):
            try:
                batch.append(transform(source.load(i)))
                batch_labels.append(source.labels[i])
            except Exception:  # noqa: BLE001 - unreadable images are left out of probes
                continue
        if not batch:
            continue
        with autocast:
            t = encode(backbone, torch.stack(batch).to(device), layers, norm).float()  # (B, T, D)
        pooled.append(pool_tokens(t, backbone.num_prefix_tokens, pool).cpu())
        if keep_tokens:
            tokens.append(t.to(torch.bfloat16).cpu())
        labels.extend(batch_labels)
    out = {"pooled": torch.cat(pooled), "labels": torch.tensor(labels)}
    if keep_tokens:
        out["tokens"] = torch.cat(tokens)
    return out


def cached_features(cache_dir: Path | None, key: str, compute) -> dict:
    """Load ``cache_dir/<hash(key)>.pt`` or compute and save it (weights_only-safe tensors only)."""
    if cache_dir is None:
        return compute()
    path = Path(cache_dir) / (hashlib.sha1(key.encode()).hexdigest()[:16] + ".pt")
    if path.exists():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - a damaged cache is recomputed
            path.unlink(missing_ok=True)
    feats = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(feats, tmp)
    tmp.replace(path)
    return feats
