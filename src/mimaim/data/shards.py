"""WebDataset shards, ``--data wds:...``: data larger than memory, streamed from tar files (README, "Data
larger than memory"; ``index.json`` lists each shard's sample count, keys and labels). The ``webdataset``
package reads and writes the tars, but its pipeline gives neither exactly-once epochs over processes x
workers nor a resume inside an epoch, so the order is computed here:

* The epoch order is a function of (seed, epoch): shards are permuted, then the samples inside each
  shard; the concatenation ``C`` is cut, as for folders, into global batches.
* Each process reads a contiguous ``1/world_size`` of ``C`` in ``STREAMS_PER_RANK`` contiguous streams;
  micro-batch ``j`` comes from stream ``j % STREAMS_PER_RANK`` and a loader worker serves a fixed set of
  streams, so the batches do not depend on the number of workers (1, 2, 4 or 8; others round down).
* Resuming at step ``s`` is index arithmetic: a stream skips its finished shards without opening them.
* A stream holds its current shard's encoded bytes (to shuffle inside it): pick ``--shard-size`` so that
  ``STREAMS_PER_RANK`` shards fit (1,000 ImageNet JPEGs: ~110 MB).
* An unreadable sample is replaced by the next readable one of its shard (crop and mask still drawn from
  its own seed) and reported in the batch's ``bad`` list; an unreadable shard stops the run with one
  :class:`DataError` naming it.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from braceexpand import braceexpand
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset import TarWriter
from webdataset.tariterators import tarfile_samples

from .base import IMAGE_EXTENSIONS, DataError, Source
from .loader import collate, first_readable, prepare_sample, sample_seed, steps_per_epoch

INDEX_NAME = "index.json"
STREAMS_PER_RANK = 8
IMAGE_FIELDS = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def shard_samples(url: str):
    """The samples of one shard that hold an image, as webdataset groups them (``{"__key__", field: bytes}``);
    a truncated, garbage or missing file ends in one :class:`DataError` naming the shard."""
    try:
        for sample in tarfile_samples([{"url": url}]):
            if image_field(sample):
                yield sample
    except Exception as err:  # noqa: BLE001 - whatever the tar reader raised, the shard is unreadable
        reason = err.args[0] if isinstance(err, tarfile.ReadError) and err.args else err
        raise DataError(f"cannot read shard {url}: not a valid tar file ({reason}); re-download or rewrite it, "
                        "or leave it out of the --data pattern") from None


def image_field(sample: dict) -> str | None:
    """The first field that is an image by its last extension: ``jpg``, ``png``, ``webp``, ``image.jpeg``, ..."""
    return next((name for name in sample if not name.startswith("__")
                 and name.rpartition(".")[2].lower() in IMAGE_FIELDS), None)


def decode_image(sample: dict) -> Image.Image:
    with Image.open(io.BytesIO(sample[image_field(sample)])) as img:
        return img.convert("RGB")  # forces the decode, so a truncated file fails here


def sample_label(sample: dict) -> int:
    """The sample's ``cls`` as text (b"3", as ``webdataset.ShardWriter`` writes an int); -1 if none or not a number."""
    try:
        return int(sample["cls"])
    except (KeyError, ValueError):
        return -1


