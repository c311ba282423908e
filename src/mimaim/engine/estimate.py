"""``mimaim pretrain --dry-run``: memory per GPU and FLOPs per image, before renting GPUs. Nothing is allocated:
the objective is built with its large tensors on ``meta`` and one training step traced there. Weights, gradients
and AdamW's two fp32 moments follow from the parameter count (DDP: replicated, plus its gradient buckets and
autocast's bf16 weight copies; FSDP2: split, plus the all-gathered units). Activations are *measured*: the
distinct storages autograd saves in one forward at the batch per GPU, attention traced as CUDA's fused
memory-efficient SDPA (q, k, v, output and log-sum-exp, no T x T scores); with activation checkpointing each
block keeps its input, plus one block's activations while recomputed. FLOPs: ``FlopCounterMode`` over forward
and backward. Not counted (keep 10-20% free): the CUDA context (~0.5 GB), the allocator's cache, NCCL buffers,
the data loader.
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors
from torch.utils._pytree import tree_leaves, tree_map_only
from torch.utils.flop_counter import FlopCounterMode

from ..objectives import build_objective
from .build import check_objective, resolved_objective_options
from .fsdp import transformer_blocks

GiB = 1024 ** 3
STRATEGIES = ("ddp", "fsdp")
_SMALL = 1 << 16  # tensors up to this many elements are built on the CPU (tables, biases, indices)


def _numel(args, kwargs) -> int:
    size = kwargs.get("size")
    if size is None:
        size = args[0] if args and isinstance(args[0], (tuple, list, torch.Size)) else \
            [a for a in args if isinstance(a, int) and not isinstance(a, bool)]
    try:
        return math.prod(int(s) for s in size)
    except (TypeError, ValueError):
        return 0


class _LargeTensorsOnMeta(TorchFunctionMode):
    """Factory calls for large tensors (weights) go to ``meta``; small ones stay on CPU, since
    constructors read some back (``linspace(...).tolist()``, sin-cos tables)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if (func in _device_constructors() and kwargs.get("device") is None
                and func not in (torch.arange, torch.linspace, torch.tensor, torch.as_tensor)
                and _numel(args, kwargs) > _SMALL):
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def build_on_meta(build) -> nn.Module:
    """``build()`` (a function returning a module) with every parameter and buffer on ``meta``."""
    with _LargeTensorsOnMeta():
        module = build()
    return module.to("meta")


def _fused_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """SDPA as CUDA's memory-efficient kernel (saves q, k, v, out, logsumexp; bool masks as a bias)."""
    bias = None
    if attn_mask is not None:
        bias = attn_mask if attn_mask.dtype != torch.bool else \
            torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~attn_mask, float("-inf"))
        bias = bias.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    out = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, dropout_p, is_causal,
                                                                 scale=scale)
    return out[0]


