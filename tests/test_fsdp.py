"""FSDP2 on CPU (gloo), through the trainer: the weights and clipped gradient norms of DDP and of one process.

Every run here is ``mimaim.engine.trainer.pretrain``, the code a user's run goes through: the
loader (the same global batch on any number of processes), the trainer's ``train_step``
(accumulation with one gradient sync per step, ``clip_grad_norm_``, AdamW) and its checkpoints
(one ``model.safetensors`` under DDP, DCP shards under FSDP). The 2-process runs happen in one
spawned group that joins the process group as torchrun's children do (``env://``), several runs
per spawn; the 1-process runs happen in the test process itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path

import pytest
import torch
from conftest import make_image_folder
from safetensors.torch import load_file

from mimaim.config import make_config
from mimaim.engine.checkpoint import latest_checkpoint
from mimaim.engine.dcp import consolidated_weights, is_sharded_checkpoint
from mimaim.engine.fsdp import transformer_blocks
from mimaim.engine.optim import build_optimizer
from mimaim.engine.trainer import pretrain
from mimaim.objectives import build_objective

WORLD = 2
STEPS = 3  # 25 training images, global batch 8: 3 steps per epoch
CLIP = 0.05  # below the gradients' norm in every step: the trainer's clipping is active throughout

# heads and decoders as small as the objectives allow; AIM's prefix length is fixed so that every
# micro-batch counts the same patches and the per-process mean losses average to the global mean
OPTIONS = {
    "mae": {"decoder_embed_dim": 32, "decoder_depth": 2, "decoder_num_heads": 2},
    "aim": {"head_depth": 2, "head_width": 32, "min_prefix": 5, "max_prefix": 5},
    # one 2x2 target block and the rest as context: every image counts the same patches (the blocks are cut to a
    # micro-batch's smallest, so sizes that vary would differ between 1 and 2 processes); the EMA runs on shards
    "ijepa": {"num_targets": 1, "target_scale": (0.25, 0.25), "target_aspect": (1.0, 1.0), "context_scale": (1.0, 1.0),
              "min_keep": 3, "predictor_embed_dim": 16, "predictor_depth": 1, "predictor_num_heads": 2},
    "nepa": {"layer_scale": 0.1},
}


def tiny_cfg(objective: str, out, data, **kw):
    """``STEPS`` optimiser steps of a vit_micro at 16 px, 2 micro-batches per step, clipping on."""
    values = dict(objective=objective, model="vit_micro", img_size=16, patch_size=4,
                  objective_options=OPTIONS[objective], data=f"imagefolder:{data}", batch_size=8, accum_steps=2,
                  epochs=10, warmup_epochs=0, lr=1e-3, clip_grad=CLIP, max_steps=STEPS, device="cpu",
                  precision="fp32", num_workers=0, progress=False, log_every=1, keep_last=STEPS, out=str(out))
    return make_config({**values, **kw})


@contextlib.contextmanager
def clip_norms():
    """The total norm of each ``torch.nn.utils.clip_grad_norm_`` call the trainer makes (global under FSDP)."""
    real, norms = torch.nn.utils.clip_grad_norm_, []

    def spy(*args, **kwargs):
        total = real(*args, **kwargs)
        norms.append(float(total.full_tensor() if hasattr(total, "full_tensor") else total))
        return total

    torch.nn.utils.clip_grad_norm_ = spy
    try:
        yield norms
    finally:
        torch.nn.utils.clip_grad_norm_ = real


def final_weights(run_dir, sharded: bool) -> dict:
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None and ckpt.name == f"step-{STEPS:08d}"
    assert is_sharded_checkpoint(ckpt) == sharded, ckpt
    return consolidated_weights(ckpt) if sharded else load_file(str(ckpt / "model.safetensors"))


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
    assert set(a) == set(b)
    a, b = comparable(a), comparable(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _torchrun_worker(rank: int, ports: list[int], cfgs: list, resume: bool):
    """One of ``WORLD`` processes, set up as torchrun sets up its children; runs ``pretrain`` on each config."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_WORLD_SIZE=str(WORLD))
    for port, cfg in zip(ports, cfgs):
        os.environ["MASTER_PORT"] = str(port)  # a fresh rendezvous per run: pretrain joins and leaves the group
        with clip_norms() as norms:
            pretrain(cfg, resume=resume)
        if rank == 0:
            Path(cfg.out, "clip_norms.json").write_text(json.dumps(norms))


