"""WebDataset shards: data larger than memory, streamed from tar files.

``--data wds:/data/shards/train-{000000..000127}.tar`` (or ``wds:/data/shards``, every shard
its ``index.json`` lists) reads tars in the WebDataset format (members ``<key>.<field>``
grouped into samples by key: ``000001234.jpg``, ``000001234.cls``). ``write_shards`` (the
``mimaim shards`` command) writes them with an ``index.json`` of each shard's sample count and
labels, so the epoch length and the probes' splits are known without opening a tar.

The ``webdataset`` package writes and reads the tars (``TarWriter``, ``tarfile_samples``; local
paths, ``pipe:`` and URLs). Its pipeline (``split_by_node``, ``split_by_worker``, a shuffle
buffer) gives neither exactly-once epochs when shards do not divide evenly over processes x
workers nor a resume inside an epoch, so the order is computed here:

* The epoch order is a function of (seed, epoch): shards are permuted, then the samples
  inside each shard; the concatenation ``C`` is cut, as for folders, into global batches.
* Each process reads a contiguous ``1/world_size`` of ``C``, split into ``STREAMS_PER_RANK``
  contiguous streams; micro-batch ``j`` comes from stream ``j % STREAMS_PER_RANK``. A loader
  worker serves a fixed set of streams, so the batches do not depend on the number of
  workers (1, 2, 4 or 8; others round down). Every sample is read once per epoch.
* Resuming at step ``s`` is index arithmetic: a stream skips the shards it has finished
  without opening them and starts inside the current one on the very next sample.
* A stream holds its current shard's encoded bytes (to shuffle inside it): pick
  ``--shard-size`` so that ``STREAMS_PER_RANK`` shards fit (1,000 ImageNet JPEGs: ~110 MB).
* An unreadable sample is replaced by the next readable one of the same shard (its crop and
  mask still drawn from the broken sample's seed) and reported in the batch's ``bad`` list.

The index must be a local file beside the shards.
"""

from __future__ import annotations

import io
import json
import math
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
from .loader import collate, prepare_sample, sample_seed, steps_per_epoch

INDEX_NAME = "index.json"
STREAMS_PER_RANK = 8
IMAGE_FIELDS = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)


def shard_samples(url: str):
    """The samples of one shard in order, as webdataset groups them: ``{"__key__", field: bytes}``."""
    try:
        yield from tarfile_samples([{"url": url}])
    except tarfile.ReadError as err:
        raise ValueError(f"{url} is not a valid tar file ({err.args[0]}); rewrite the shard") from None


def decode_image(sample: dict) -> Image.Image:
    for name in IMAGE_FIELDS:
        if name in sample:
            with Image.open(io.BytesIO(sample[name])) as img:
                return img.convert("RGB")  # forces the decode, so a truncated file fails here
    raise ValueError(f"no image field ({', '.join(IMAGE_FIELDS[:4])}, ...) in sample fields {sorted(sample)}")


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
            self._last = (shard, list(shard_samples(self.shards[shard])))
        return decode_image(self._last[1][pos])

    def epoch_loader(self, transform, masking_fn, *, seed, epoch, start_step, batch_size, accum_steps, rank,
                     world_size, num_workers, pin_memory):
        steps = steps_per_epoch(len(self), batch_size, accum_steps, world_size)
        workers = max(d for d in (1, 2, 4, 8) if d <= max(1, num_workers))  # each divides STREAMS_PER_RANK
        dataset = ShardEpoch(self, transform, masking_fn, seed=seed, epoch=epoch, start_step=start_step,
                             steps=steps, batch_size=batch_size, accum_steps=accum_steps, rank=rank,
                             world_size=world_size, workers=workers)
        return DataLoader(dataset, batch_size=None, num_workers=workers if num_workers > 0 else 0,
                          pin_memory=pin_memory, prefetch_factor=4 if num_workers > 0 else None)


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
        for j in range(self.start_step * self.accum_steps + worker, self.num_micro, self.workers):
            k, q = j % STREAMS_PER_RANK, j // STREAMS_PER_RANK
            if k not in streams:
                start = self.rank_start + self.stream_start[k] + q * self.micro
                end = self.rank_start + self.stream_start[k + 1]
                streams[k] = self._stream(order, cum, int(start), int(end))
            yield collate([next(streams[k]) for _ in range(self.micro)])

    def _stream(self, order: np.ndarray, cum: np.ndarray, start: int, end: int):
        """The prepared samples at positions [start, end) of ``C``, reading each shard once."""
        first = int(np.searchsorted(cum, start, side="right")) - 1
        for i in range(first, len(order)):
            lo, hi = max(start, cum[i]) - cum[i], min(end, cum[i + 1]) - cum[i]
            if lo >= hi:
                break
            shard = int(order[i])
            permuted = self.shard_permutation(shard)
            wanted = set(permuted.tolist())
            samples = {pos: s for pos, s in enumerate(shard_samples(self.source.shards[shard])) if pos in wanted}
            for n in range(int(lo), int(hi)):
                yield self._prepare(shard, samples, permuted, n)

    def _prepare(self, shard: int, samples: dict, permuted: np.ndarray, n: int) -> dict:
        """Sample ``n`` of the shard's epoch order; a broken one is replaced by the next readable one."""
        offset = int(self.source.offsets[shard])
        bad = []
        for attempt in range(min(self.max_retries, len(permuted))):
            p = int(permuted[(n + attempt) % len(permuted)])
            try:
                img = decode_image(samples[p])
                label = int(samples[p]["cls"]) if "cls" in samples[p] else -1
                break
            except Exception:  # noqa: BLE001 - reported to the engine, which warns and counts
                bad.append(self.source.describe_id(offset + p))
        else:
            raise RuntimeError(f"{len(bad)} consecutive samples could not be read in shard "
                               f"{self.source.shards[shard]}, starting at {bad[0]}; check or rewrite the shard")
        return prepare_sample(img, label, bad, self.transform, self.masking_fn, self.seed, self.epoch,
                              offset + int(permuted[n]))