class _MetaTraceMode(TorchFunctionMode):
    """Trace-time stand-ins on meta: SDPA as the fused kernel; ``x[mask]`` (a data-dependent size) as
    a slice of the mask's true count (``true_counts``: shape -> number of True entries, drawn on CPU). The masking
    itself stays on the CPU, so index arithmetic that reads sizes back (I-JEPA's blocks cut to the batch's
    smallest) runs on real values; where a CPU tensor meets a meta one, it moves to meta."""

    def __init__(self, true_counts: dict[tuple, int]):
        super().__init__()
        self.true_counts = true_counts
        self.on_meta: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (CPU tensor, its one meta twin)

    def _meta(self, t: torch.Tensor) -> torch.Tensor:
        if not t.ndim:
            return t
        if id(t) not in self.on_meta:
            # same strides (an expanded index stays a view, as on a GPU); the CPU tensor is kept: its id stays unique
            twin = t.to("meta") if t.requires_grad else \
                torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
            self.on_meta[id(t)] = (t, twin)
        return self.on_meta[id(t)][1]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if any(t.device.type == "meta" for t in flat) and any(t.device.type == "cpu" and t.ndim for t in flat):
            args, kwargs = tree_map_only(torch.Tensor, self._meta, (args, kwargs))
        if func is F.scaled_dot_product_attention:
            return _fused_sdpa(*args, **kwargs)
        if func is torch.Tensor.__getitem__ and len(args) == 2 and isinstance(args[1], torch.Tensor) \
                and args[1].dtype == torch.bool and args[1].device.type == "meta":
            x, mask = args
            count = self.true_counts.get(tuple(mask.shape), mask.numel())
            return x.flatten(0, mask.ndim - 1)[:count]
        return func(*args, **kwargs)


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def trace_step(objective: nn.Module, batch_size: int, dtype: torch.dtype) -> dict[str, Any]:
    """One forward + backward of ``objective`` (on meta) at ``batch_size``: ``flops`` (whole batch), and the bytes
    saved for backward: in all (``saved_bytes``), outside any block, per block, and the blocks' inputs."""
    objective = objective.to(dtype)
    objective.train()
    param_storages = {_storage_key(p) for p in objective.parameters()}
    blocks = transformer_blocks(objective)
    current: list[str | None] = [None]
    saved: dict[int, tuple[int, str | None]] = {}  # storage -> (bytes, block that saved it first)
    block_inputs: dict[int, int] = {}

    def pack(t):
        key = _storage_key(t)
        if key not in param_storages and key not in saved:
            saved[key] = (t.untyped_storage().nbytes(), current[0])
        return t

    hooks = []
    for name, block in blocks:
        def pre(module, args, name=name):
            current[0] = name
            x = args[0]
            block_inputs.setdefault(_storage_key(x), x.untyped_storage().nbytes())

        hooks.append(block.register_forward_pre_hook(pre))
        hooks.append(block.register_forward_hook(lambda m, a, o: current.__setitem__(0, None)))
    N = objective.encoder.img_size
    images = torch.zeros(batch_size, objective.encoder.in_chans, N, N, device="meta", dtype=dtype)
    masking = objective.draw_masking(batch_size, torch.Generator().manual_seed(0))
    true_counts = {tuple(masking.shape): int(masking.bool().sum())} if masking is not None else {}
    if hasattr(objective, "visual_tokens"):
        # BEiT's frozen tokenizer runs without gradients (nothing saved) under a disabled autocast,
        # which the meta device does not support: trace its output ids instead (its FLOPs are left out)
        num_patches = objective.encoder.num_patches
        objective.visual_tokens = lambda x: torch.zeros(x.shape[0], num_patches, dtype=torch.long, device=x.device)
    forward_counter, backward_counter = FlopCounterMode(display=False), FlopCounterMode(display=False)
    try:
        with _MetaTraceMode(true_counts):
            with forward_counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = objective(images, masking).loss
            with backward_counter:
                loss.backward()
    finally:
        for h in hooks:
            h.remove()
        objective.__dict__.pop("visual_tokens", None)
    per_block: dict[str, int] = {}
    outside = 0
    for nbytes, where in saved.values():
        if where is None:
            outside += nbytes
        else:
            per_block[where] = per_block.get(where, 0) + nbytes
    # FlopCounterMode names modules "<RootClass>.<path>"; sum the forward FLOPs of the blocks
    by_module = forward_counter.get_flop_counts()
    block_paths = {name for name, _ in blocks}
    block_flops = sum(sum(counts.values()) for module, counts in by_module.items()
                      if module.split(".", 1)[-1] in block_paths)
    return {"flops": forward_counter.get_total_flops() + backward_counter.get_total_flops(),
            "forward_flops": forward_counter.get_total_flops(), "block_forward_flops": block_flops,
            "saved_bytes": sum(b for b, _ in saved.values()), "outside_bytes": outside, "block_bytes": per_block,
            "block_input_bytes": sum(block_inputs.values())}


def _as_meta_objective(objective_or_cfg) -> nn.Module:
    """A ``PretrainConfig``'s objective built on meta, or a meta copy of an objective module."""
    if not isinstance(objective_or_cfg, nn.Module):
        cfg = objective_or_cfg
        return build_on_meta(lambda: build_objective(cfg.objective, cfg.model, cfg.img_size, cfg.patch_size,
                                                     resolved_objective_options(cfg), **check_objective(cfg)[1]))
    if next(objective_or_cfg.parameters()).device.type == "meta":
        return objective_or_cfg
    return copy.deepcopy(objective_or_cfg).to("meta")


