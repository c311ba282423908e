"""The data side of a run: the objective's augmentation, k views per image, one epoch's loader."""

from __future__ import annotations

import os
from dataclasses import replace

import torch

from ..data import make_epoch_loader, pretrain_transform


class MultiView:
    """``num_views`` draws of ``transform`` from the same image -> (k, 3, H, W); a batch is (B, k, 3, H, W)."""

    def __init__(self, transform, num_views: int):
        self.transform, self.num_views = transform, num_views

    def __call__(self, img) -> torch.Tensor:
        return torch.stack([self.transform(img) for _ in range(self.num_views)])


def build_transform(objective, cfg):
    """The objective's paper augmentation (``cfg.augmentation`` overrides fields), ``num_views`` times."""
    aug = objective.augmentation
    if cfg.augmentation:  # e.g. one crop scale for every objective in a comparison
        aug = replace(aug, **cfg.augmentation)  # Augmentation turns YAML lists into tuples
    transform = pretrain_transform(cfg.img_size, aug)
    return MultiView(transform, objective.num_views) if objective.num_views > 1 else transform


def default_num_workers(cfg, in_memory: bool) -> int:
    if cfg.num_workers >= 0:
        return cfg.num_workers
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_proc = max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if per_proc <= 2:
        # On a 2-core machine a worker competes with the model for the same cores; decoded
        # in-memory data is cheap enough to prepare in the main process.
        return 0 if in_memory else 1
    return min(8, per_proc - 1)


def epoch_loader(train, transform, objective, cfg, info, epoch: int, start_step: int, num_workers: int,
                 device: torch.device):
    """This rank's micro-batches of ``epoch`` from optimiser step ``start_step``."""
    return make_epoch_loader(train, transform, objective.sample_masking, seed=cfg.seed, epoch=epoch,
                             start_step=start_step, batch_size=cfg.batch_size, accum_steps=cfg.accum_steps,
                             rank=info.rank, world_size=info.world_size, num_workers=num_workers,
                             pin_memory=device.type == "cuda")
