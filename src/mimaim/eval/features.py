"""Frozen-encoder features for probes, extracted once and cached, as an objective's ``ProbeProtocol``
says, read by ``models/readout.py`` (shared with the engine's online probe); all tokens in bf16 on request.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import torch

from ..data import Source, eval_transform
from ..models.readout import POOLS, encode, pool_tokens  # noqa: F401  (the one read-out; re-exported)


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
