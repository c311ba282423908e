"""WebDataset shards: data larger than memory, streamed from tar files.

``--data wds:/data/shards/train-{000000..000127}.tar`` (or ``wds:/data/shards``, every
shard its ``index.json`` lists) reads shards in the WebDataset format: plain tar files
whose members ``<key>.<field>`` are grouped into samples by key (``000001234.jpg``,
``000001234.cls``, ``000001234.json``). ``mimaim shards imagefolder:PATH OUT`` writes them
(:mod:`mimaim.data.commands`), with an ``index.json`` that lists each shard's sample
count and labels, so the loader knows the epoch length and the probes' splits without
opening a tar.

Why the ``webdataset`` package, and only its format layer: it is the format's reference
implementation (timm and open_clip read the same tars), and its ``TarWriter`` and
``tarfile_samples`` write and parse the tars (local paths, ``pipe:`` and URLs through its
``gopen``). Its pipeline (``shardshuffle``, ``split_by_node``, ``split_by_worker``, a
shuffle buffer) gives neither exactly-once epochs when shards do not divide evenly over
processes x workers, nor a resume in the middle of an epoch, so the order is computed here:

* The epoch order is a function of (seed, epoch) and the number of processes: shards are
  permuted, then the samples inside each shard, and the concatenation ``C`` is cut, as
  for folders, into ``steps_per_epoch`` global batches (the remainder is dropped).
* Each process reads a contiguous ``1/world_size`` of ``C`` and splits it further into
  ``STREAMS_PER_RANK`` contiguous streams; micro-batch ``j`` of a process comes from stream
  ``j % STREAMS_PER_RANK``. A loader worker serves a fixed set of streams, and PyTorch's
  DataLoader hands out workers' batches in turn, so the batches a process sees do not
  depend on the number of workers (1, 2, 4 or 8 are used; others round down to one of
  these). Every sample is read exactly once per epoch over all processes and workers.
* Resuming at step ``s`` is index arithmetic: each stream skips the shards it has finished
  without opening them and starts inside the current one on the very next sample.
* A stream holds the bytes of its current shard (to shuffle inside it), so a process holds
  up to ``STREAMS_PER_RANK`` shards' (encoded) bytes: pick ``--shard-size`` so that fits (1,000
  ImageNet JPEGs are about 110 MB). Two streams that meet inside a shard both read it:
  at most one extra shard read per stream and epoch.
* An unreadable sample is replaced by the next readable one of the same shard (its crop
  and mask still drawn from the broken sample's seed) and reported in the batch's
  ``bad`` list, exactly as for folders.

Every sample's crop and mask are drawn from (seed, epoch, sample key), as for folders.
Limitations: the index must be a local file beside the shards (the shards may be any
path ``webdataset`` opens); ``load(i)``, used by probes for the held-out split, opens
local tars only.
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
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .loader import collate, prepare_sample, steps_per_epoch
from .sources import IMAGE_EXTENSIONS, DataError, Source

INDEX_NAME = "index.json"
STREAMS_PER_RANK = 8
IMAGE_FIELDS = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)


@dataclass
class ShardSource(Source):
    """A :class:`Source` over WebDataset shards; ``items`` are global sample ids (write order).

    ``split`` / ``subset`` / ``has_labels`` / ``classes`` work as for folders (they only
    read the index); ``load(i)`` opens the tar (local shards)."""

    shards: list[str] = field(default_factory=list)  # paths or URLs, in index order
    counts: list[int] = field(default_factory=list)  # samples per shard
    keys: list[list[str]] | None = None  # per shard, the sample keys (None: not listed in the index)
    _members: dict = field(default_factory=dict, repr=False)  # shard -> {pos: {field: TarInfo}}, for load()

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
        return self._describe_id(self.items[index])

    def _describe_id(self, sample_id: int) -> str:
        shard, pos = self.locate(sample_id)
        key = self.keys[shard][pos] if self.keys else f"#{pos}"
        return f"{self.shards[shard]}:{key}"

    def load(self, index: int) -> Image.Image:
        shard, pos = self.locate(self.items[index])
        if shard not in self._members:
            path = self.shards[shard]
            if not Path(path).is_file():
                raise DataError(f"cannot open shard {path!r} for random access (probes read the held-out split "
                                "image by image); copy the shards to a local folder")
            with tarfile.open(path) as tar:
                self._members[shard] = [s for s in _group_members(tar.getmembers())]
        members = self._members[shard][pos]
        with tarfile.open(self.shards[shard]) as tar:
            sample = {name: tar.extractfile(info).read() for name, info in members.items()}
        return decode_image(sample)

    def epoch_loader(self, transform, masking_fn, *, seed, epoch, start_step, batch_size, accum_steps, rank,
                     world_size, num_workers, pin_memory):
        steps = steps_per_epoch(len(self), batch_size, accum_steps, world_size)
        workers = max(d for d in (1, 2, 4, 8) if d <= max(1, num_workers) and STREAMS_PER_RANK % d == 0)
        dataset = ShardEpoch(self, transform, masking_fn, seed=seed, epoch=epoch, start_step=start_step,
                             steps=steps, batch_size=batch_size, accum_steps=accum_steps, rank=rank,
                             world_size=world_size, workers=workers)
        return DataLoader(dataset, batch_size=None, num_workers=workers if num_workers > 0 else 0,
                          pin_memory=pin_memory, prefetch_factor=4 if num_workers > 0 else None)


def _group_members(members) -> list[dict]:
    """Tar members grouped into samples by key (the name up to the first dot of its base name), in order."""
    samples, last = [], None
    for info in members:
        if not info.isreg():
            continue
        key, _, ext = info.name.partition(".") if "/" not in info.name else _split_key(info.name)
        if key != last:
            samples.append({})
            last = key
        samples[-1][ext.lower()] = info
    return samples


def _split_key(name: str) -> tuple[str, str, str]:
    head, _, base = name.rpartition("/")
    key, dot, ext = base.partition(".")
    return f"{head}/{key}", dot, ext


def decode_image(sample: dict) -> Image.Image:
    for name in IMAGE_FIELDS:
        if name in sample:
            with Image.open(io.BytesIO(sample[name])) as img:
                return img.convert("RGB")  # forces the decode, so a truncated file fails here
    raise ValueError(f"no image field ({', '.join(IMAGE_FIELDS[:4])}, ...) in sample fields {sorted(sample)}")


def epoch_order(source: ShardSource, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(shard order, cumulative sample counts) of this epoch's concatenation ``C``."""
    selected = _selected_positions(source)
    shards = np.array(sorted(selected), dtype=np.int64)
    g = torch.Generator().manual_seed(seed * 7919 + epoch)
    order = shards[torch.randperm(len(shards), generator=g).numpy()]
    sizes = np.array([len(selected[s]) for s in order], dtype=np.int64)
    return order, np.concatenate([[0], np.cumsum(sizes)])