@dataclass
class ShardSource(Source):
    """A :class:`Source` over WebDataset shards; ``items`` are global sample ids (write order).

    ``split`` / ``subset`` / ``has_labels`` work as for folders (they only read the index);
    ``load(i)`` reads the sample's shard, and keeps the last one read (probes read in order)."""

    shards: list[str] = field(default_factory=list)  # paths or URLs, in index order
    counts: list[int] = field(default_factory=list)  # samples per shard
    keys: list[list[str]] | None = None  # per shard, the sample keys (None: not listed in the index)
    _last: tuple = field(default=(None, []), init=False, repr=False, compare=False)  # load()'s last shard

    def __post_init__(self):
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)

    @property
    def in_memory(self) -> bool:
        return False

    def subset(self, indices: list[int]) -> "ShardSource":
        return ShardSource(self.name, [self.items[i] for i in indices], [self.labels[i] for i in indices],
                           self.classes, self.bad, self.shards, self.counts, self.keys)

    def locate(self, sample_id: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self.offsets, sample_id, side="right")) - 1
        return shard, int(sample_id - self.offsets[shard])

    def describe(self, index: int) -> str:
        return self.describe_id(self.items[index])

    def describe_id(self, sample_id: int) -> str:
        shard, pos = self.locate(sample_id)
        key = self.keys[shard][pos] if self.keys else f"#{pos}"
        return f"{self.shards[shard]}:{key}"

    def load(self, index: int) -> Image.Image:
        shard, pos = self.locate(self.items[index])
        if self._last[0] != shard:
            self._last = (shard, self.read_shard(shard))
        return decode_image(self._last[1][pos])

    def read_shard(self, shard: int, wanted: set | None = None) -> dict[int, dict]:
        """The samples of ``shard`` (those at ``wanted`` positions), checked against the index's count."""
        samples, n = {}, 0
        for n, sample in enumerate(shard_samples(self.shards[shard]), 1):
            if wanted is None or n - 1 in wanted:
                samples[n - 1] = sample
        if n != self.counts[shard]:
            raise DataError(f"shard {self.shards[shard]} holds {n} samples with an image, but its index lists "
                            f"{self.counts[shard]}: the shard is truncated or was changed; rewrite it, or delete "
                            f"{INDEX_NAME} and index the shards again (`mimaim shards index PATTERN`)")
        return samples

    def epoch_loader(self, transform, masking_fn, *, seed, epoch, start_step, batch_size, accum_steps, rank,
                     world_size, num_workers, pin_memory):
        steps = steps_per_epoch(len(self), batch_size, accum_steps, world_size)
        workers = max(d for d in (1, 2, 4, 8) if d <= max(1, num_workers))  # each divides STREAMS_PER_RANK
        dataset = ShardEpoch(self, transform, masking_fn, seed=seed, epoch=epoch, start_step=start_step,
                             steps=steps, batch_size=batch_size, accum_steps=accum_steps, rank=rank,
                             world_size=world_size, workers=workers)
        return WorkerErrors(DataLoader(dataset, batch_size=None, num_workers=workers if num_workers > 0 else 0,
                                       pin_memory=pin_memory, prefetch_factor=4 if num_workers > 0 else None))


class WorkerErrors:
    """A loader whose workers' :class:`DataError` (sent as a batch ``{"error": message}``) is raised here,
    as the one message, not inside a DataLoader-worker traceback."""

    def __init__(self, loader: DataLoader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            if "error" in batch:
                raise DataError(batch["error"])
            yield batch


class ShardEpoch(IterableDataset):
    """One process's micro-batches of one epoch (already collated), for one or more workers."""

    def __init__(self, source: ShardSource, transform: Callable, masking_fn: Callable | None, *, seed: int,
                 epoch: int, start_step: int, steps: int, batch_size: int, accum_steps: int, rank: int,
                 world_size: int, workers: int, max_retries: int = 16):
        self.source, self.transform, self.masking_fn = source, transform, masking_fn
        self.seed, self.epoch, self.start_step = seed, epoch, start_step
        self.accum_steps, self.workers, self.max_retries = accum_steps, workers, max_retries
        per_rank = batch_size // world_size
        self.micro = per_rank // accum_steps
        self.num_micro = steps * accum_steps  # micro-batches of this process in the epoch
        self.rank_start = rank * steps * per_rank  # where this process's part of C begins
        # stream k serves micro-batches j = q * S + k; its part of C is contiguous
        counts = [len(range(k, self.num_micro, STREAMS_PER_RANK)) for k in range(STREAMS_PER_RANK)]
        self.stream_start = np.concatenate([[0], np.cumsum(counts)]) * self.micro
        # the selected in-shard positions of each shard (a split or subset selects some)
        ids = np.sort(np.asarray(source.items, dtype=np.int64))
        shard_of = np.searchsorted(source.offsets, ids, side="right") - 1
        self.selected = {int(s): ids[shard_of == s] - source.offsets[s] for s in np.unique(shard_of)}

    def __len__(self) -> int:
        return max(0, self.num_micro - self.start_step * self.accum_steps)

    def epoch_order(self) -> tuple[np.ndarray, np.ndarray]:
        """(shard order, cumulative sample counts) of this epoch's concatenation ``C``."""
        shards = np.array(sorted(self.selected), dtype=np.int64)
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        order = shards[torch.randperm(len(shards), generator=g).numpy()]
        sizes = np.array([len(self.selected[s]) for s in order], dtype=np.int64)
        return order, np.concatenate([[0], np.cumsum(sizes)])

    def shard_permutation(self, shard: int) -> np.ndarray:
        """The selected in-shard positions of ``shard`` in this epoch's order."""
        positions = self.selected[shard]
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, shard))
        return positions[torch.randperm(len(positions), generator=g).numpy()]

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        order, cum = self.epoch_order()
        streams = {}
        try:
            for j in range(self.start_step * self.accum_steps + worker, self.num_micro, self.workers):
                k, q = j % STREAMS_PER_RANK, j // STREAMS_PER_RANK
                if k not in streams:
                    start = self.rank_start + self.stream_start[k] + q * self.micro
                    end = self.rank_start + self.stream_start[k + 1]
                    streams[k] = self._stream(order, cum, int(start), int(end))
                yield collate([next(streams[k]) for _ in range(self.micro)])
        except DataError as err:
            if info is None:
                raise
            yield {"error": str(err)}  # raised by WorkerErrors in the main process

    def _stream(self, order: np.ndarray, cum: np.ndarray, start: int, end: int):
        """The prepared samples at positions [start, end) of ``C``, reading each shard once."""
        first = int(np.searchsorted(cum, start, side="right")) - 1
        for i in range(first, len(order)):
            lo, hi = max(start, cum[i]) - cum[i], min(end, cum[i + 1]) - cum[i]
            if lo >= hi:
                break
            shard = int(order[i])
            permuted = self.shard_permutation(shard)
            samples = self.source.read_shard(shard, set(permuted.tolist()))
            for n in range(int(lo), int(hi)):
                yield self._prepare(shard, samples, permuted, n)

    def _prepare(self, shard: int, samples: dict, permuted: np.ndarray, n: int) -> dict:
        """Sample ``n`` of the shard's epoch order; a broken one is replaced by the next readable one."""
        offset = int(self.source.offsets[shard])
        candidates = [int(permuted[(n + a) % len(permuted)]) for a in range(min(self.max_retries, len(permuted)))]
        (img, label), bad = first_readable(lambda p: (decode_image(samples[p]), sample_label(samples[p])),
                                           candidates, lambda p: self.source.describe_id(offset + p),
                                           f"check or rewrite the shard {self.source.shards[shard]}")
        return prepare_sample(img, label, bad, self.transform, self.masking_fn, self.seed, self.epoch,
                              offset + int(permuted[n]))


