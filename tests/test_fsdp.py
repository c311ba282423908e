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

from mimaim.engine.fsdp import clip_grad_norm, full_state_dict, gradient_sync, shard_objective, transformer_blocks
from mimaim.engine.optim import build_optimizer
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


def make_optimizer(model):
    """The trainer's AdamW groups (decay / no decay, ``lr_scale``), built after any sharding."""
    return build_optimizer(model, 1e-3, 0.05, (0.9, 0.95), model.no_weight_decay())


def train(model, name: str, rank: int = 0, world: int = 1, optimizer=None, steps=range(STEPS)):
    """A minimal loop as the trainer runs it: accumulation, gradient sync on the last micro-batch, clipping."""
    objective = getattr(model, "module", model)  # DDP wraps
    optimizer = optimizer or make_optimizer(objective)
    norms = []
    all_batches = batches(name)
    for step in steps:
        images, masking = all_batches[step]
        local = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        micro = zip(images[local].chunk(ACCUM), masking[local].chunk(ACCUM))
        for i, (x, m) in enumerate(micro):
            with gradient_sync(model, i == ACCUM - 1):
                (model(x, m).loss / ACCUM).backward()
        norms.append(clip_grad_norm(model.parameters(), CLIP))
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
            norms = train(ddp, name, rank, WORLD)
            results[f"{name}/ddp"] = ({k: v.detach().clone() for k, v in ddp.module.state_dict().items()}, norms)
            for ac in (False, True):
                obj = shard_objective(tiny_objective(name), cpu, "fp32", activation_checkpointing=ac)
                norms = train(obj, name, rank, WORLD)
                results[f"{name}/fsdp{'+ac' if ac else ''}"] = (full_state_dict(obj), norms)
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "results.pt"))
    finally:
        dist.destroy_process_group()


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
        norms = train(single, name)
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


# --------------------------------------------------------------------------- sharded checkpoints
def _reshard_worker(rank: int, port: int, root: str):
    """Load the 1-process checkpoint into 2 FSDP processes, take step 2, save a 2-process checkpoint."""
    from mimaim.engine.dcp import load_sharded_checkpoint, save_sharded_checkpoint

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(123)  # other weights than the checkpoint's, so a silent non-load shows
        obj = shard_objective(build_objective("mae", "vit_micro", 16, 4, TINY["mae"]["options"],
                                              **TINY["mae"]["backbone"]), torch.device("cpu"), "fp32")
        optimizer = make_optimizer(obj)
        state = load_sharded_checkpoint(os.path.join(root, "one", "step-00000001"), obj, optimizer)
        loaded = full_state_dict(obj)
        train(obj, "mae", rank, WORLD, optimizer, steps=[1])
        save_sharded_checkpoint(os.path.join(root, "two"), 2, obj, optimizer, {"step": 2, "seen": state["step"]})
        after = full_state_dict(obj)
        if rank == 0:
            torch.save({"loaded": loaded, "after": after}, os.path.join(root, "fsdp.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # ~30 s on 2 idle cores (one spawned pair of processes)
def test_sharded_checkpoint_reshards_between_one_and_two_processes(tmp_path):
    """1 process -> 2 FSDP processes -> 1 process: weights and AdamW moments carry over exactly."""
    from mimaim.engine.dcp import (consolidated_weights, is_sharded_checkpoint, load_sharded_checkpoint,
                                   save_sharded_checkpoint)

    ref = tiny_objective("mae")
    ref_opt = make_optimizer(ref)
    train(ref, "mae", optimizer=ref_opt, steps=[0])
    save_sharded_checkpoint(tmp_path / "one", 1, ref, ref_opt, {"step": 1})
    step1 = {k: v.clone() for k, v in ref.state_dict().items()}

    torch.multiprocessing.spawn(_reshard_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD)
    fsdp = torch.load(tmp_path / "fsdp.pt", weights_only=True)
    assert all(torch.equal(fsdp["loaded"][k], step1[k]) for k in step1), "1 -> 2 processes changed the weights"

    train(ref, "mae", optimizer=ref_opt, steps=[1])  # the same step 2 in one process
    assert max_abs_diff(fsdp["after"], ref.state_dict()) < 2e-6  # so the AdamW moments arrived whole

    ckpt = tmp_path / "two" / "step-00000002"
    assert is_sharded_checkpoint(ckpt) and len(list(ckpt.glob("*.distcp"))) == WORLD
    weights = consolidated_weights(ckpt)  # no process group
    assert all(torch.equal(weights[k], fsdp["after"][k]) for k in weights) and set(weights) == set(step1)

    back = tiny_objective("mae")
    back_opt = make_optimizer(back)
    state = load_sharded_checkpoint(ckpt, back, back_opt)
    assert state == {"step": 2, "seen": 1}
    assert all(torch.equal(back.state_dict()[k], fsdp["after"][k]) for k in step1), "2 -> 1 process changed weights"
    train(back, "mae", optimizer=back_opt, steps=[2])
    train(ref, "mae", optimizer=ref_opt, steps=[2])
    assert max_abs_diff(back.state_dict(), ref.state_dict()) < 2e-6


def test_sharded_checkpoint_is_whole_or_absent_and_refuses_foreign_pickles(tmp_path):
    import pickle

    from mimaim.engine.checkpoint import CheckpointError
    from mimaim.engine.dcp import consolidated_weights, load_sharded_checkpoint, save_sharded_checkpoint

    model = tiny_objective("mae")
    opt = make_optimizer(model)
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

    from conftest import make_image_folder

    from mimaim.engine.checkpoint import latest_checkpoint
    from mimaim.engine.dcp import consolidated_weights

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
