"""Probes on features extracted once (``features.py``): linear (MAE ``main_linprobe.py``: affine-free
BatchNorm + Linear, SGD, cosine; departure: cached features of the evaluation view, so no augmentation
and plain SGD instead of LARS) and k-NN (DINO's weighted k-NN, k = 20, T = 0.07). More probes register
with ``register_probe`` (the attentive probe does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..data import DataError, Source, build_source
from ..engine.feature_probes import fit_head, knn_top1, linear_top1, top1  # noqa: F401  (shared with online probes)


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
    return linear_top1(train["pooled"], train["labels"], val["pooled"], val["labels"], num_classes, epochs,
                       batch_size, base_lr, warmup_epochs, seed)


@register_probe("knn")
def knn_probe(train: dict, val: dict, num_classes: int, k: int = 20, temperature: float = 0.07,
              chunk: int = 1024, **_) -> float:
    return knn_top1(train["pooled"], train["labels"], val["pooled"], val["labels"], num_classes, k, temperature,
                    chunk)
