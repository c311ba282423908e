"""How the objective runs on several processes: ONE call, ``parallelize``, wraps it.

``ddp`` (the default) keeps a whole replica per process and averages gradients
(``DistributedDataParallel``); ``fsdp`` shards parameters, gradients and optimiser state
(filled in by the FSDP2 work). ``--compile`` applies ``torch.compile`` first in both cases.
The engine touches the wrapper only through ``parallelize``, ``grad_sync`` and ``unwrap``.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .distributed import DistInfo


def parallelize(objective: nn.Module, cfg, device: torch.device, dist_info: DistInfo) -> nn.Module:
    """The module the training step calls: ``objective`` compiled and/or wrapped for ``cfg.strategy``."""
    if cfg.strategy == "fsdp":
        raise NotImplementedError("--strategy fsdp is not available in this version yet; use --strategy ddp "
                                  "(every process holds the whole model)")
    if cfg.activation_checkpointing:
        raise NotImplementedError("--activation-checkpointing comes with --strategy fsdp and is not available in "
                                  "this version yet; drop the flag or lower --batch-size / raise --accum-steps")
    model = objective
    if cfg.compile:
        model = torch.compile(model)
    if dist_info.enabled:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def grad_sync(model: nn.Module, sync: bool):
    """Context for one micro-step's backward: DDP all-reduces gradients only on the last micro-step."""
    if sync or not isinstance(model, DDP):
        return contextlib.nullcontext()
    return model.no_sync()
