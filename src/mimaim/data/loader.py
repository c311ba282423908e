"""Deterministic, resumable, data-parallel loading of a :class:`Source`: the split is shuffled from (seed,
epoch) and cut into global (optimiser) batches, each rank reading its share as micro-batches, so starting
at any step is index arithmetic; every sample's augmentation and masking is seeded from (seed, epoch,
index), whatever the batch, worker or process count; an unreadable image is replaced by the next readable
one and reported with the batch, for the engine to warn, count and stop if too many fail.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .base import DataError, Source


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 1_000_033 + index) % (2**63 - 1)


class PretrainDataset(Dataset):
    """Yields dicts: image (3, H, W), label, masking (objective-specific), bad (list of paths)."""

    def __init__(self, source: Source, transform: Callable, masking_fn: Callable | None, seed: int,
                 max_retries: int = 16):
        self.source, self.transform, self.masking_fn = source, transform, masking_fn
        self.seed, self.max_retries = seed, max_retries

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        candidates = [(index + attempt) % len(self.source) for attempt in range(self.max_retries)]
        (img, label), bad = first_readable(lambda i: (self.source.load(i), self.source.labels[i]), candidates,
                                           self.source.describe, "check the data folder")
        return prepare_sample(img, label, bad, self.transform, self.masking_fn, self.seed, epoch, index)


def first_readable(read: Callable, candidates: list[int], describe: Callable[[int], str], hint: str):
    """``(read(c), bad)`` for the first candidate ``c`` that reads; ``bad`` names the first (the sample's own)
    if it failed, and nothing else, so a broken image is counted once, not again as another's replacement."""
    for attempt, c in enumerate(candidates):
        try:
            return read(c), [describe(candidates[0])] if attempt else []
        except Exception:  # noqa: BLE001 - reported to the engine, which warns and counts
            continue
    raise DataError(f"{len(candidates)} consecutive images could not be read, starting at "
                    f"{describe(candidates[0])}; {hint}")


def prepare_sample(img, label: int, bad: list, transform: Callable, masking_fn: Callable | None, seed: int,
                   epoch: int, index: int) -> dict:
    """One sample's dict, its crop and mask drawn from (seed, epoch, index) only."""
    seed = sample_seed(seed, epoch, index)
    with torch.random.fork_rng(devices=[]):
        # the CPU generator only: torch.manual_seed also queues a seed for every lazily
        # initialised accelerator, recording a stack trace each time (a fifth of the loader's time)
        torch.random.default_generator.manual_seed(seed)
        image = transform(img)
    masking = None
    if masking_fn is not None:
        masking = masking_fn(torch.Generator().manual_seed(seed ^ 0x5DEECE66D))
    return {"image": image, "label": label, "masking": masking, "bad": bad}


def collate(samples: list[dict]) -> dict:
    maskings = [s["masking"] for s in samples]
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "label": torch.tensor([s["label"] for s in samples]),
        "bad": [path for s in samples for path in s["bad"]],
        "masking": None if maskings[0] is None else torch.stack(maskings),
    }


def steps_per_epoch(num_samples: int, batch_size: int, accum_steps: int = 1, world_size: int = 1) -> int:
    """Optimiser steps in one epoch: whole global batches only (drop_last, as MAE); the batch must split
    evenly into processes x accumulation steps and fit in the data."""
    if batch_size % (world_size * accum_steps):
        raise ValueError(f"batch size {batch_size} must be divisible by processes x accumulation steps "
                         f"({world_size} x {accum_steps})")
    if batch_size > num_samples:
        raise ValueError(f"batch size {batch_size} is larger than the {num_samples} training images; "
                         "lower --batch-size")
    return num_samples // batch_size


class GlobalBatchSampler(Sampler):
    """Yields this rank's micro-batches of (epoch, index) keys, starting at ``start_step``."""

    def __init__(self, num_samples: int, batch_size: int, accum_steps: int = 1, rank: int = 0,
                 world_size: int = 1, seed: int = 0, epoch: int = 0, start_step: int = 0):
        self.steps = steps_per_epoch(num_samples, batch_size, accum_steps, world_size)  # validates the shape
        self.num_samples, self.batch_size, self.accum_steps, self.rank = num_samples, batch_size, accum_steps, rank
        self.per_rank = batch_size // world_size
        self.micro = self.per_rank // accum_steps
        self.seed, self.epoch, self.start_step = seed, epoch, start_step

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.accum_steps

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        order = torch.randperm(self.num_samples, generator=g).tolist()
        for step in range(self.start_step, self.steps):
            global_batch = order[step * self.batch_size:(step + 1) * self.batch_size]
            mine = global_batch[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]
            for a in range(self.accum_steps):
                yield [(self.epoch, i) for i in mine[a * self.micro:(a + 1) * self.micro]]


def make_epoch_loader(train: Source, transform: Callable, masking_fn: Callable | None, *, seed: int, epoch: int,
                      start_step: int = 0, batch_size: int, accum_steps: int = 1, rank: int = 0,
                      world_size: int = 1, num_workers: int = 0, pin_memory: bool = False):
    """This rank's micro-batches of one epoch from optimiser step ``start_step``: dicts of ``image`` (micro, 3,
    H, W), ``masking`` (or None), ``label`` and ``bad``. A streamed source (``wds:``) builds its own loader
    (``train.epoch_loader``) with the same guarantees."""
    if hasattr(train, "epoch_loader"):
        return train.epoch_loader(transform, masking_fn, seed=seed, epoch=epoch, start_step=start_step,
                                  batch_size=batch_size, accum_steps=accum_steps, rank=rank,
                                  world_size=world_size, num_workers=num_workers, pin_memory=pin_memory)
    dataset = PretrainDataset(train, transform, masking_fn, seed)
    sampler = GlobalBatchSampler(len(train), batch_size, accum_steps, rank, world_size, seed, epoch, start_step)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate,
                      pin_memory=pin_memory, prefetch_factor=4 if num_workers > 0 else None)