def read_index(path: Path) -> dict:
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read the shard index {str(path)!r} ({err}); delete it and index the shards "
                        "again with `mimaim shards index PATTERN`") from err
    if index.get("format") != 1 or "shards" not in index:
        raise DataError(f"{str(path)!r} is not a mimaim shard index (format 1 with a 'shards' list); move it "
                        "aside and index the shards with `mimaim shards index PATTERN`")
    return index


def build_shard_source(arg: str, progress: bool = True) -> ShardSource:
    """``wds:DIR`` (every shard of DIR/index.json) or ``wds:DIR/pattern-{000000..000009}.tar``; without an
    ``index.json`` the shards are scanned once (``index_shard_set``)."""
    path = Path(arg).expanduser()
    folder = path if path.is_dir() else path.parent
    index_path = folder / INDEX_NAME
    index = read_index(index_path) if index_path.is_file() else index_shard_set(arg, progress, first_read=True)[0]
    entries = {e["name"]: e for e in index["shards"]}
    names = list(entries) if path.is_dir() else [Path(p).name for p in braceexpand(str(path))]
    missing = [n for n in names if n not in entries]
    if missing:
        raise DataError(f"{len(missing)} shard(s) of {arg!r} are not listed in {index_path}, e.g. {missing[0]}; "
                        "check the brace pattern (e.g. train-{000000..000127}.tar) against the files, or delete "
                        f"{INDEX_NAME} and run `mimaim shards index PATTERN` over the whole set")
    counts = [int(entries[name]["num_samples"]) for name in names]
    if sum(counts) == 0:
        raise DataError(f"the shards of {arg!r} hold no samples with an image ({', '.join(IMAGE_FIELDS[:4])}, ...)")
    labels = [int(x) for name, n in zip(names, counts) for x in entries[name].get("labels") or [-1] * n]
    keys = [entries[name].get("keys") for name in names]
    return ShardSource(f"wds:{arg}", list(range(sum(counts))), labels, list(index.get("classes", [])), [],
                       [str(folder / name) for name in names], counts, None if None in keys else keys)


def shard_names(path: Path, arg: str) -> list[str]:
    """The shard file names of a brace pattern, or the tars of a folder; each must exist."""
    if path.is_dir():
        names = sorted(p.name for p in path.iterdir() if p.name.endswith(TAR_SUFFIXES) and p.is_file())
        if not names:
            raise DataError(f"no {INDEX_NAME} and no shards ({', '.join(TAR_SUFFIXES)}) in {arg!r}; write shards "
                            "with `mimaim shards imagefolder:PATH OUT`, or pass WebDataset tars as "
                            "DIR/train-{000000..000009}.tar")
        return names
    names = [Path(p).name for p in braceexpand(str(path))]
    missing = [n for n in names if not (path.parent / n).is_file()]
    if missing:
        raise DataError(f"{len(missing)} of the {len(names)} shard(s) of {arg!r} do not exist, e.g. "
                        f"{path.parent / missing[0]}; check the brace pattern against the files")
    return names


