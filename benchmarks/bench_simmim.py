"""Training throughput and peak memory: mimaim's SimMIM vs HF ``ViTForMaskedImageModeling``
and ``SwinForMaskedImageModeling``, at the same shape.

Each pair holds the same weights (converted with ``mimaim.interop.hf_simmim``), sees the
same images and the same ``bool_masked_pos`` and takes the same step: forward, backward,
AdamW (betas 0.9/0.999, wd 0.05, SimMIM's). The ViT pair uses the ``plain`` flavour (HF's
architecture); the official BEiT-style ViT is timed too, as "ours (beit)", with no HF peer.
Timings are interleaved (ours, HF, HF, ours, ...) in rounds so that load from other
processes hits both alike; the table gives the median step time after warm-up.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during the timed steps; on CPU
the rise of peak RSS over the RSS before the first step, in a fresh subprocess per model.

    OMP_NUM_THREADS=2 python benchmarks/bench_simmim.py                  # CPU: ViT-Tiny/4 32 px, Swin-T 64 px
    python benchmarks/bench_simmim.py --device cuda --precision bf16 --compile   # GPU: ViT-B/16 224, Swin-B 192
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

from mimaim.interop.hf_simmim import simmim_to_hf_model
from mimaim.objectives import build_objective

# (model, img, patch, mask cell, window, batch). HF's Swin (transformers 5.x) only runs when every
# stage grid is at least the window, hence 64 px / window 2 on CPU (grids 16, 8, 4, 2).
SHAPES = {
    "cpu": {"vit": ("vit_tiny", 32, 4, 8, 0, 32), "swin": ("swin_tiny", 64, 4, 16, 2, 16)},
    "cuda": {"vit": ("vit_base", 224, 16, 32, 0, 128), "swin": ("swin_base", 192, 4, 32, 6, 128)},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--backbones", default="vit,swin", help="comma list of vit,swin")
    p.add_argument("--precision", default=None, help="fp32 or bf16 (cpu default fp32, cuda default bf16)")
    p.add_argument("--batch-size", type=int, help="override the batch of every shape")
    p.add_argument("--compile", action="store_true", help="torch.compile every model")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model")
    p.add_argument("--steps", type=int, default=4, help="timed steps per model per round")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (order alternates)")
    p.add_argument("--no-memory", action="store_true", help="skip the CPU peak-memory subprocesses")
    p.add_argument("--only", help=argparse.SUPPRESS)  # memory subprocess: "<backbone>:<impl>"
    args = p.parse_args(argv)
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    return args


def shape(args, backbone):
    model, img, patch, cell, window, batch = SHAPES[args.device][backbone]
    return model, img, patch, cell, window, args.batch_size or batch


# --------------------------------------------------------------------------- setup
def build(args, backbone, impl, device):
    """One model in train mode: impl is "ours", "hf" (same weights as ours) or "beit" (ours, official ViT)."""
    model, img, patch, cell, window, _ = shape(args, backbone)
    opts = {"mask_patch_size": cell, "drop_path_rate": 0.0}
    if backbone == "swin":
        opts["window_size"] = window
    else:
        opts["vit_flavour"] = "beit" if impl == "beit" else "plain"
    torch.manual_seed(0)
    ours = build_objective("simmim", model, img, patch, opts)
    net = simmim_to_hf_model(ours) if impl == "hf" else ours
    return net.to(device).train(), ours


class Runner:
    def __init__(self, impl, model, args, device):
        self.impl, self.device = impl, device
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05)
        self.model = torch.compile(model) if args.compile else model
        self.dtype = torch.bfloat16 if args.precision == "bf16" else None
        self.times: list[float] = []

    def forward(self, images, mask):
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            if self.impl == "hf":
                return self.model(pixel_values=images, bool_masked_pos=mask).loss
            return self.model(images, mask).loss

    def step(self, images, mask):
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.forward(images, mask)
        loss.backward()
        self.optimizer.step()
        return loss

    def timed(self, batches):
        for images, mask in batches:
            sync(self.device)
            t0 = time.perf_counter()
            self.step(images, mask)
            sync(self.device)
            self.times.append(time.perf_counter() - t0)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_batches(objective, args, backbone, device, n, seed):
    _, img, _, _, _, batch = shape(args, backbone)
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, img, img, generator=g).to(device), objective.draw_masking(batch, g).to(device))
            for _ in range(n)]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --------------------------------------------------------------------------- measurements
def impls_for(backbone):
    return ["ours", "hf", "beit"] if backbone == "vit" else ["ours", "hf"]


def measure(args, backbone, device):
    """-> {impl: (median step s, peak bytes or None, first loss)}, timings interleaved."""
    runners, first = {}, {}
    for impl in impls_for(backbone):
        model, ours = build(args, backbone, impl, device)
        runners[impl] = Runner(impl, model, args, device)
    warm = make_batches(ours, args, backbone, device, args.warmup, seed=1)
    for impl, runner in runners.items():
        with torch.no_grad():
            first[impl] = runner.forward(*warm[0]).float().item()
        for images, mask in warm:
            runner.step(images, mask)
    peak = {}
    for r in range(args.rounds):
        batches = make_batches(ours, args, backbone, device, args.steps, seed=100 + r)
        order = list(runners) if r % 2 == 0 else list(reversed(runners))
        for impl in order:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            runners[impl].timed(batches)
            if device.type == "cuda":
                peak[impl] = max(peak.get(impl, 0), torch.cuda.max_memory_allocated())
    return {impl: (statistics.median(run.times), peak.get(impl), first[impl]) for impl, run in runners.items()}


def memory_probe(args, backbone, impl):
    """Run in a fresh process: peak RSS rise over the RSS before the first step."""
    device = torch.device("cpu")
    model, ours = build(args, backbone, impl, device)
    runner = Runner(impl, model, args, device)
    batches = make_batches(ours, args, backbone, device, args.warmup + 1, seed=1)
    before = rss_bytes()
    for images, mask in batches:
        runner.step(images, mask)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_bytes": max(0, peak - before)}))


def cpu_peak(args, backbone, impl):
    cmd = [sys.executable, __file__, "--device", "cpu", "--precision", args.precision, "--warmup", str(args.warmup),
           "--only", f"{backbone}:{impl}"] + (["--batch-size", str(args.batch_size)] if args.batch_size else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return json.loads(out)["peak_bytes"]


def machine(device) -> str:
    import timm
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{cpu}, {torch.get_num_threads()} threads"
    return (f"{where}; python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, timm {timm.__version__}")


def main(argv=None):
    args = parse_args(argv)
    if args.only:
        backbone, impl = args.only.split(":")
        memory_probe(args, backbone, impl)
        return
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    print(f"machine: {machine(device)}")
    print(f"precision {args.precision}, compile {args.compile}, {args.warmup} warm-up + {args.rounds}x{args.steps} "
          f"timed steps per model (forward + backward + AdamW)\n")
    print("| backbone | shape | implementation | images/s | step (ms) | peak memory (MiB) | first loss |")
    print("|---|---|---|---|---|---|---|")
    names = {"ours": "mimaim", "hf": "HF transformers", "beit": "mimaim (official BEiT-style ViT)"}
    for backbone in args.backbones.split(","):
        model, img, patch, cell, window, batch = shape(args, backbone)
        results = measure(args, backbone, device)
        desc = f"{model}/{patch} {img}px b{batch}" + (f" win{window}" if window else "")
        for impl, (step, peak, loss) in results.items():
            if peak is None and device.type == "cpu" and not args.no_memory:
                peak = cpu_peak(args, backbone, impl)
            mem = f"{peak / 2 ** 20:.0f}" if peak is not None else "-"
            print(f"| {backbone} | {desc} | {names[impl]} | {batch / step:.1f} | {step * 1e3:.0f} | {mem} | "
                  f"{loss:.5f} |", flush=True)


if __name__ == "__main__":
    main()
