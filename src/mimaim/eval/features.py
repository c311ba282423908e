"""Frozen-encoder features for probes, extracted once and cached.

Features come from the backbone contract alone (``forward_tokens`` /
``forward_intermediates``), so every objective's encoder is probed the same way:

* ``layers=None``: the final block after the final norm;
* ``layers=[i, j, ...]``: the average of those blocks' outputs *without* the final norm
  (AIM's protocol; ``-1`` = last block).

``pooled`` is the cls token when the backbone has one and the mean of patch tokens
otherwise (``pool="mean"`` forces the mean). ``tokens`` keeps every token (for the
attentive probe), stored in bfloat16 to halve the cache.
Downstream the trunk always runs with bidirectional attention and no masking.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import torch

from ..data import Source, eval_transform


def pool_tokens(tokens: torch.Tensor, num_prefix_tokens: int, pool: str = "auto") -> torch.Tensor:
    """(B, T, D) -> (B, D): cls token, or mean of patch tokens."""
    if pool not in ("auto", "cls", "mean"):
        raise ValueError(f"pool must be auto, cls or mean; got {pool!r}")
    if pool == "cls" and num_prefix_tokens == 0:
        raise ValueError("pool='cls' needs a backbone with a cls token; use mean")
    if num_prefix_tokens and pool in ("auto", "cls"):
        return tokens[:, 0]
    return tokens[:, num_prefix_tokens:].mean(dim=1)


@torch.no_grad()
def encode(backbone, images: torch.Tensor, layers: Sequence[int] | None = None) -> torch.Tensor:
    """(B, C, H, W) -> (B, T, D) frozen tokens (see the module docstring)."""
    if layers is None:
        return backbone.forward_features(images)
    return torch.stack(backbone.forward_intermediates(images, list(layers), norm=False)).mean(dim=0)


@torch.no_grad()
def extract_features(backbone, source: Source, img_size: int, layers: Sequence[int] | None = None,
                     pool: str = "auto", keep_tokens: bool = False, batch_size: int = 256,
                     device: str | torch.device = "cpu", progress: bool = False, desc: str = "features") -> dict:
    """-> {"pooled": (N, D) float32, "labels": (N,), and "tokens": (N, T, D) bf16 if asked}."""
    from tqdm.auto import tqdm

    device = torch.device(device)
    transform = eval_transform(img_size)
    backbone = backbone.to(device).eval()
    pooled, tokens, labels = [], [], []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
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
            t = encode(backbone, torch.stack(batch).to(device), layers).float()  # (B, T, D)
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