def shard_permutation(source: ShardSource, shard: int, seed: int, epoch: int) -> np.ndarray:
    """The selected in-shard positions of ``shard`` in this epoch's order."""
    positions = _selected_positions(source)[shard]
    g = torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_033 + shard) % (2**63 - 1))
    return positions[torch.randperm(len(positions), generator=g).numpy()]


def _selected_positions(source: ShardSource) -> dict[int, np.ndarray]:
    cached = getattr(source, "_selected", None)
    if cached is None:
        ids = np.sort(np.asarray(source.items, dtype=np.int64))
        shard_of = np.searchsorted(source.offsets, ids, side="right") - 1
        cached = {}
        for shard in np.unique(shard_of):
            cached[int(shard)] = ids[shard_of == shard] - source.offsets[shard]
        source._selected = cached
    return cached


class ShardEpoch(IterableDataset):
    """One process's micro-batches of one epoch (already collated), for one or more workers."""

    def __init__(self, source: ShardSource, transform: Callable, masking_fn: Callable | None, *, seed: int,
                 epoch: int, start_step: int, steps: int, batch_size: int, accum_steps: int, rank: int,
                 world_size: int, workers: int, max_retries: int = 16):
        self.source, self.transform, self.masking_fn = source, transform, masking_fn
        self.seed, self.epoch, self.start_step, self.steps = seed, epoch, start_step, steps
        self.accum_steps, self.rank, self.workers, self.max_retries = accum_steps, rank, workers, max_retries
        self.per_rank = batch_size // world_size
        self.micro = self.per_rank // accum_steps
        self.num_micro = steps * accum_steps  # micro-batches of this process in the epoch
        self.rank_start = rank * steps * self.per_rank  # where this process's part of C begins
        # stream k serves micro-batches j = q * S + k; its part of C is contiguous
        counts = [len(range(k, self.num_micro, STREAMS_PER_RANK)) for k in range(STREAMS_PER_RANK)]
        self.stream_start = np.concatenate([[0], np.cumsum(counts)]) * self.micro

    def __len__(self) -> int:
        return max(0, self.num_micro - self.start_step * self.accum_steps)

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        first = self.start_step * self.accum_steps
        order, cum = epoch_order(self.source, self.seed, self.epoch)
        streams: dict[int, object] = {}
        for j in range(first + worker, self.num_micro, self.workers):
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
            permuted = shard_permutation(self.source, shard, self.seed, self.epoch)
            samples = self._read(shard, set(int(p) for p in permuted))
            for n in range(int(lo), int(hi)):
                yield self._prepare(shard, samples, permuted, n)

    def _read(self, shard: int, positions: set[int]) -> dict[int, dict]:
        out = {}
        for pos, sample in enumerate(shard_samples(self.source.shards[shard])):
            if pos in positions:
                out[pos] = sample
        return out

    def _prepare(self, shard: int, samples: dict, permuted: np.ndarray, n: int) -> dict:
        """Sample ``n`` of the shard's epoch order; a broken one is replaced by the next readable one."""
        sample_id = int(self.source.offsets[shard] + permuted[n])
        bad = []
        for attempt in range(min(self.max_retries, len(permuted))):
            p = int(permuted[(n + attempt) % len(permuted)])
            try:
                img = decode_image(samples[p])
                label = int(samples[p]["cls"]) if "cls" in samples[p] else -1
                break
            except Exception:  # noqa: BLE001 - reported to the engine, which warns and counts
                bad.append(self.source._describe_id(int(self.source.offsets[shard] + p)))
        else:
            raise RuntimeError(f"{len(bad)} consecutive samples could not be read in shard "
                               f"{self.source.shards[shard]}, starting at {bad[0]}; check or rewrite the shard")
        return prepare_sample(img, label, bad, self.transform, self.masking_fn, self.seed, self.epoch, sample_id)


