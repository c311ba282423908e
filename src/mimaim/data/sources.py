"""Where images come from: the built-in digits set and image folders.

A *source* is an indexable collection of images with optional labels:
``len(source)``, ``source.load(i) -> PIL.Image`` (may raise for a broken file),
``source.labels`` (list of int, -1 = unlabelled), ``source.classes`` and
``source.describe(i)`` (a path or name for messages).

A data spec names a source: ``digits`` (scikit-learn's bundled 8x8 digits, no download),
``imagefolder:PATH``, or ``wds:SHARDS`` (WebDataset tar shards, streamed; see
:mod:`mimaim.data.shards`). Every source splits into ``train`` and a held-out ``val``:
the last ``val_fraction`` of each class in file order (for CIFAR-10's 5,000 per class
and the default 0.1, the last 500 images of each class).
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
DATA_SPEC_HELP = ("digits (built in, no download), imagefolder:PATH, or wds:SHARDS "
                  "(WebDataset shards written by `mimaim shards`: a folder or DIR/train-{000000..000127}.tar)")


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


def training_subset(train, fraction: float, seed: int):
    """A deterministic ``fraction`` of each class of ``train`` (at least one image per class).

    Each class is shuffled once from ``seed`` and its first share kept, so smaller
    fractions are subsets of larger ones (0.1 inside 0.3 inside 1.0) for data-scaling runs.
    """
    if fraction >= 1.0:
        return train
    g = torch.Generator().manual_seed(seed)
    keep = []
    for idx in group_by_class(train.labels).values():
        order = torch.randperm(len(idx), generator=g).tolist()
        keep.extend(idx[j] for j in order[:max(1, round(len(idx) * fraction))])
    return train.subset(sorted(keep))


def load_digits_source() -> Source:
    """scikit-learn's 1,797 bundled 8x8 digits as grey RGB uint8 images, 10 classes."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0 * 255.0).round().astype(np.uint8)  # (n, 8, 8)
    items = [np.repeat(img[:, :, None], 3, axis=2) for img in images]
    return Source("digits", items, [int(t) for t in digits.target], [str(c) for c in range(10)])


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def scan_image_folder(root: str | os.PathLike) -> Source:
    """Find images under ``root``; each top-level sub-folder is a class, loose images are unlabelled."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"data folder {str(root)!r} does not exist; pass --data imagefolder:PATH with a "
                        "folder of images (class sub-folders optional)")
    if not root.is_dir():
        raise DataError(f"{str(root)!r} is not a folder; pass --data imagefolder:PATH with a folder of images")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    items, labels = [], []
    for name in sorted(os.listdir(root)):
        if _is_image(name) and (root / name).is_file():
            items.append(str(root / name))
            labels.append(-1)
    kept_classes = []
    for cls in classes:
        files = []
        for dirpath, dirnames, filenames in os.walk(root / cls):
            dirnames.sort()
            files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f))
        if files:
            label = len(kept_classes)
            kept_classes.append(cls)
            items.extend(files)
            labels.extend([label] * len(files))
    if not items:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS[:5])}, ...) found under {str(root)!r}; "
                        "point --data imagefolder:PATH at a folder that holds images or class sub-folders of images")
    if -1 in labels and kept_classes:
        warnings.warn(f"{labels.count(-1)} images sit directly in {root} beside class folders; "
                      "they are used for pre-training but carry no label for probes")
    return Source(f"imagefolder:{root}", items, labels, kept_classes)


def decode_all(source: Source, max_bad_fraction: float, progress: bool = True) -> Source:
    """Decode every image once into memory (uint8), so epochs after the first pay no JPEG cost."""
    from tqdm.auto import tqdm

    items, labels, bad = [], [], []
    for i in tqdm(range(len(source)), desc="decoding images into memory", disable=not progress,
                  unit="img", mininterval=1.0):
        try:
            items.append(np.asarray(source.load(i)))
            labels.append(source.labels[i])
        except Exception as err:  # noqa: BLE001 - any unreadable file is skipped and counted
            bad.append(source.describe(i))
            print(f"warning: skipping unreadable image {source.describe(i)}: {err}", file=sys.stderr)
    check_bad_fraction(len(bad), len(source), max_bad_fraction, bad[:3])
    return Source(source.name, items, labels, source.classes, bad)


def check_bad_fraction(num_bad: int, num_seen: int, max_bad_fraction: float, examples=()) -> None:
    if num_seen and num_bad / num_seen > max_bad_fraction:
        raise DataError(
            f"{num_bad} of {num_seen} images could not be read ({num_bad / num_seen:.1%} > the allowed "
            f"{max_bad_fraction:.1%}), e.g. {', '.join(examples)}. Fix or remove the broken files, or raise "
            "--max-bad-fraction if skipping them is intended.")


def parse_data_spec(spec: str) -> tuple[str, str | None]:
    kind, _, arg = spec.partition(":")
    if kind == "digits" and not arg:
        return "digits", None
    if kind in ("imagefolder", "wds") and arg:
        return kind, arg
    raise DataError(f"unknown data spec {spec!r}; use {DATA_SPEC_HELP}")


def estimate_decoded_bytes(source: Source, sample: int = 16) -> int:
    sizes = []
    for i in np.linspace(0, len(source) - 1, min(sample, len(source))).astype(int):
        try:
            with Image.open(source.items[i]) as img:
                sizes.append(img.size[0] * img.size[1] * 3)
        except Exception:  # noqa: BLE001
            continue
    return int(np.mean(sizes) * len(source)) if sizes else 0


def build_source(spec: str, cache: str = "auto", max_bad_fraction: float = 0.01,
                 cache_limit_bytes: int = 4 << 30, progress: bool = True) -> Source:
    """The whole (unsplit) source for a data spec; ``cache`` is auto | on | off."""
    kind, arg = parse_data_spec(spec)
    if kind == "digits":
        return load_digits_source()
    if kind == "wds":  # streamed from tar shards, never decoded into memory
        from .shards import build_shard_source

        if cache == "on":
            warnings.warn("--cache on does not apply to wds: shards, which are streamed; for data that fits in "
                          "memory use --data imagefolder:PATH --cache on")
        return build_shard_source(arg)
    source = scan_image_folder(arg)
    if cache not in ("auto", "on", "off"):
        raise DataError(f"unknown cache setting {cache!r}; choose auto, on or off")
    if cache == "on" or (cache == "auto" and estimate_decoded_bytes(source) <= cache_limit_bytes):
        source = decode_all(source, max_bad_fraction, progress)
    return source
