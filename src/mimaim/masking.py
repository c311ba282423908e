"""Masking rules as small pure functions.

Each objective draws its per-sample masking *in the data pipeline* from a
``torch.Generator`` seeded by (run seed, epoch, sample index), the way the official
BEiT and SimMIM code generate masks in their datasets. That makes a sample's mask
independent of batch size, process count and worker count, which is what lets a
resumed run and a data-parallel run reproduce a single-process run exactly.

Conventions: a boolean mask of shape (N,) or (B, N) with True = masked / removed.
"""

from __future__ import annotations

import torch


# --------------------------------------------------------------------------- MAE
def mae_noise(num_patches: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample uniform noise (N,) whose argsort defines MAE's random mask."""
    return torch.rand(num_patches, generator=generator)


def random_masking(tokens: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
    """MAE's per-sample random masking by argsort of uniform noise (models_mae.py).

    tokens (B, N, D), noise (B, N) -> (visible (B, K, D), mask (B, N) float 1 = removed,
    ids_restore (B, N)) with K = int(N * (1 - mask_ratio)). Small noise is kept.
    """
    B, N, D = tokens.shape
    len_keep = int(N * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(B, N, device=tokens.device)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small = keep
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]  # (B, K)
    visible = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
    mask = torch.ones(B, N, device=tokens.device, dtype=tokens.dtype)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # back to the original patch order
    return visible, mask, ids_restore


def unshuffle(tokens: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    """(B, N, D) tokens in shuffled order -> original patch order (MAE decoder step)."""
    D = tokens.shape[-1]
    return torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, D))
