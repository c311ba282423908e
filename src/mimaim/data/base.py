"""``Source``: an indexable collection of images (``load(i)`` may raise for a broken file) with labels (-1 =
unlabelled), split into ``train`` and a held-out ``val``: the last ``val_fraction`` of each class in file order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")


class DataError(ValueError):
    """A data problem the user can fix; the message says how."""


@dataclass
class Source:
    name: str
    items: list  # paths (str) or uint8 arrays (H, W, 3)
    labels: list[int]
    classes: list[str] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)  # files found unreadable while caching

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> Image.Image:
        item = self.items[index]
        if isinstance(item, np.ndarray):
            return Image.fromarray(item)
        with Image.open(item) as img:
            return img.convert("RGB")  # forces the decode, so a truncated file fails here

    def describe(self, index: int) -> str:
        item = self.items[index]
        return item if isinstance(item, str) else f"{self.name}[{index}]"

    @property
    def in_memory(self) -> bool:
        """Whether the images are already decoded (no file is read while training)."""
        return not self.items or not isinstance(self.items[0], str)

    @property
    def has_labels(self) -> bool:
        return bool(self.labels) and min(self.labels) >= 0 and len(self.classes) > 1

    def subset(self, indices: list[int]) -> "Source":
        return Source(self.name, [self.items[i] for i in indices], [self.labels[i] for i in indices],
                      self.classes, self.bad)

    def split(self, which: str, val_fraction: float) -> "Source":
        """``train`` / ``val`` / ``all``: the last ``val_fraction`` of each class is held out."""
        if which == "all":
            return self
        if which not in ("train", "val"):
            raise DataError(f"unknown split {which!r}; choose train, val or all")
        keep = []
        for idx in group_by_class(self.labels).values():
            n_val = int(math.floor(len(idx) * val_fraction)) if len(idx) > 1 else 0
            cut = len(idx) - n_val
            keep.extend(idx[:cut] if which == "train" else idx[cut:])
        return self.subset(sorted(keep))


def group_by_class(labels) -> dict[int, list[int]]:
    """Indices of each label, in index order, keyed by label in sorted order (-1 = unlabelled)."""
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(i)
    return {label: by_class[label] for label in sorted(by_class)}


def training_subset(train: Source, fraction: float, seed: int) -> Source:
    """A deterministic ``fraction`` of each class of ``train`` (at least one image per class), each class shuffled
    once from ``seed``, so smaller fractions are subsets of larger ones (0.1 inside 0.3) for data scaling."""
    if fraction >= 1.0:
        return train
    g = torch.Generator().manual_seed(seed)
    keep = []
    for idx in group_by_class(train.labels).values():
        order = torch.randperm(len(idx), generator=g).tolist()
        keep.extend(idx[j] for j in order[:max(1, round(len(idx) * fraction))])
    return train.subset(sorted(keep))


def check_bad_fraction(num_bad: int, num_seen: int, max_bad_fraction: float, examples=()) -> None:
    if num_seen and num_bad / num_seen > max_bad_fraction:
        raise DataError(
            f"{num_bad} of {num_seen} images could not be read ({num_bad / num_seen:.1%} > the allowed "
            f"{max_bad_fraction:.1%}), e.g. {', '.join(examples)}. Fix or remove the broken files, or raise "
            "--max-bad-fraction if skipping them is intended.")
