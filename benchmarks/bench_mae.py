"""Training throughput and peak memory: mimaim's MAE vs HF ``ViTMAEForPreTraining``.

Both hold the same weights (converted with ``mimaim.interop.hf_mae``), see the same
images and the same masking noise, and take the same step: forward, backward, AdamW
(betas 0.9/0.95, wd 0.05). Timings are interleaved (ours, HF, HF, ours, ...) in rounds so
that load from other processes on a shared machine hits both alike; the table gives the
median step time over all timed steps after warm-up.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during the timed steps; on CPU
the rise of the resident set size during three steps over the RSS before them (weights,
batches and the allocator's cache excluded; activations, gradients and AdamW state
included), sampled each millisecond in a fresh subprocess per implementation.

    OMP_NUM_THREADS=2 python benchmarks/bench_mae.py                 # CPU: ViT-Tiny/4, 32 px, batch 64, fp32 + bf16
    python benchmarks/bench_mae.py --device cuda --compile           # GPU: ViT-B/16, 224 px, bf16, SDPA
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time

import torch

from mimaim.interop.hf_mae import mae_to_hf_model
from mimaim.objectives import build_objective

CPU_DEFAULTS = dict(model="vit_tiny", img_size=32, patch_size=4, batch_size=64, precision="fp32,bf16",
                    decoder="128,2,4")
CUDA_DEFAULTS = dict(model="vit_base", img_size=224, patch_size=16, batch_size=128, precision="bf16",
                     decoder="512,8,16")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", help="mimaim model name (cpu: vit_tiny, cuda: vit_base)")
    p.add_argument("--img-size", type=int)
    p.add_argument("--patch-size", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--precision", help="comma list of fp32,bf16 (cpu: fp32,bf16; cuda: bf16)")
    p.add_argument("--decoder", help="decoder width,depth,heads (cpu: 128,2,4 = recipe quick; cuda: 512,8,16 = paper)")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model and precision")
    p.add_argument("--steps", type=int, default=4, help="timed steps per model per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (order alternates)")
    p.add_argument("--no-memory", action="store_true", help="skip the CPU peak-memory subprocesses")
    p.add_argument("--only", choices=["ours", "hf"], help=argparse.SUPPRESS)  # memory subprocess
    p.add_argument("--memory-probe", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    defaults = CUDA_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# --------------------------------------------------------------------------- setup
def build_pair(args, device):
    """(ours, hf) with identical weights, both in train mode on ``device``."""
    width, depth, heads = (int(v) for v in args.decoder.split(","))
    torch.manual_seed(0)
    ours = build_objective("mae", args.model, args.img_size, args.patch_size,
                           dict(decoder_embed_dim=width, decoder_depth=depth, decoder_num_heads=heads,
                                mask_ratio=args.mask_ratio, norm_pix_loss=True))
    hf = mae_to_hf_model(ours, attn_implementation="sdpa")
    return ours.to(device).train(), hf.to(device).train()


class Runner:
    """One model + its AdamW; ``step(images, noise)`` is one training step, returns the loss."""

    def __init__(self, name, model, args, device, precision):
        self.name, self.device = name, device
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=True)
        self.model = torch.compile(model) if args.compile else model
        self.dtype = torch.bfloat16 if precision == "bf16" else None
        self.times: list[float] = []

    def forward(self, images, noise):
        if self.name == "ours":
            return self.model(images, masking=noise).loss
        return self.model(pixel_values=images, noise=noise).loss

    def step(self, images, noise):
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            loss = self.forward(images, noise)
        loss.backward()
        self.optimizer.step()
        return loss

    def timed_steps(self, batches):
        for images, noise in batches:
            sync(self.device)
            t0 = time.perf_counter()
            self.step(images, noise)
            sync(self.device)
            self.times.append(time.perf_counter() - t0)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_batches(args, device, n, seed):
    g = torch.Generator().manual_seed(seed)
    num_patches = (args.img_size // args.patch_size) ** 2
    return [(torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g).to(device),
             torch.rand(args.batch_size, num_patches, generator=g).to(device)) for _ in range(n)]


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --------------------------------------------------------------------------- measurements
def measure_precision(args, device, precision):
    """Interleaved timing of ours and HF at one precision -> dict name -> (median s, peak bytes, loss0)."""
    ours, hf = build_pair(args, device)
    runners = {"ours": Runner("ours", ours, args, device, precision),
               "hf": Runner("hf", hf, args, device, precision)}
    warm = make_batches(args, device, args.warmup, seed=1)
    first_loss = {}
    for name, runner in runners.items():
        with torch.no_grad(), torch.autocast(device.type, dtype=runner.dtype, enabled=runner.dtype is not None):
            first_loss[name] = runner.forward(*warm[0]).float().item()  # same weights, same noise
        for images, noise in warm:
            runner.step(images, noise)
    peak = {}
    for r in range(args.rounds):
        batches = make_batches(args, device, args.steps, seed=100 + r)
        order = ["ours", "hf"] if r % 2 == 0 else ["hf", "ours"]
        for name in order:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            runners[name].timed_steps(batches)
            if device.type == "cuda":
                peak[name] = max(peak.get(name, 0), torch.cuda.max_memory_allocated())
    return {name: (statistics.median(run.times), peak.get(name), first_loss[name]) for name, run in runners.items()}


def memory_probe(args):
    """Subprocess body: the peak RSS over a few steps of one model, less the RSS before them.

    RSS is sampled every millisecond by a thread (torch kernels release the GIL);
    ``resource.getrusage`` would also count peaks from building and converting the models.
    """
    device = torch.device("cpu")
    ours, hf = build_pair(args, device)
    model = ours if args.only == "ours" else hf
    del ours, hf
    gc.collect()
    runner = Runner(args.only, model, args, device, args.precision)
    batches = make_batches(args, device, 3, seed=1)
    before = current_rss_bytes()
    peak, done = [before], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], current_rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for images, noise in batches:
        runner.step(images, noise)
    done.set()
    sampler.join()
    print(json.dumps({"peak_rise": peak[0] - before}))


def cpu_peak_memory(args, name, precision):
    cmd = [sys.executable, __file__, "--memory-probe", "--only", name, "--precision", precision,
           "--device", "cpu", "--model", args.model, "--img-size", str(args.img_size),
           "--patch-size", str(args.patch_size), "--batch-size", str(args.batch_size),
           "--decoder", args.decoder, "--mask-ratio", str(args.mask_ratio)]
    if args.compile:
        cmd.append("--compile")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rise"]


# --------------------------------------------------------------------------- report
def machine_line(device):
    import transformers

    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = " avx512_bf16" if "avx512_bf16" in f.read() else ""
    except OSError:
        pass
    where = f"CPU {cpu} ({os.cpu_count()} cores{flags}), torch threads {torch.get_num_threads()}"
    if device.type == "cuda":
        where = f"GPU {torch.cuda.get_device_name()}; " + where
    return f"{where}; torch {torch.__version__}, transformers {transformers.__version__}"


def main(argv=None):
    args = parse_args(argv)
    if args.memory_probe:
        return memory_probe(args)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; run without --device for the CPU benchmark")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    print(machine_line(device))
    print(f"MAE {args.model}/{args.patch_size} at {args.img_size} px, batch {args.batch_size}, decoder "
          f"{args.decoder} (width,depth,heads), mask ratio {args.mask_ratio}, norm_pix_loss, AdamW; "
          f"SDPA attention{', torch.compile' if args.compile else ''}; median of {args.rounds}x{args.steps} "
          f"interleaved steps after {args.warmup} warm-up")
    rows = []
    for precision in args.precision.split(","):
        result = measure_precision(args, device, precision)
        for name in ("ours", "hf"):
            median, peak, loss0 = result[name]
            if device.type == "cpu" and not args.no_memory:
                peak = cpu_peak_memory(args, name, precision)
            rows.append((precision, name, args.batch_size / median, median, peak, loss0))
    print()
    print(f"| precision | model | images/s | step ms | peak memory MiB | vs HF | loss at step 0 |")
    print(f"|---|---|---|---|---|---|---|")
    by_key = {(r[0], r[1]): r for r in rows}
    for precision, name, ips, median, peak, loss0 in rows:
        label = "mimaim MAE" if name == "ours" else "HF ViTMAEForPreTraining"
        ratio = ips / by_key[(precision, "hf")][2]
        mem = "-" if peak is None else f"{peak / 2**20:.0f}"
        print(f"| {precision} | {label} | {ips:.1f} | {median * 1e3:.1f} | {mem} | {ratio:.2f}x | {loss0:.5f} |")
    if "fp32" in args.precision and "bf16" in args.precision:
        for name in ("ours", "hf"):
            print(f"bf16 / fp32 speed-up, {name}: {by_key[('bf16', name)][2] / by_key[('fp32', name)][2]:.2f}x")
        print(f"mimaim bf16 / HF fp32: {by_key[('bf16', 'ours')][2] / by_key[('fp32', 'hf')][2]:.2f}x")


if __name__ == "__main__":
    main()
