"""Fully sharded data parallelism (FSDP2) for trunks whose weights and optimiser state do not fit one GPU.

PyTorch's own ``torch.distributed.fsdp.fully_shard`` (FSDP2, per-parameter sharding over
DTensors), applied the way torchtitan and apple/ml-l3m apply it:

* one FSDP unit per transformer block (the encoder's ``blocks``, MAE's ``decoder_blocks``,
  AIM's ``head.blocks``, a Swin's ``layers.i.blocks``), then the root (the whole objective:
  patch embedding, position tables, mask tokens, norms and prediction layers). A block's
  weights are all-gathered just before it runs and freed right after, so a rank holds its
  1/N share of everything plus one block in full;
* on CUDA with bf16, ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``: the
  all-gathered copies are bf16, gradients are reduced in fp32 and the sharded master
  weights and AdamW moments stay fp32. The root does not cast its inputs, so images and
  the loader's masking noise (MAE's argsort keys) stay fp32, and the trainer's autocast
  handles the few ops outside blocks. In fp32 (and on CPU) nothing is cast;
* optional activation checkpointing per block (``torch.utils.checkpoint`` non-reentrant,
  called inside the block's ``forward``): parameter names do not change (no
  ``_checkpoint_wrapped_module`` prefix), the FSDP unit stays the block itself, and
  recomputation runs after FSDP's pre-backward all-gather;
* ``--compile`` compiles each block in place (``nn.Module.compile``) before sharding, the
  pattern torchtitan uses: the graphs stay small and identical across blocks (one compile
  reused), and FSDP's hooks stay outside them (dynamo skips FSDP hooks by default).

The order of the wrappers matters and is fixed here: checkpointing, then compile, then
``fully_shard`` of each block, then of the root. The optimiser must be built *after*
:func:`shard_objective`, since sharding replaces every parameter by a DTensor.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch
from torch import nn

BLOCK_LIST_SUFFIX = "blocks"  # ModuleLists/Sequentials whose children are the repeated blocks


def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The repeated blocks of ``model`` in forward order: children of every ``*blocks`` list.

    ``encoder.blocks.*`` (ViT), ``decoder_blocks.*`` (MAE), ``head.blocks.*`` (AIM),
    ``encoder.layers.i.blocks.*`` (Swin). These are the FSDP units and the checkpointed
    regions.
    """
    found = []
    for name, module in model.named_modules():
        if name.split(".")[-1].endswith(BLOCK_LIST_SUFFIX) and isinstance(module, (nn.ModuleList, nn.Sequential)):
            found.extend((f"{name}.{i}", child) for i, child in module.named_children())
    return found


def checkpoint_block(block: nn.Module) -> None:
    """Recompute ``block``'s activations in the backward pass instead of keeping them.

    Non-reentrant ``torch.utils.checkpoint`` inside the block's own ``forward``, so the
    state dict, the optimiser's parameter names and the FSDP unit are unchanged. Each
    block keeps only its input for backward; the rest is recomputed (about one extra
    forward per step).
    """
    if getattr(block, "_mimaim_checkpointed", False):
        return
    inner = block.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return inner(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(inner, *args, use_reentrant=False, **kwargs)

    block.forward = forward
    block._mimaim_checkpointed = True


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Checkpoint every transformer block of ``model``; returns how many."""
    blocks = transformer_blocks(model)
    for _, block in blocks:
        checkpoint_block(block)
    return len(blocks)


def compile_blocks(model: nn.Module) -> int:
    """``torch.compile`` every transformer block in place (names unchanged); returns how many."""
    blocks = transformer_blocks(model)
    for _, block in blocks:
        block.compile()
    return len(blocks)


def uses_bf16(device: torch.device, precision: str) -> bool:
    """Same rule as the trainer's autocast: bf16 if asked, or ``auto`` on CUDA."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def mixed_precision_policy(device: torch.device, precision: str, root: bool = False):
    """bf16 all-gathered parameters with fp32 gradient reduction on CUDA bf16; fp32 otherwise.

    On CPU the trainer's autocast already runs the Linears in bf16 when asked, and CPU
    bf16 attention is slow (see ``models/layers.py``), so parameters stay fp32 there.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.type == "cuda" and uses_bf16(device, precision):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                    cast_forward_inputs=not root)
    return MixedPrecisionPolicy()


def shard_objective(objective: nn.Module, device: torch.device, precision: str = "auto",
                    activation_checkpointing: bool = False, compile: bool = False, mesh=None) -> nn.Module:
    """Apply checkpointing, per-block compile and FSDP2 to ``objective`` in place; returns it.

    ``objective`` must already be on ``device``. Under torchrun the process group exists;
    a single process without one joins a one-rank group, so that one GPU runs the very code
    (and writes the very checkpoints) that N GPUs do. Afterwards every parameter is a
    ``DTensor`` sharded on dim 0 across the mesh; build the optimiser from
    ``objective.parameters()`` after this call.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                device_id=device if device.type == "cuda" else None)
    if mesh is None:
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    if activation_checkpointing:
        apply_activation_checkpointing(objective)
    if compile:
        compile_blocks(objective)
    block_policy = mixed_precision_policy(device, precision)
    for _, block in transformer_blocks(objective):
        fully_shard(block, mesh=mesh, mp_policy=block_policy)
    fully_shard(objective, mesh=mesh, mp_policy=mixed_precision_policy(device, precision, root=True))
    # The objective returns `pred[:, 1:]`-style views for pictures; nothing writes into them in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    return objective


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def gradient_sync(model: nn.Module, enabled: bool):
    """Context for one micro-batch: skip the gradient all-reduce / reduce-scatter unless ``enabled``.

    DDP: ``no_sync()``. FSDP2: ``set_requires_gradient_sync(False)`` keeps unsharded
    gradients until the last micro-batch of an accumulation, which then reduce-scatters
    their sum. A plain module: nothing to skip.
    """
    if enabled:
        return contextlib.nullcontext()
    if is_fsdp(model):
        return _fsdp_no_sync(model)
    if hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def clip_grad_norm(parameters, max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_`` for plain and DTensor gradients; returns the global norm.

    With FSDP2 every gradient is a sharded DTensor: the norm is computed over all shards
    (a ``Replicate`` DTensor, the same on every rank), so clipping matches a single process.
    """
    total = torch.nn.utils.clip_grad_norm_([p for p in parameters if p.grad is not None], max_norm)
    if hasattr(total, "full_tensor"):
        total = total.full_tensor()
    return float(total)


def all_finite(parameters) -> bool:
    """True when every parameter is finite on every rank (a collective under FSDP: each rank checks its shards)."""
    import torch.distributed as dist

    params = list(parameters)
    local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
    ok = torch.stack([t.detach().isfinite().all() for t in local]).all() if local else torch.tensor(True)
    if any(hasattr(p, "to_local") for p in params) and dist.is_initialized():
        flag = ok.to(torch.int32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        ok = flag[0] > 0
    return bool(ok)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights as plain CPU tensors (a collective under FSDP: every rank calls it).

    Under FSDP only rank 0 receives them (the other ranks get ``{}``, so that N ranks do
    not hold N full copies in host memory). Names as in ``objective.state_dict()``.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not is_fsdp(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
