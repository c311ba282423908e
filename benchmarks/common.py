"""What every benchmark script shares: the timed training step, interleaved rounds, memory, machine line.

* ``Runner``: one model + its AdamW; ``step(batch)`` is forward (under bf16 autocast if
  asked), backward and an optimiser step; ``timed(batches)`` appends each step's seconds.
* ``interleaved(runners, make_batches, ...)``: warm-up, then rounds in which every runner
  times the same batches, the order rotating each round, so that load from other
  processes on a shared machine hits all alike. -> {name: (median s, CUDA peak bytes or None,
  loss of the first warm-up batch)}.
* ``rss_rise(fn)``: the rise of this process's resident set over its size before ``fn``
  ran (the RSS high-water mark is reset first where Linux allows, else sampled each
  millisecond); run it in a fresh process (``json_subprocess``) per model.
* ``machine_line(device, "transformers", ...)``: CPU model, cores, load, library versions.
* ``lightly_aim_pair(model, img_size, patch_size, options)``: mimaim's AIM with its head laid out
  as lightly's, and lightly's AIM holding the same weights (from the repository's tests/lightly_aim.py).
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def shape_arguments(parser):
    """--device, --model, --img-size, --patch-size, --batch-size (None: the script's CPU/CUDA default)."""
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", help="mimaim model name (cpu: vit_tiny, cuda: vit_base)")
    parser.add_argument("--img-size", type=int)
    parser.add_argument("--patch-size", type=int)
    parser.add_argument("--batch-size", type=int)
    return parser


def repeat_arguments(args, *names: str) -> list[str]:
    """``--device cpu``, ``--name value`` for each of ``names`` and ``--compile``: a memory subprocess's argv."""
    out = ["--device", "cpu"]
    for name in names:
        out += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return out + (["--compile"] if getattr(args, "compile", False) else [])


class Runner:
    """``loss_fn(model, batch) -> scalar loss``; AdamW (lr 1e-4, wd 0.05, ``betas``)."""

    def __init__(self, name: str, model: torch.nn.Module, loss_fn: Callable, device: torch.device,
                 precision: str = "fp32", compile: bool = False, betas=(0.9, 0.95), fused: bool = False):
        self.name, self.device, self.loss_fn = name, device, loss_fn
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, betas=betas, weight_decay=0.05,
                                           **({"fused": True} if fused else {}))
        self.model = torch.compile(model) if compile else model
        self.dtype = torch.bfloat16 if precision == "bf16" else None
        self.times: list[float] = []

    def loss(self, batch) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            return self.loss_fn(self.model, batch)

    def step(self, batch) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(batch)
        loss.backward()
        self.optimizer.step()
        return loss

    def timed(self, batches) -> None:
        for batch in batches:
            sync(self.device)
            t0 = time.perf_counter()
            self.step(batch)
            sync(self.device)
            self.times.append(time.perf_counter() - t0)


def interleaved(runners: dict[str, Runner], make_batches: Callable[[int, int], list], device: torch.device,
                warmup: int, rounds: int, steps: int) -> dict[str, tuple[float, int | None, float]]:
    """Warm up, then ``rounds`` x ``steps`` timed steps per runner on the same batches, order rotating."""
    warm = make_batches(warmup, 1)
    first = {}
    for name, runner in runners.items():
        with torch.no_grad():
            first[name] = runner.loss(warm[0]).float().item()  # same weights, same batch: should agree
        for batch in warm:
            runner.step(batch)
    names, peak = list(runners), {}
    for r in range(rounds):
        batches = make_batches(steps, 100 + r)
        for name in names[r % len(names):] + names[:r % len(names)]:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            runners[name].timed(batches)
            if device.type == "cuda":
                peak[name] = max(peak.get(name, 0), torch.cuda.max_memory_allocated())
    return {name: (statistics.median(run.times), peak.get(name), first[name]) for name, run in runners.items()}


