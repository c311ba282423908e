"""How the objective runs on several processes: ONE call, ``parallelize``, wraps it.

``ddp`` (the default) keeps a whole replica per process and averages gradients
(``DistributedDataParallel``); ``fsdp`` shards parameters, gradients and optimiser state
with FSDP2 (``engine/fsdp.py``: one unit per transformer block plus the root). ``--compile``
applies ``torch.compile`` in both cases (whole model under DDP, per block under FSDP);
``--activation-checkpointing`` recomputes each block's activations in the backward pass.
The engine touches the wrapper only through ``parallelize``, ``grad_sync`` and ``is_sharded``.

Sharding replaces the objective's parameters by DTensors *in place*, so the optimiser is
built after ``parallelize``; a sharded model's checkpoints are written by every rank
(``engine/dcp.py``) instead of by rank 0 alone.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .distributed import DistInfo
from .fsdp import apply_activation_checkpointing, gradient_sync, is_fsdp, shard_objective


def parallelize(objective: nn.Module, cfg, device: torch.device, dist_info: DistInfo) -> nn.Module:
    """The module the training step calls: ``objective`` compiled and/or wrapped for ``cfg.strategy``.

    ``fsdp`` shards ``objective`` in place and returns it (also in one process, where it joins
    a one-rank group, so that one GPU writes the checkpoints N GPUs would); ``ddp`` returns a
    wrapper around it (``objective`` itself in one process without ``--compile``).
    """
    if cfg.strategy == "fsdp":
        return shard_objective(objective, device, cfg.precision, cfg.activation_checkpointing, cfg.compile)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(objective)  # in place: parameter names unchanged
    model = objective
    if cfg.compile:
        model = torch.compile(model)
    if dist_info.enabled:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def grad_sync(model: nn.Module, sync: bool):
    """Context for one micro-step's backward: gradients are all-reduced (DDP) or reduce-scattered
    (FSDP) only on the last micro-step of an accumulation."""
    return gradient_sync(model, sync)


def is_sharded(model: nn.Module) -> bool:
    """True when no process holds the whole model (``--strategy fsdp``): every rank saves its shard."""
    return is_fsdp(model)
