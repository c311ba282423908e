"""Probes on features extracted once (``features.py``): linear (MAE ``main_linprobe.py``: affine-free
BatchNorm + Linear, SGD, cosine; departure: cached features of the evaluation view, so no augmentation
and plain SGD instead of LARS) and k-NN (DINO's weighted k-NN, k = 20, T = 0.07). More probes register
with ``register_probe`` (the attentive probe does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..data import DataError, Source, build_source
from ..engine.optim import cosine_lr, set_lr


def labelled_splits(data: str, val_fraction: float) -> tuple[Source, Source, int]:
    """(train, held-out, number of classes) of a labelled data spec; names what is missing."""
    source = build_source(data, progress=False)
    if not source.has_labels:
        raise DataError(f"data {data!r} has no labels: probes need class sub-folders (imagefolder:PATH/<class>/"
                        "<image>) or WebDataset shards with an integer `cls`; pass a labelled --data")
    train, val = source.split("train", val_fraction), source.split("val", val_fraction)
    if len(val) == 0:
        raise DataError(f"the held-out split of {data!r} is empty; raise --val-fraction")
    return train, val, len(source.classes)


@dataclass
class ProbeSpec:
    name: str
    fn: Callable  # (train: dict, val: dict, num_classes, **kw) -> top-1 in percent
    needs_tokens: bool = False


_PROBES: dict[str, ProbeSpec] = {}


def register_probe(name: str, needs_tokens: bool = False):
    def wrap(fn):
        _PROBES[name] = ProbeSpec(name, fn, needs_tokens)
        return fn
    return wrap


def get_probe(name: str) -> ProbeSpec:
    if name not in _PROBES:
        raise ValueError(f"unknown probe {name!r}; choose from {', '.join(_PROBES)}")
    return _PROBES[name]


@register_probe("linear")
def linear_probe(train: dict, val: dict, num_classes: int, epochs: int = 100, batch_size: int = 256,
                 base_lr: float = 0.1, warmup_epochs: int = 10, seed: int = 0, **_) -> float:
    x_tr, y_tr = train["pooled"].float(), train["labels"]
    x_va, y_va = val["pooled"].float(), val["labels"]
    g = torch.Generator().manual_seed(seed)
    head = nn.Sequential(nn.BatchNorm1d(x_tr.shape[1], affine=False, eps=1e-6), nn.Linear(x_tr.shape[1], num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01, generator=g)
    nn.init.zeros_(head[1].bias)
    batch_size = min(batch_size, len(x_tr))
    lr = base_lr * batch_size / 256
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    fit_head(head, opt, x_tr, y_tr, epochs, batch_size, lr, warmup_epochs, g)
    return top1(head, x_va, y_va)


def fit_head(head: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, epochs: int,
             batch_size: int, lr: float, warmup_epochs: float, generator: torch.Generator) -> None:
    """Cross-entropy on cached features, shuffled mini-batches, cosine schedule with warm-up."""
    steps_per_epoch = max(1, len(x) // batch_size)
    step = 0
    head.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for b in range(steps_per_epoch):
            idx = order[b * batch_size:(b + 1) * batch_size]
            set_lr(opt, cosine_lr(step / steps_per_epoch, lr, 0.0, warmup_epochs, epochs))
            loss = F.cross_entropy(head(x[idx].float()), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1


@torch.no_grad()
def top1(head: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 1024) -> float:
    """Top-1 (%) of ``head`` in eval mode, in chunks so that token caches fit in memory."""
    head.eval()
    correct = sum((head(x[i:i + chunk].float()).argmax(dim=1) == y[i:i + chunk]).sum().item()
                  for i in range(0, len(x), chunk))
    return 100.0 * correct / max(1, len(x))


@register_probe("knn")
def knn_probe(train: dict, val: dict, num_classes: int, k: int = 20, temperature: float = 0.07,
              chunk: int = 1024, **_) -> float:
    x_tr = F.normalize(train["pooled"].float(), dim=1)
    x_va = F.normalize(val["pooled"].float(), dim=1)
    y_tr, y_va = train["labels"], val["labels"]
    k = min(k, len(x_tr))
    correct = 0
    for start in range(0, len(x_va), chunk):
        sims = x_va[start:start + chunk] @ x_tr.T  # (b, N_train)
        top_sims, top_idx = sims.topk(k, dim=1)
        weights = (top_sims / temperature).exp()
        votes = torch.zeros(sims.shape[0], num_classes).scatter_add_(1, y_tr[top_idx], weights)
        correct += (votes.argmax(dim=1) == y_va[start:start + chunk]).sum().item()
    return 100.0 * correct / len(x_va)