# --------------------------------------------------------------------------- lightly's AIM
def lightly_aim_module():
    """The repository's tests/lightly_aim.py. The lightly-layout AIM head and its converters exist only
    for the lightly peer test, so they live in tests/; this puts tests/ (beside benchmarks/) on sys.path."""
    tests = str(Path(__file__).resolve().parent.parent / "tests")
    if tests not in sys.path:
        sys.path.append(tests)
    return importlib.import_module("lightly_aim")


class LightlyAIM(nn.Module):
    """lightly's ``MaskedCausalVisionTransformer`` + ``AIMPredictionHead`` and AIM's next-patch loss, as one
    trainable module: ``forward(images, prefix_len) -> loss``."""

    def __init__(self, backbone: nn.Module, head: nn.Module, patch_size: int):
        super().__init__()
        self.backbone, self.head, self.patch_size = backbone, head, patch_size
        self.peer = lightly_aim_module()

    def forward(self, images, prefix_len):
        mask = self.peer.lightly_prefix_mask(prefix_len, self.backbone.patch_embed.num_patches)
        _, predictions = self.peer.lightly_forward(self.backbone, self.head, images, mask)
        return self.peer.aim_loss_from_lightly(predictions.float(), images, mask, self.patch_size)


def lightly_aim_pair(model: str, img_size: int, patch_size: int, options: dict, peer: bool = True, **backbone):
    """-> (mimaim AIM with lightly's head layout, ``LightlyAIM`` holding its weights, or None without ``peer``).

    mimaim's AIM trains ml-l3m's head, which lightly's ``AIMPredictionHead`` cannot hold, so both
    sides here carry the head as lightly lays it out (``lightly_style_aim``).
    ``model`` names the trunk's shape (width, depth, heads); ``backbone`` overrides it (e.g. depth=2).
    """
    from mimaim.models import create_model

    with torch.random.fork_rng(devices=[]):  # read the shape off a one-patch trunk, leaving the RNG as it was
        trunk = create_model(model, img_size=patch_size, patch_size=patch_size)
    shape = dict(embed_dim=trunk.embed_dim, depth=trunk.depth, num_heads=trunk.num_heads)
    ours = lightly_aim_module().lightly_style_aim(img_size, patch_size, options, **{**shape, **backbone})
    if not peer:
        return ours, None
    lightly_backbone, lightly_head = lightly_aim_module().build_lightly_aim(ours)
    return ours, LightlyAIM(lightly_backbone, lightly_head, patch_size)


# --------------------------------------------------------------------------- memory
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    """This process's RSS high-water mark (VmHWM). Not ``ru_maxrss``: Linux carries a parent's
    maximum into a forked child."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def rss_rise(fn: Callable[[], None]) -> int:
    """Bytes the resident set grew above its size before ``fn`` at its peak while ``fn`` ran."""
    before = rss_bytes()
    if _reset_hwm():
        fn()
        return max(0, _hwm_bytes() - before)
    peak, done = [before], threading.Event()

    def sample():  # torch kernels release the GIL
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(0, peak[0] - before)


def json_subprocess(script: str, args: list[str]) -> dict:
    """Run ``python script *args`` in a fresh process; -> the JSON object on its last stdout line."""
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{os.path.basename(script)} {' '.join(args)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- report
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine_line(device: torch.device, *libraries: str) -> str:
    """"CPU <model> (<n> cores[, avx512_bf16], load <1-min>), torch threads <t>; python, torch, <libraries>"."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = ", avx512_bf16" if "avx512_bf16" in f.read() else ""
    except OSError:
        flags = ""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    where = (f"CPU {cpu_model()} ({os.cpu_count()} cores{flags}, load {load:.1f}), "
             f"torch threads {torch.get_num_threads()}")
    if device.type == "cuda":
        where = f"GPU {torch.cuda.get_device_name()}; " + where
    versions = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    versions += [f"{name} {importlib.import_module(name).__version__}" for name in libraries]
    return f"{where}; {', '.join(versions)}"