def index_shards(urls: list[str], source: str, progress: bool = True) -> dict:
    """Scan WebDataset tars once (any writer: ``mimaim shards``, ``webdataset.ShardWriter``, ...) -> the index
    ``write_shards`` writes: each shard's sample count, keys and ``cls`` labels (-1 where there is none)."""
    from tqdm.auto import tqdm

    entries = []
    for url in tqdm(urls, desc=f"indexing {len(urls)} shard(s)", unit="shard", disable=not progress):
        keys, labels = [], []
        for sample in shard_samples(url):
            keys.append(sample["__key__"])
            labels.append(sample_label(sample))
        entries.append({"name": Path(url).name, "num_samples": len(keys), "labels": labels, "keys": keys})
    labels = [x for e in entries for x in e["labels"]]
    return {"format": 1, "source": source, "classes": [str(c) for c in range(max(labels, default=-1) + 1)],
            "num_samples": len(labels), "shards": entries}


def index_shard_set(arg: str, progress: bool = True, first_read: bool = False) -> tuple[dict, str]:
    """Scan the shards of ``arg`` and write ``index.json`` beside them (``mimaim shards index``) -> (index, what
    was done). On first read (``--data wds:``) an unwritable folder keeps the index in memory, said on stderr."""
    path = Path(arg).expanduser()
    folder = path if path.is_dir() else path.parent
    if (folder / INDEX_NAME).exists():
        raise DataError(f"{str(folder / INDEX_NAME)!r} already exists; delete it to index the shards again")
    index = index_shards([str(folder / n) for n in shard_names(path, arg)], f"wds:{arg}", progress)
    labels = [x for e in index["shards"] for x in e["labels"]]
    unlabelled = sum(x < 0 for x in labels)
    done = (f"{len(labels)} samples in {len(index['shards'])} shard(s), " +
            (f"labels from `cls` ({len(index['classes'])} classes)" if not unlabelled else
             f"{unlabelled} without an integer `cls` (pre-training only: probes need labels)"))
    try:
        write_index(folder / INDEX_NAME, index)
        done += f"; wrote {folder / INDEX_NAME}"
    except OSError as err:
        if not first_read:
            raise
        done += (f"; kept the index in memory ({folder} is not writable: {err.strerror or err}), so every run "
                 "scans again; index the shards where you can write with `mimaim shards index`")
    if first_read:
        print(f"mimaim: no {INDEX_NAME} beside the shards: scanned {done}", file=sys.stderr)
    return index, done


def write_index(path: Path, index: dict) -> None:
    """Written atomically: a reader (another process of the run) sees the whole index or none."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(index))
    tmp.replace(path)


def write_shards(source: Source, out: str | Path, shard_size: int = 1000, prefix: str = "train", seed: int = 0,
                 progress: bool = True) -> dict:
    """Write ``source`` as WebDataset shards ``OUT/<prefix>-000000.tar``... plus ``OUT/index.json``, in an order
    shuffled once from ``seed``; files copied byte for byte (in-memory images as PNG), with ``cls`` and ``json``."""
    from tqdm.auto import tqdm

    if shard_size < 1:
        raise DataError(f"--shard-size must be at least 1, not {shard_size}")
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    if (out / INDEX_NAME).exists():
        raise DataError(f"{str(out / INDEX_NAME)!r} already exists; write the shards to a new folder")
    order = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed)).tolist()
    num_shards = math.ceil(len(source) / shard_size)
    width = max(6, len(str(num_shards - 1)))
    entries = []
    bar = tqdm(total=len(source), desc=f"writing {num_shards} shard(s)", unit="img", disable=not progress,
               mininterval=1.0)
    for s in range(num_shards):
        name = f"{prefix}-{s:0{width}d}.tar"
        part = order[s * shard_size:(s + 1) * shard_size]
        keys = [f"{s * shard_size + n:09d}" for n in range(len(part))]
        labels = [int(source.labels[i]) for i in part]
        with open(out / name, "wb") as f, TarWriter(f, encoder=False) as writer:
            for key, label, i in zip(keys, labels, part):
                writer.write(_shard_sample(source, i, key, label))
                bar.update(1)
        entries.append({"name": name, "num_samples": len(part), "labels": labels, "keys": keys})
    bar.close()
    index = {"format": 1, "source": source.name, "classes": list(source.classes), "seed": seed,
             "num_samples": len(source), "shards": entries}
    write_index(out / INDEX_NAME, index)
    return index


def _shard_sample(source: Source, i: int, key: str, label: int) -> dict:
    sample = {"__key__": key, "json": json.dumps({"path": source.describe(i), "label": label}).encode()}
    item = source.items[i]
    if isinstance(item, str):
        sample[Path(item).suffix.lower().lstrip(".") or "jpg"] = Path(item).read_bytes()
    else:
        buf = io.BytesIO()
        Image.fromarray(np.asarray(item)).save(buf, format="PNG")
        sample["png"] = buf.getvalue()
    if label >= 0:
        sample["cls"] = str(label).encode()
    return sample