def shard_samples(url: str):
    """The samples of one shard in order, as dicts ``{"__key__", field: bytes}``.

    A local uncompressed or gzipped tar is parsed here from its bytes: Python's ``tarfile``,
    which ``webdataset`` streams through, costs about as much per member as decoding a
    32-px JPEG (on 2 busy cores a CIFAR shard streamed at 220 images/s against 362 from
    the folder). Anything else (``pipe:``, URLs) is read by ``webdataset.tarfile_samples``.
    Both group members into samples the same way (tests/test_shards.py checks it)."""
    path = Path(url)
    if not path.is_file():
        from webdataset.tariterators import tarfile_samples

        yield from tarfile_samples([{"url": url}])
        return
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        import gzip

        data = gzip.decompress(data)
    yield from _tar_samples(data, url)


def _tar_samples(data: bytes, url: str):
    """Group the regular files of a tar (ustar, pax or GNU long names) by key, as webdataset does."""
    pos, long_name, sample = 0, None, None
    while pos + 512 <= len(data):
        header = data[pos:pos + 512]
        if header == bytes(512):
            break  # end-of-archive blocks
        try:
            valid = sum(header[:148]) + 256 + sum(header[156:]) == _octal(header[148:156])
            size, flag = _octal(header[124:136]), header[156:157]
        except ValueError:
            valid = False
        if not valid:
            raise ValueError(f"{url} is not a valid tar file (bad header at byte {pos}); rewrite the shard")
        start = pos + 512
        pos = start + (size + 511) // 512 * 512
        body = data[start:start + size]
        if flag == b"L":  # GNU long name of the next member
            long_name = body.rstrip(b"\0").decode()
            continue
        if flag == b"x":  # pax header: its path= record names the next member
            for record in body.decode().splitlines():
                _, _, kv = record.partition(" ")
                if kv.startswith("path="):
                    long_name = kv[len("path="):]
            continue
        if flag not in (b"0", b"\0", b"7"):
            long_name = None if flag != b"g" else long_name
            continue  # directories, links, global headers
        name = long_name or _header_name(header)
        long_name = None
        head, _, base = name.rpartition("/")
        if base.startswith("__") or "." not in base:
            continue  # webdataset's meta files and names without a field
        stem, _, field = base.partition(".")
        key = f"{head}/{stem}" if head else stem
        if sample is None or sample["__key__"] != key:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": url}
        sample[field.lower()] = body
    if sample is not None:
        yield sample


