"""How the objective runs on several processes: ONE call, ``parallelize``, wraps it: ``ddp`` (default) a
replica per process; ``fsdp`` FSDP2 ``fully_shard`` as torchtitan and apple/ml-l3m apply it (a unit per
block, then the root; on CUDA bf16 all-gathers, fp32 reduction and master weights), with checkpointing
and ``--compile`` inside the units, so parameter names never change. Build the optimiser after it.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from .distributed import DistInfo

BLOCK_LIST_SUFFIX = "blocks"  # ModuleLists/Sequentials whose children are the repeated blocks


def parallelize(objective: nn.Module, cfg, device: torch.device, dist_info: DistInfo) -> nn.Module:
    """The module the training step calls: ``objective`` compiled and/or wrapped for ``cfg.strategy``:
    ``fsdp`` shards it in place and returns it; ``ddp`` wraps it (``objective`` itself in one
    process without ``--compile``)."""
    if cfg.strategy == "fsdp":
        return shard_objective(objective, device, cfg.precision, cfg.activation_checkpointing, cfg.compile)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(objective)
    model = torch.compile(objective) if cfg.compile else objective
    if dist_info.enabled:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The FSDP units and checkpointed regions, in forward order: children of every ``*blocks`` list
    (``encoder.blocks``, MAE's ``decoder_blocks``, a Swin's ``layers.i.blocks``)."""
    found = []
    for name, module in model.named_modules():
        if name.split(".")[-1].endswith(BLOCK_LIST_SUFFIX) and isinstance(module, (nn.ModuleList, nn.Sequential)):
            found.extend((f"{name}.{i}", child) for i, child in module.named_children())
    return found


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each transformer block's activations in the backward pass (about one extra forward
    per step); returns how many blocks. Non-reentrant ``torch.utils.checkpoint`` inside the block's
    own ``forward``, so the state dict, the optimiser's parameter names and the FSDP unit are unchanged."""
    blocks = transformer_blocks(model)
    for _, block in blocks:
        if not getattr(block, "_mimaim_checkpointed", False):
            block.forward = _checkpointed(block.forward)
            block._mimaim_checkpointed = True
    return len(blocks)


def _checkpointed(inner):
    @functools.wraps(inner)
    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return inner(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(inner, *args, use_reentrant=False, **kwargs)
    return forward


def mixed_precision_policy(device: torch.device, precision: str, root: bool = False) -> MixedPrecisionPolicy:
    """bf16 all-gathered parameters with fp32 gradient reduction on CUDA bf16; fp32 otherwise (on CPU
    autocast runs the Linears in bf16 when asked, and CPU bf16 attention is slow: ``models/layers.py``)."""
    if device.type == "cuda" and precision in ("bf16", "auto"):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                    cast_forward_inputs=not root)
    return MixedPrecisionPolicy()


def shard_objective(objective: nn.Module, device: torch.device, precision: str = "auto",
                    activation_checkpointing: bool = False, compile: bool = False, mesh=None) -> nn.Module:
    """Apply checkpointing, per-block compile and FSDP2 to ``objective`` (on ``device``) in place; a single
    process joins a one-rank group, so that one GPU runs the very code (and checkpoints) N GPUs do."""
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                device_id=device if device.type == "cuda" else None)
    if mesh is None:
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    if activation_checkpointing:
        apply_activation_checkpointing(objective)
    for _, block in transformer_blocks(objective):
        if compile:
            block.compile()  # in place: parameter names unchanged
        fully_shard(block, mesh=mesh, mp_policy=mixed_precision_policy(device, precision))
    fully_shard(objective, mesh=mesh, mp_policy=mixed_precision_policy(device, precision, root=True))
    # The objective returns `pred[:, 1:]`-style views for pictures; nothing writes into them in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    return objective


def is_fsdp(model: nn.Module) -> bool:
    """True when no process holds the whole model (``--strategy fsdp``): every rank saves its shard."""
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Context for one micro-batch: skip the gradient all-reduce (DDP ``no_sync``) / reduce-scatter
    (FSDP2 ``set_requires_gradient_sync(False)``) unless ``enabled``, on the last micro-batch."""
    if enabled or not isinstance(model, (FSDPModule, DDP)):
        yield
    elif isinstance(model, DDP):
        with model.no_sync():
            yield
    else:
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)


def all_finite(parameters) -> bool:
    """True when every parameter is finite on every rank (a collective under FSDP: each rank checks its shards)."""
    params = list(parameters)
    local = [p.to_local() if isinstance(p, DTensor) else p for p in params]
    ok = torch.stack([t.detach().isfinite().all() for t in local]).all() if local else torch.tensor(True)
    if any(isinstance(p, DTensor) for p in params) and dist.is_initialized():
        flag = ok.to(torch.int32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        ok = flag[0] > 0
    return bool(ok)

