"""The one read-out of a frozen trunk for probes (offline ``eval/`` and the engine's online probe): the last
block or the mean of ``layers`` (AIM: ml-aim's ``AverageLayers``), each after the final norm when ``norm``,
pooled by cls or patch mean (docs/methods.md sec. 7). Called without an attention mask, so a trunk trained
causally (AIM) is read bidirectionally, as its probe protocol says."""

from __future__ import annotations

from typing import Sequence

import torch

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
def read_out(backbone, images: torch.Tensor, pool: str = "mean", layers: Sequence[int] | None = None,
             norm: bool = True) -> torch.Tensor:
    """(B, C, H, W) -> (B, D) float32 probe features: ``encode`` then ``pool_tokens``."""
    return pool_tokens(encode(backbone, images, layers, norm).float(), backbone.num_prefix_tokens, pool)