def _octal(field: bytes) -> int:
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _header_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0].decode()
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0].decode()
        if prefix:
            name = f"{prefix}/{name}"
    return name


def expand_shards(pattern: str) -> list[str]:
    from braceexpand import braceexpand

    return list(braceexpand(pattern))


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
    if path.is_dir():
        folder, wanted = path, None
    else:
        folder = path.parent
        wanted = [Path(p).name for p in expand_shards(str(path))]
    index_path = folder / INDEX_NAME
    if not index_path.is_file():
        raise DataError(f"no {INDEX_NAME} in {str(folder)!r} beside the shards; the loader needs each shard's "
                        "sample count: write shards with `mimaim shards imagefolder:PATH OUT`, or pass the "
                        "folder that holds both")
    index = read_index(index_path)
    entries = {e["name"]: e for e in index["shards"]}
    names = list(entries) if wanted is None else wanted
    missing = [n for n in names if n not in entries]
    if missing:
        raise DataError(f"{len(missing)} shard(s) of {arg!r} are not listed in {index_path}, e.g. {missing[0]}; "
                        "check the brace pattern (e.g. train-{000000..000127}.tar) against the files")
    if not names:
        raise DataError(f"{arg!r} names no shards")
    shards, counts, labels, keys = [], [], [], []
    for name in names:
        entry = entries[name]
        shards.append(str(folder / name))
        counts.append(int(entry["num_samples"]))
        labels.extend(entry.get("labels") or [-1] * entry["num_samples"])
        keys.append(entry.get("keys"))
    total = sum(counts)
    if total == 0:
        raise DataError(f"the shards of {arg!r} hold no samples")
    return ShardSource(f"wds:{arg}", list(range(total)), [int(x) for x in labels], list(index.get("classes", [])),
                       [], shards, counts, keys if all(k is not None for k in keys) else None)


def write_shards(source: Source, out: str | Path, shard_size: int = 1000, prefix: str = "train", seed: int = 0,
                 progress: bool = True) -> dict:
    """Write ``source`` as WebDataset shards ``OUT/<prefix>-000000.tar``... plus ``OUT/index.json``.

    Samples are written in an order shuffled once from ``seed`` (so a shard mixes classes);
    image files are copied byte for byte (in-memory images are encoded as PNG); each
    sample carries ``cls`` (class index, when labelled) and ``json`` (source path, label).
    """
    from tqdm.auto import tqdm
    from webdataset import TarWriter

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
        keys, labels = [], []
        with open(out / name, "wb") as f, TarWriter(f, encoder=False) as writer:
            for n, i in enumerate(part):
                key = f"{s * shard_size + n:09d}"
                label = int(source.labels[i])
                sample = {"__key__": key, "json": json.dumps({"path": source.describe(i), "label": label}).encode()}
                item = source.items[i]
                if isinstance(item, str):
                    ext = Path(item).suffix.lower().lstrip(".") or "jpg"
                    sample[ext] = Path(item).read_bytes()
                else:
                    buf = io.BytesIO()
                    Image.fromarray(np.asarray(item)).save(buf, format="PNG")
                    sample["png"] = buf.getvalue()
                if label >= 0:
                    sample["cls"] = str(label).encode()
                writer.write(sample)
                keys.append(key)
                labels.append(label)
                bar.update(1)
        entries.append({"name": name, "num_samples": len(part), "labels": labels, "keys": keys})
    bar.close()
    index = {"format": 1, "source": source.name, "classes": list(source.classes), "seed": seed,
             "num_samples": len(source), "shards": entries}
    tmp = out / (INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps(index))
    tmp.replace(out / INDEX_NAME)
    return index
