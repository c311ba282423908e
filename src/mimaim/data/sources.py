"""Data specs: ``digits`` (scikit-learn's bundled 8x8 digits, no download), ``imagefolder:PATH``,
``wds:SHARDS`` (WebDataset tar shards, streamed; :mod:`mimaim.data.shards`) -> a :class:`Source`."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from .base import IMAGE_EXTENSIONS, DataError, Source, check_bad_fraction
from .shards import build_shard_source

DATA_SPEC_HELP = ("digits (built in, no download), imagefolder:PATH, or wds:SHARDS (WebDataset tar shards, "
                  "from `mimaim shards` or any writer: a folder or DIR/train-{000000..000127}.tar)")


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
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DataError(f"data folder {str(root)!r} {what}; pass --data imagefolder:PATH with a folder of images "
                        "(class sub-folders optional)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    items = [str(root / name) for name in sorted(os.listdir(root)) if _is_image(name) and (root / name).is_file()]
    labels = [-1] * len(items)
    kept_classes = []
    for cls in classes:
        files = []
        for dirpath, dirnames, filenames in os.walk(root / cls):
            dirnames.sort()
            files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f))
        if files:
            labels.extend([len(kept_classes)] * len(files))
            kept_classes.append(cls)
            items.extend(files)
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


def estimate_decoded_bytes(source: Source, sample: int = 16) -> int:
    sizes = []
    for i in np.linspace(0, len(source) - 1, min(sample, len(source))).astype(int):
        try:
            with Image.open(source.items[i]) as img:
                sizes.append(img.size[0] * img.size[1] * 3)
        except Exception:  # noqa: BLE001 - a broken file is found (and counted) when decoding
            continue
    return int(np.mean(sizes) * len(source)) if sizes else 0


def parse_data_spec(spec: str) -> tuple[str, str | None]:
    kind, _, arg = spec.partition(":")
    if kind == "digits" and not arg:
        return "digits", None
    if kind in ("imagefolder", "wds") and arg:
        return kind, arg
    raise DataError(f"unknown data spec {spec!r}; use {DATA_SPEC_HELP}")


def build_source(spec: str, cache: str = "auto", max_bad_fraction: float = 0.01,
                 cache_limit_bytes: int = 4 << 30, progress: bool = True) -> Source:
    """The whole (unsplit) source for a data spec; ``cache`` (auto | on | off) decodes a folder into memory."""
    kind, arg = parse_data_spec(spec)
    if kind == "digits":
        return load_digits_source()
    if kind == "wds":  # streamed from tar shards, never decoded into memory
        if cache == "on":
            warnings.warn("--cache on does not apply to wds: shards, which are streamed; for data that fits in "
                          "memory use --data imagefolder:PATH --cache on")
        return build_shard_source(arg, progress)
    source = scan_image_folder(arg)
    if cache not in ("auto", "on", "off"):
        raise DataError(f"unknown cache setting {cache!r}; choose auto, on or off")
    if cache == "on" or (cache == "auto" and estimate_decoded_bytes(source) <= cache_limit_bytes):
        source = decode_all(source, max_bad_fraction, progress)
    return source
