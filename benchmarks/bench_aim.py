"""Training throughput and peak memory: mimaim's AIM vs mimaim's MAE vs lightly's AIM, same shape.

* ``aim (mimaim)``: prefix-causal trunk over all N patches + MLP head; on CUDA the mask runs
  through ``flex_attention`` with a ``BlockMask`` (``--kernel sdpa`` forces the dense mask).
* ``aim (lightly)``: ``MaskedCausalVisionTransformer`` + ``AIMPredictionHead`` holding the
  *same weights* (``mimaim.interop.lightly_aim``), dense boolean mask through SDPA, trained on
  AIM's next-patch loss.
* ``mae (mimaim)``: MAE on the same trunk shape (encoder sees 25% of the patches).

Each step is forward, backward and AdamW (betas 0.9/0.95, wd 0.05) on random images with the
same prefix lengths for both AIMs. Timings are interleaved in rounds (order rotating) so that
load from other processes on a shared machine hits all alike; the table reports the median
step time over all timed steps after warm-up, as images/s.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during the timed steps; on CPU the
rise of the RSS high-water mark (VmHWM) over the RSS before the first step, in a fresh
subprocess per model.

    OMP_NUM_THREADS=2 python benchmarks/bench_aim.py                     # CPU: ViT-Tiny/4, 32 px, batch 64
    python benchmarks/bench_aim.py --device cuda --precision bf16 --compile   # GPU: ViT-B/16, 224 px
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from mimaim.interop.lightly_aim import aim_loss_from_lightly, build_lightly_aim, lightly_forward, lightly_prefix_mask
from mimaim.objectives import build_objective

NAMES = ("aim (mimaim)", "aim (lightly)", "mae (mimaim)")
CPU_DEFAULTS = dict(model="vit_tiny", img_size=32, patch_size=4, batch_size=64, precision="fp32", head="256,2",
                    decoder="128,2,4")
CUDA_DEFAULTS = dict(model="vit_base", img_size=224, patch_size=16, batch_size=128, precision="bf16", head="2048,12",
                     decoder="512,8,16")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", help="mimaim model name (cpu: vit_tiny, cuda: vit_base)")
    p.add_argument("--img-size", type=int)
    p.add_argument("--patch-size", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--precision", choices=["fp32", "bf16"], help="cpu: fp32, cuda: bf16")
    p.add_argument("--head", help="AIM head width,depth (cpu: 256,2 = recipe quick; cuda: 2048,12 = paper)")
    p.add_argument("--decoder", help="MAE decoder width,depth,heads (cpu: 128,2,4 = quick; cuda: 512,8,16 = paper)")
    p.add_argument("--kernel", default="auto", choices=["auto", "flex", "sdpa"], help="mimaim AIM attention kernel")
    p.add_argument("--compile", action="store_true", help="torch.compile every model")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model")
    p.add_argument("--steps", type=int, default=3, help="timed steps per model per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (order rotates)")
    p.add_argument("--no-memory", action="store_true", help="skip the CPU peak-memory subprocesses")
    p.add_argument("--only", choices=NAMES, help=argparse.SUPPRESS)  # memory subprocess
    p.add_argument("--memory-probe", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key, value in (CUDA_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# --------------------------------------------------------------------------- models
class LightlyAIM(nn.Module):
    """lightly's two modules plus AIM's loss, as one trainable module."""

    def __init__(self, backbone, head, patch_size):
        super().__init__()
        self.backbone, self.head, self.patch_size = backbone, head, patch_size

    def forward(self, images, prefix_len):
        mask = lightly_prefix_mask(prefix_len, self.backbone.patch_embed.num_patches)
        _, predictions = lightly_forward(self.backbone, self.head, images, mask)
        return aim_loss_from_lightly(predictions.float(), images, mask, self.patch_size)


def build(name, args, device):
    torch.manual_seed(0)
    width, depth = (int(v) for v in args.head.split(","))
    if name == "mae (mimaim)":
        w, d, h = (int(v) for v in args.decoder.split(","))
        model = build_objective("mae", args.model, args.img_size, args.patch_size,
                                dict(decoder_embed_dim=w, decoder_depth=d, decoder_num_heads=h))
    else:
        model = build_objective("aim", args.model, args.img_size, args.patch_size,
                                dict(head_width=width, head_depth=depth, attention_kernel=args.kernel))
        if name == "aim (lightly)":
            backbone, head = build_lightly_aim(model)
            model = LightlyAIM(backbone, head, args.patch_size)
    return model.to(device).train()


class Runner:
    def __init__(self, name, model, args, device):
        self.name, self.device = name, device
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
        self.model = torch.compile(model) if args.compile else model
        self.dtype = torch.bfloat16 if args.precision == "bf16" else None
        self.times: list[float] = []

    def step(self, batch):
        images, prefix_len, noise = batch
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            if self.name == "aim (lightly)":
                loss = self.model(images, prefix_len)
            else:
                loss = self.model(images, noise if self.name.startswith("mae") else prefix_len).loss
        loss.backward()
        self.optimizer.step()
        return loss

    def timed_steps(self, batches):
        for batch in batches:
            sync(self.device)
            t0 = time.perf_counter()
            self.step(batch)
            sync(self.device)
            self.times.append(time.perf_counter() - t0)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_batches(args, device, n, seed):
    g = torch.Generator().manual_seed(seed)
    N = (args.img_size // args.patch_size) ** 2
    return [(torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g).to(device),
             torch.randint(1, N, (args.batch_size,), generator=g).to(device),
             torch.rand(args.batch_size, N, generator=g).to(device)) for _ in range(n)]


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's RSS high-water mark (VmHWM). Not ``ru_maxrss``: Linux carries the parent's
    maximum into a forked child, so a subprocess of a large parent would report the parent's peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


# --------------------------------------------------------------------------- measurements
def measure(args, device):
    runners = {name: Runner(name, build(name, args, device), args, device) for name in NAMES}
    for runner in runners.values():
        for batch in make_batches(args, device, args.warmup, seed=1):
            runner.step(batch)
    peak = {}
    for r in range(args.rounds):
        batches = make_batches(args, device, args.steps, seed=100 + r)
        order = NAMES[r % 3:] + NAMES[:r % 3]
        for name in order:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            runners[name].timed_steps(batches)
            if device.type == "cuda":
                peak[name] = max(peak.get(name, 0), torch.cuda.max_memory_allocated())
    return {name: (statistics.median(run.times), peak.get(name)) for name, run in runners.items()}


def memory_probe(args):
    device = torch.device("cpu")
    runner = Runner(args.only, build(args.only, args, device), args, device)
    batches = make_batches(args, device, 2, seed=1)
    before = current_rss_bytes()
    for batch in batches:
        runner.step(batch)
    print(json.dumps({"peak_rise": peak_rss_bytes() - before}))


def cpu_peak_memory(args, name):
    cmd = [sys.executable, __file__, "--memory-probe", "--only", name, "--device", "cpu", "--model", args.model,
           "--img-size", str(args.img_size), "--patch-size", str(args.patch_size), "--batch-size",
           str(args.batch_size), "--precision", args.precision, "--head", args.head, "--decoder", args.decoder,
           "--kernel", args.kernel]
    if args.compile:
        cmd.append("--compile")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rise"]


def machine_line(device):
    import lightly
    import timm

    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    where = f"CPU {cpu} ({os.cpu_count()} cores, load {load:.1f}), torch threads {torch.get_num_threads()}"
    if device.type == "cuda":
        where = f"GPU {torch.cuda.get_device_name()}; " + where
    return (f"{where}; python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, "
            f"lightly {lightly.__version__}")


def main(argv=None):
    args = parse_args(argv)
    if args.memory_probe:
        memory_probe(args)
        return
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but CUDA is not available")
    results = measure(args, device)
    print(f"# {machine_line(device)}")
    print(f"# {args.model}/{args.patch_size} at {args.img_size}px, batch {args.batch_size}, {args.precision}, "
          f"AIM head {args.head} (width,depth), MAE decoder {args.decoder}, kernel {args.kernel}, "
          f"compile {args.compile}; median of {args.rounds}x{args.steps} steps after {args.warmup} warm-up")
    print("| model | step (ms) | images/s | peak memory (MiB) |")
    print("|---|---|---|---|")
    for name in NAMES:
        seconds, peak = results[name]
        if peak is None and device.type == "cpu" and not args.no_memory:
            peak = cpu_peak_memory(args, name)
        mem = f"{peak / 2**20:.0f}" if peak is not None else "-"
        print(f"| {name} | {seconds * 1e3:.0f} | {args.batch_size / seconds:.1f} | {mem} |")


if __name__ == "__main__":
    main()
