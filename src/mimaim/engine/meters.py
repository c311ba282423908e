"""Bookkeeping beside the training loop: progress bar, skipped-image counts, the logging window.

Off the hot path: the loop adds detached loss tensors; ``LogWindow.flush`` syncs once per log line."""

from __future__ import annotations

import sys
import time

import torch
import torch.distributed as dist

from .distributed import DistInfo


class Progress:
    """A tqdm bar on rank 0 when asked for, else plain lines; ``say`` prints above the bar."""

    def __init__(self, info: DistInfo, enabled: bool, total: int, initial: int, desc: str):
        self.info, self.bar = info, None
        if info.is_main and enabled:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                            mininterval=0.5)

    def say(self, msg: str) -> None:
        if not self.info.is_main:
            return
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class BadImages:
    """Counts images the loader could not read; warns about the first 20 (by path)."""

    def __init__(self, progress: Progress, limit: int = 20):
        self.progress, self.limit = progress, limit
        self.warned: set[str] = set()
        self.bad = self.seen = 0

    def add(self, batch: dict) -> None:
        self.seen += batch["image"].shape[0]
        for path in batch["bad"]:
            self.bad += 1
            if path not in self.warned and len(self.warned) < self.limit:
                self.warned.add(path)
                self.progress.say(f"warning: skipping unreadable image {path}")


class LogWindow:
    """Loss and images/s over the optimiser steps since the last log line."""

    def __init__(self, device: torch.device, batch_size: int):
        self.device, self.batch_size = device, batch_size
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.steps, self.t0 = 0, time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss
        self.steps += 1

    def flush(self, info: DistInfo, bad: BadImages) -> dict:
        """Mean loss (over processes), images/s, and skipped/seen totals: one sync, one all_reduce."""
        elapsed = time.perf_counter() - self.t0
        t = torch.stack([self.loss_sum.double(), torch.tensor(float(bad.bad), device=self.device, dtype=torch.float64),
                         torch.tensor(float(bad.seen), device=self.device, dtype=torch.float64)])
        if info.enabled:
            dist.all_reduce(t)
        loss_sum, total_bad, total_seen = t.tolist()
        row = {"loss": loss_sum / max(self.steps, 1) / info.world_size,
               "images_per_s": self.steps * self.batch_size / max(elapsed, 1e-9),
               "bad": int(total_bad), "seen": int(total_seen)}
        self.reset()
        return row
