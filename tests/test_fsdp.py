"""FSDP2 on CPU (gloo): same weights as DDP and as one process; activation checkpointing changes nothing.

Each test spawns one group of 2 processes that runs every multi-process variant in turn;
the single-process reference runs in the test process itself.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist

from mimaim.engine.fsdp import (clip_grad_norm, gradient_sync, shard_objective, transformer_blocks)
from mimaim.objectives import build_objective

WORLD = 2
STEPS = 3
GLOBAL_BATCH = 8
ACCUM = 2  # micro-batches per optimiser step on each rank
CLIP = 0.5  # below the gradients' norm (~1-2): clipping is active in every step

# tiny objectives: 2-block trunks at 16 px with 4 px patches (16 patches)
TINY = {
    "mae": dict(options={"decoder_embed_dim": 32, "decoder_depth": 2, "decoder_num_heads": 2},
                backbone=dict(embed_dim=32, depth=2, num_heads=2)),
    "aim": dict(options={"head_depth": 2, "head_width": 32},
                backbone=dict(embed_dim=32, depth=2, num_heads=2)),
}


def tiny_objective(name: str):
    torch.manual_seed(0)
    spec = TINY[name]
    return build_objective(name, "vit_micro", 16, 4, spec["options"], **spec["backbone"])


def batches(name: str):
    """STEPS global batches of (images, masking), the same in every process."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        images = torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=g)
        if name == "mae":
            masking = torch.rand(GLOBAL_BATCH, 16, generator=g)  # argsort noise
        else:
            # AIM's loss is a mean over each micro-batch's counted patches: prefix lengths whose
            # counts are the same in every micro-batch make per-rank means average to the global mean
            masking = torch.tensor([3, 9, 5, 7, 3, 9, 5, 7])
        out.append((images, masking))
    return out


def train(model, params_of, name: str, rank: int = 0, world: int = 1):
    """A minimal loop as the trainer runs it: accumulation, gradient sync on the last micro-batch, clipping."""
    optimizer = torch.optim.AdamW(params_of(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05, fused=True)
    norms = []
    for images, masking in batches(name):
        local = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        micro = zip(images[local].chunk(ACCUM), masking[local].chunk(ACCUM))
        for i, (x, m) in enumerate(micro):
            with gradient_sync(model, i == ACCUM - 1):
                (model(x, m).loss / ACCUM).backward()
        norms.append(clip_grad_norm(params_of(), CLIP))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return norms


def comparable(weights: dict) -> dict:
    """The weights minus the key bias of each attention (the middle third of ``qkv.bias``).

    Its true gradient is zero (softmax is shift-invariant along keys), so its gradient is
    rounding noise, which AdamW scales up to steps of size ~lr whose sign differs between
    any two summation orders. Everything else must agree to float tolerance.
    """
    out = {}
    for k, v in weights.items():
        if k.endswith("attn.qkv.bias"):
            D = v.shape[0] // 3
            v = torch.cat([v[:D], v[2 * D:]])
        out[k] = v.float()
    return out


def max_abs_diff(a: dict, b: dict) -> float:
    a, b = comparable(a), comparable(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _full_weights(objective):
    from mimaim.engine.fsdp import full_state_dict
    return full_state_dict(objective)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _equivalence_worker(rank: int, port: int, out_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        cpu = torch.device("cpu")
        results = {}
        for name in TINY:
            ddp = torch.nn.parallel.DistributedDataParallel(tiny_objective(name))
            norms = train(ddp, ddp.parameters, name, rank, WORLD)
            results[f"{name}/ddp"] = ({k: v.detach().clone() for k, v in ddp.module.state_dict().items()}, norms)
            for ac in (False, True):
                obj = shard_objective(tiny_objective(name), cpu, "fp32", activation_checkpointing=ac)
                norms = train(obj, obj.parameters, name, rank, WORLD)
                results[f"{name}/fsdp{'+ac' if ac else ''}"] = (_full_weights(obj), norms)
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "results.pt"))
    finally:
        dist.destroy_process_group()


def test_transformer_blocks_are_the_fsdp_units():
    names = [n for n, _ in transformer_blocks(tiny_objective("mae"))]
    assert names == ["encoder.blocks.0", "encoder.blocks.1", "decoder_blocks.0", "decoder_blocks.1"]
    names = [n for n, _ in transformer_blocks(tiny_objective("aim"))]
    assert names == ["encoder.blocks.0", "encoder.blocks.1", "head.blocks.0", "head.blocks.1"]


def test_activation_checkpointing_keeps_names_and_gradients():
    from mimaim.engine.fsdp import apply_activation_checkpointing

    ref, ckpt = tiny_objective("mae"), tiny_objective("mae")
    assert apply_activation_checkpointing(ckpt) == 4
    assert list(ref.state_dict()) == list(ckpt.state_dict())
    images, masking = batches("mae")[0]
    for model in (ref, ckpt):
        model(images, masking).loss.backward()
    for (name, a), (_, b) in zip(ref.named_parameters(), ckpt.named_parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow  # ~30 s on 2 idle cores: two spawned processes each import torch and train 6 tiny runs
def test_fsdp_ddp_and_one_process_end_with_the_same_weights(tmp_path):
    """2 processes x (FSDP2, FSDP2 + checkpointing, DDP) vs 1 process, same global batch: MAE and AIM."""
    torch.multiprocessing.spawn(_equivalence_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD)
    results = torch.load(tmp_path / "results.pt", weights_only=True)
    report = []
    for name in TINY:
        single = tiny_objective(name)
        norms = train(single, single.parameters, name)
        ref = single.state_dict()
        assert min(norms) > CLIP  # clipping was active
        for variant in ("ddp", "fsdp", "fsdp+ac"):
            weights, their_norms = results[f"{name}/{variant}"]
            assert set(weights) == set(ref)
            diff = max_abs_diff(weights, ref)
            report.append(f"{name} {variant} (2 procs) vs 1 proc: max |dw| = {diff:.1e}")
            torch.testing.assert_close(their_norms, norms, rtol=1e-5, atol=1e-6)
            assert diff < 2e-6, report[-1]
        fsdp, ac = results[f"{name}/fsdp"][0], results[f"{name}/fsdp+ac"][0]
        diff = max_abs_diff(fsdp, results[f"{name}/ddp"][0])
        report.append(f"{name} fsdp vs ddp (2 procs each): max |dw| = {diff:.1e}")
        assert diff < 2e-6, report[-1]
        assert all(torch.equal(fsdp[k], ac[k]) for k in fsdp), "activation checkpointing changed the result"
    print("\n".join(report))
