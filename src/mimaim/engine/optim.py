"""AdamW parameter groups and the learning-rate schedules: ``cosine`` (MAE's ``util/lr_sched.py``) and
``multistep`` (SimMIM's ``MultiStepLRScheduler``: warm-up, flat, x ``gamma`` per milestone); docs/methods.md 1.
"""

from __future__ import annotations

import bisect
import math

import torch
from torch import nn


def param_groups_weight_decay(model: nn.Module, weight_decay: float, no_decay_names: set[str] = frozenset()):
    """Two groups: decayed weights, and biases / norms / 1-D params / named special tokens undecayed."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or name in no_decay_names:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
            {"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95),
                    no_decay_names: set[str] = frozenset()) -> torch.optim.Optimizer:
    groups = [g for g in param_groups_weight_decay(model, weight_decay, no_decay_names) if g["params"]]
    # the fused kernel is ~3x faster than the per-parameter loop on CPU as well as on CUDA
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=True)


def cosine_lr(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """Linear warm-up from 0, then half-cosine to ``min_lr``; ``epoch`` is fractional (per step)."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-8)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


SCHEDULES = ("cosine", "multistep")


def lr_at(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float,
          schedule: str = "cosine", milestones=(), gamma: float = 0.1) -> float:
    """The learning rate at fractional ``epoch`` (once per optimiser step). ``multistep`` multiplies
    ``lr`` by ``gamma`` for every milestone reached (``bisect_right``, as SimMIM); ``min_lr`` is unused there."""
    if schedule == "cosine":
        return cosine_lr(epoch, lr, min_lr, warmup_epochs, epochs)
    if schedule != "multistep":
        raise ValueError(f"unknown schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    milestones = sorted(float(m) for m in milestones)
    if not milestones:
        raise ValueError("schedule 'multistep' needs milestones (epochs at which the lr is multiplied by "
                         "gamma), e.g. --milestones 700 for SimMIM's 800-epoch recipe")
    if milestones[0] < warmup_epochs:
        raise ValueError(f"first milestone {milestones[0]:g} falls inside the warm-up ({warmup_epochs:g} epochs); "
                         "move it after the warm-up (SimMIM asserts the same)")
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    return lr * gamma ** bisect.bisect_right(milestones, epoch)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