def read_index(path: Path) -> dict:
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read the shard index {str(path)!r} ({err}); write shards with "
                        "`mimaim shards imagefolder:PATH OUT`, which writes index.json beside them") from err
    if index.get("format") != 1 or "shards" not in index:
        raise DataError(f"{str(path)!r} is not a mimaim shard index (format 1 with a 'shards' list)")
    return index


def build_shard_source(arg: str) -> ShardSource:
    """``wds:DIR`` (every shard of DIR/index.json) or ``wds:DIR/pattern-{000000..000009}.tar``."""
    path = Path(arg).expanduser()
    folder = path if path.is_dir() else path.parent
    index_path = folder / INDEX_NAME
    if not index_path.is_file():
        raise DataError(f"no {INDEX_NAME} in {str(folder)!r} beside the shards; the loader needs each shard's "
                        "sample count: write shards with `mimaim shards imagefolder:PATH OUT`, or pass the "
                        "folder that holds both")
    index = read_index(index_path)
    entries = {e["name"]: e for e in index["shards"]}
    names = list(entries) if path.is_dir() else [Path(p).name for p in braceexpand(str(path))]
    missing = [n for n in names if n not in entries]
    if missing:
        raise DataError(f"{len(missing)} shard(s) of {arg!r} are not listed in {index_path}, e.g. {missing[0]}; "
                        "check the brace pattern (e.g. train-{000000..000127}.tar) against the files")
    if not names:
        raise DataError(f"{arg!r} names no shards")
    counts = [int(entries[name]["num_samples"]) for name in names]
    if sum(counts) == 0:
        raise DataError(f"the shards of {arg!r} hold no samples")
    labels = [int(x) for name, n in zip(names, counts) for x in entries[name].get("labels") or [-1] * n]
    keys = [entries[name].get("keys") for name in names]
    return ShardSource(f"wds:{arg}", list(range(sum(counts))), labels, list(index.get("classes", [])), [],
                       [str(folder / name) for name in names], counts, None if None in keys else keys)


def write_shards(source: Source, out: str | Path, shard_size: int = 1000, prefix: str = "train", seed: int = 0,
                 progress: bool = True) -> dict:
    """Write ``source`` as WebDataset shards ``OUT/<prefix>-000000.tar``... plus ``OUT/index.json``.

    Samples are written in an order shuffled once from ``seed`` (so a shard mixes classes);
    image files are copied byte for byte (in-memory images are encoded as PNG); each
    sample carries ``cls`` (class index, when labelled) and ``json`` (source path, label).
    """
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
    tmp = out / (INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps(index))
    tmp.replace(out / INDEX_NAME)
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