def estimate(objective_or_cfg, strategy: str = "ddp", precision: str = "bf16", batch_per_gpu: int = 64,
             world_size: int = 1, activation_checkpointing: bool = False, _trace: dict | None = None) -> dict[str, Any]:
    """Memory per GPU (bytes) and FLOPs per image for one training configuration of
    ``objective_or_cfg`` (a ``PretrainConfig`` or an objective module; see ``_as_meta_objective``)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: unknown value {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if batch_per_gpu < 1 or world_size < 1:
        raise ValueError(f"batch per GPU ({batch_per_gpu}) and world size ({world_size}) must be at least 1")
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision: unknown value {precision!r}; choose auto, bf16 or fp32")
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16  # for GPUs: auto means bf16 there
    objective = _as_meta_objective(objective_or_cfg)
    params = sum(p.numel() for p in objective.parameters())
    trainable = sum(p.numel() for p in objective.parameters() if p.requires_grad)
    encoder_params = sum(p.numel() for p in objective.encoder.parameters())
    blocks = transformer_blocks(objective)
    in_blocks = {id(p) for _, b in blocks for p in b.parameters()}
    root_params = sum(p.numel() for p in objective.parameters() if id(p) not in in_blocks)
    largest_block = max((sum(p.numel() for p in b.parameters()) for _, b in blocks), default=0)

    shard = world_size if strategy == "fsdp" else 1
    rows = {
        "weights": 4 * params / shard,  # fp32 master weights
        "gradients": 4 * trainable / shard,
        "optimizer": 8 * trainable / shard,  # AdamW exp_avg + exp_avg_sq, fp32
    }
    half = 2 if dtype == torch.bfloat16 else 4
    if strategy == "ddp":
        # DDP's gradient buckets (a second copy of the gradients); one process runs without DDP
        rows["buffers"] = 4 * trainable if world_size > 1 else 0
        if dtype == torch.bfloat16:
            rows["buffers"] += 2 * params  # autocast's bf16 copies of the weights, cached during forward
    else:
        # all-gathered compute-dtype copies: the root unit, the running block and the prefetched one,
        # plus one block's unsharded fp32 gradients before the reduce-scatter
        rows["buffers"] = half * (root_params + 2 * largest_block) + 4 * largest_block

    trace = _trace or trace_step(objective, batch_per_gpu, dtype)
    act_full = trace["saved_bytes"]
    act_ckpt = (trace["outside_bytes"] + trace["block_input_bytes"] + max(trace["block_bytes"].values(), default=0))
    rows["activations"] = act_ckpt if activation_checkpointing else act_full
    flops_per_image = trace["flops"] / batch_per_gpu
    recompute = trace["block_forward_flops"] / batch_per_gpu if activation_checkpointing else 0.0
    return {
        "objective": getattr(objective, "name", type(objective).__name__),
        "strategy": strategy, "precision": "bf16" if dtype == torch.bfloat16 else "fp32",
        "world_size": world_size, "batch_per_gpu": batch_per_gpu, "global_batch": batch_per_gpu * world_size,
        "activation_checkpointing": activation_checkpointing,
        "parameters": params, "trainable_parameters": trainable, "encoder_parameters": encoder_params,
        "bytes": rows, "total_bytes": sum(rows.values()),
        "activations_without_checkpointing": act_full, "activations_with_checkpointing": act_ckpt,
        "flops_per_image": flops_per_image + recompute,
        "flops_per_image_without_recompute": flops_per_image,
        "trace": trace,
    }


def estimate_choices(objective_or_cfg, precision: str = "bf16", batch_per_gpu: int = 64,
                     world_size: int = 1) -> dict[tuple[str, bool], dict[str, Any]]:
    """:func:`estimate` for each strategy with and without checkpointing, from one trace."""
    objective = _as_meta_objective(objective_or_cfg)
    first = estimate(objective, "ddp", precision, batch_per_gpu, world_size, False)
    return {(strategy, ac): estimate(objective, strategy, precision, batch_per_gpu, world_size, ac,
                                     _trace=first["trace"])
            for strategy in STRATEGIES for ac in (False, True)}


def format_estimate(est: dict[str, Any], gpu_memory_gib: float | None = 80.0) -> str:
    """A small table of one estimate; warns when the total passes 90% of ``gpu_memory_gib``."""
    rows, ddp = est["bytes"], est["strategy"] == "ddp"
    where = "replicated on" if ddp else "sharded over"
    labels = {"weights": "weights (fp32 master copy)", "gradients": "gradients (fp32)",
              "optimizer": "optimizer state (AdamW: 2 fp32 moments)",
              "buffers": f"buffers ({'DDP buckets, autocast copies' if ddp else 'all-gathered units'})",
              "activations": "activations (traced on meta tensors)"}
    lines = [
        f"{est['objective']}: {est['parameters'] / 1e6:,.1f}M parameters ({est['encoder_parameters'] / 1e6:,.1f}M "
        f"in the encoder, {est['trainable_parameters'] / 1e6:,.1f}M trainable)",
        f"--strategy {est['strategy']} ({where} {est['world_size']} GPU(s)), {est['precision']}, batch "
        f"{est['batch_per_gpu']} per GPU (global {est['global_batch']}), activation checkpointing "
        f"{'on' if est['activation_checkpointing'] else 'off'}",
        "",
        f"{'memory per GPU':<48}{'GiB':>8}",
    ]
    lines += [f"  {label:<46}{rows[key] / GiB:>8.2f}" for key, label in labels.items()]
    lines.append(f"  {'total':<46}{est['total_bytes'] / GiB:>8.2f}")
    lines.append(f"  {'(activations without / with checkpointing)':<46}"
                 f"{est['activations_without_checkpointing'] / GiB:>8.2f} / "
                 f"{est['activations_with_checkpointing'] / GiB:.2f}")
    recompute = " + recompute" if est["activation_checkpointing"] else ""
    lines += ["", f"training FLOPs per image (forward + backward{recompute}): "
                  f"{est['flops_per_image'] / 1e9:,.1f} GFLOP"]
    if gpu_memory_gib and est["total_bytes"] / GiB > 0.9 * gpu_memory_gib:
        fixes = (["--strategy fsdp"] if ddp else []) + \
                ([] if est["activation_checkpointing"] else ["--activation-checkpointing"]) + \
                ["a smaller batch per GPU with --accum-steps (the global batch stays)", "more GPUs"]
        lines.append(f"warning: {est['total_bytes'] / GiB:.1f} GiB is above 90% of a {gpu_memory_gib:g} GiB GPU; "
                     f"try {', '.join(fixes[:-1])} or {fixes[-1]}")
    return "\n".join(lines)


def format_choices(choices: dict[tuple[str, bool], dict[str, Any]]) -> str:
    """Total GiB per GPU for each strategy with and without activation checkpointing."""
    any_est = next(iter(choices.values()))
    lines = [f"total GiB per GPU at batch {any_est['batch_per_gpu']} per GPU on {any_est['world_size']} GPU(s):",
             f"  {'':<28}{'ddp':>8}{'fsdp':>8}"]
    for ac in (False, True):
        label = "activation checkpointing" if ac else "no checkpointing"
        lines.append(f"  {label:<28}" + "".join(f"{choices[(s, ac)]['total_bytes'] / GiB:>8.1f}" for s in STRATEGIES))
    return "\n".join(lines)


def dry_run(cfg, world_size: int | None = None, gpu_memory_gib: float | None = 80.0, show: bool = True) -> str:
    """The ``--dry-run`` report for a ``PretrainConfig`` on ``world_size`` GPUs (default ``WORLD_SIZE``): its
    estimate and the alternatives; printed (by rank 0) when ``show``, returned either way."""
    world_size = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    per_gpu = max(1, math.ceil(cfg.batch_size / (world_size * cfg.accum_steps)))
    choices = estimate_choices(cfg, cfg.precision, per_gpu, world_size)
    chosen = choices[(cfg.strategy, bool(cfg.activation_checkpointing))]
    text = "\n".join([f"dry run: {cfg.objective} on {cfg.model}/{cfg.patch_size} at {cfg.img_size}px, global batch "
                      f"{cfg.batch_size} = {world_size} GPU(s) x {cfg.accum_steps} accumulation x {per_gpu}",
                      format_estimate(chosen, gpu_memory_gib), "", format_choices(choices)])
    if show and os.environ.get("RANK", "0") == "0":
        print(text, flush=True)
    return text