def spawn(cfgs: list, resume: bool = False) -> None:
    torch.multiprocessing.spawn(_torchrun_worker, args=(_free_ports(len(cfgs)), cfgs, resume), nprocs=WORLD)


def tiny_objective(name: str):
    """The objective with 2-block trunks (the FSDP-unit and checkpointing tests need no trainer)."""
    torch.manual_seed(0)
    return build_objective(name, "vit_micro", 16, 4, OPTIONS[name], embed_dim=32, depth=2, num_heads=2)


def test_transformer_blocks_are_the_fsdp_units():
    names = [n for n, _ in transformer_blocks(tiny_objective("mae"))]
    assert names == ["encoder.blocks.0", "encoder.blocks.1", "decoder_blocks.0", "decoder_blocks.1"]
    aim = tiny_objective("aim")
    names = [n for n, _ in transformer_blocks(aim)]
    head = [n for n, m in aim.named_modules() if n.startswith("head.") and isinstance(m, torch.nn.ModuleList)]
    assert names == ["encoder.blocks.0", "encoder.blocks.1", f"{head[0]}.0", f"{head[0]}.1"]


def test_activation_checkpointing_keeps_names_and_gradients():
    from mimaim.engine.fsdp import apply_activation_checkpointing

    ref, ckpt = tiny_objective("mae"), tiny_objective("mae")
    assert apply_activation_checkpointing(ckpt) == 4
    assert list(ref.state_dict()) == list(ckpt.state_dict())
    g = torch.Generator().manual_seed(1)
    images, masking = torch.randn(8, 3, 16, 16, generator=g), ref.draw_masking(8, g)
    for model in (ref, ckpt):
        model(images, masking).loss.backward()
    for (name, a), (_, b) in zip(ref.named_parameters(), ckpt.named_parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow  # one spawned pair of processes training 3 tiny runs per objective, 1 more run here
@pytest.mark.parametrize("objectives", [("mae", "aim"), ("ijepa", "nepa")], ids=["mae,aim", "ijepa,nepa"])
def test_fsdp_ddp_and_one_process_end_with_the_same_weights(tmp_path, objectives):
    """pretrain on 2 processes x (FSDP2, FSDP2 + checkpointing, DDP) vs 1 process, same global batch: every
    objective (I-JEPA's EMA target encoder included: its weights are part of the compared state).

    The trainer's clipping is active in every step, and its norms agree: under FSDP2 the norm
    of the sharded gradients is the global one."""
    data = make_image_folder(tmp_path / "images", per_class=16, size=16)
    variants = {"ddp": {}, "fsdp": {"strategy": "fsdp"},
                "fsdp+ac": {"strategy": "fsdp", "activation_checkpointing": True}}
    runs = {(name, v): tiny_cfg(name, tmp_path / f"{name}-{v}", data, **kw) for name in objectives
            for v, kw in variants.items()}
    spawn(list(runs.values()))
    report = []
    for name in objectives:
        with clip_norms() as norms:
            pretrain(tiny_cfg(name, tmp_path / f"{name}-one", data))
        ref = final_weights(tmp_path / f"{name}-one", sharded=False)
        assert len(norms) == STEPS and min(norms) > CLIP, norms  # clipping was active
        weights = {}
        for v in variants:
            out = runs[name, v].out
            weights[v] = final_weights(out, sharded=v != "ddp")
            torch.testing.assert_close(json.loads(Path(out, "clip_norms.json").read_text()), norms,
                                       rtol=1e-5, atol=1e-6)
            diff = max_abs_diff(weights[v], ref)
            report.append(f"{name} {v} (2 procs) vs 1 proc: max |dw| = {diff:.1e}")
            assert diff < 2e-6, report[-1]
        diff = max_abs_diff(weights["fsdp"], weights["ddp"])
        report.append(f"{name} fsdp vs ddp (2 procs each): max |dw| = {diff:.1e}")
        assert diff < 2e-6, report[-1]
        fsdp, ac = weights["fsdp"], weights["fsdp+ac"]
        assert all(torch.equal(fsdp[k], ac[k]) for k in fsdp), "activation checkpointing changed the result"
    print("\n".join(report))


# --------------------------------------------------------------------------- sharded checkpoints
@pytest.mark.slow  # one spawned pair of processes, 3 runs here
def test_sharded_checkpoint_reshards_between_one_and_two_processes(tmp_path):
    """1 FSDP process -> 2 -> 1, each resuming the last one's sharded checkpoint: the weights of one
    uninterrupted run at every step, so weights and AdamW moments carry over whole both ways."""
    data = make_image_folder(tmp_path / "images", per_class=16, size=16)
    whole = tmp_path / "whole"
    pretrain(tiny_cfg("mae", whole, data, strategy="fsdp", save_every=1))  # a one-rank group, the same shards
    split = tiny_cfg("mae", tmp_path / "split", data, strategy="fsdp", save_every=1, max_steps=1)
    pretrain(split)
    split.max_steps = 2
    spawn([split], resume=True)
    split.max_steps = STEPS
    pretrain(split, resume=True)

    for step in range(1, STEPS + 1):
        a, b = (run / "checkpoints" / f"step-{step:08d}" for run in (whole, tmp_path / "split"))
        assert is_sharded_checkpoint(a) and is_sharded_checkpoint(b)
        assert len(list(b.glob("*.distcp"))) == (WORLD if step == 2 else 1)
        wa, wb = consolidated_weights(a), consolidated_weights(b)  # no process group
        diff = max_abs_diff(wa, wb)
        assert diff < 2e-6 and (step > 1 or diff == 0), f"step {step}: max |dw| = {diff:.1e}"
    norms = json.loads((tmp_path / "split" / "clip_norms.json").read_text())
    assert len(norms) == 1 and norms[0] > CLIP  # the 2-process session took its one step, clipped


def test_sharded_checkpoint_is_whole_or_absent_and_refuses_foreign_pickles(tmp_path):
    import pickle

    from mimaim.engine.checkpoint import CheckpointError
    from mimaim.engine.dcp import load_sharded_checkpoint, save_sharded_checkpoint

    model = tiny_objective("mae")
    opt = build_optimizer(model, 1e-3, 0.05, (0.9, 0.95), model.no_weight_decay())
    (tmp_path / "ck" / ".tmp-step-00000003").mkdir(parents=True)  # a save killed half-way
    for step in (1, 2, 3):
        path = save_sharded_checkpoint(tmp_path / "ck", step, model, opt, {"step": step}, keep_last=2,
                                       record={"format": 1})
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step-00000002", "step-00000003"]
    assert (path / "run.json").is_file()
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_sharded_checkpoint(path, tiny_objective("aim"))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (path / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match="refusing to load"):
        consolidated_weights(path)


# --------------------------------------------------------------------------- kill -9 and resume, through the trainer
@pytest.mark.slow  # three torchrun launches of 2 processes, one 1-process resume (~70 s on 2 idle cores)
def test_kill_during_an_fsdp_run_then_resume_ends_like_an_uninterrupted_run(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    data = make_image_folder(tmp_path / "images", per_class=16, size=16)  # 25 training images: 3 steps/epoch

    def command(out, resume=False):
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                  "-m", "mimaim", "pretrain"]
        if resume:
            return launch + ["--resume", str(out), "--no-progress"]
        return launch + ["--objective", "mae", "--strategy", "fsdp", "--data", f"imagefolder:{data}", "--model",
                         "vit_micro", "--img-size", "16", "--patch-size", "4", "--batch-size", "8", "--epochs", "2",
                         "--save-every", "1", "--num-workers", "0", "--device", "cpu", "--precision", "fp32",
                         "--no-progress", "--out", str(out)]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command(tmp_path / "whole"), check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(killed), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step-00000002").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks, wherever they are (maybe mid-save)
    proc.wait()
    assert latest_checkpoint(killed) is not None and int(latest_checkpoint(killed).name[5:]) < 6
    subprocess.run(command(killed, resume=True), check=True, env=env, capture_output=True)

    a, b = latest_checkpoint(tmp_path / "whole"), latest_checkpoint(killed)
    assert a.name == b.name == "step-00000006"
    wa, wb = consolidated_weights(a), consolidated_weights(b)
    diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    print(f"kill -9 + resume vs uninterrupted (FSDP2, 2 processes, 6 steps): max |dw| = {diff:.1e}")
    assert diff <= 1e-6

    # the 2-process run's sharded checkpoint continues on 1 process (one more epoch)
    one = subprocess.run([sys.executable, "-m", "mimaim", "pretrain", "--resume", str(tmp_path / "whole"),
                          "--epochs", "3", "--no-progress"], check=True, env=env, capture_output=True, text=True)
    assert "from step 6" in one.stderr and "1 process(es)" in one.stderr
    assert latest_checkpoint(tmp_path / "whole").name == "step-00000009"
