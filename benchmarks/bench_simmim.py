"""Training throughput and peak memory: mimaim's SimMIM vs HF ``ViTForMaskedImageModeling``
and ``SwinForMaskedImageModeling``, at the same shape.

Each pair holds the same weights (converted with ``mimaim.interop.hf_simmim``), sees the
same images and the same ``bool_masked_pos`` and takes the same step: forward, backward,
AdamW (betas 0.9/0.999, wd 0.05, SimMIM's). The ViT pair uses the ``plain`` flavour (HF's
architecture); the official BEiT-style ViT is timed too, as "ours (beit)", with no HF peer.
Timings are interleaved (ours, HF, HF, ours, ...) in rounds so that load from other
processes hits both alike; the table gives the median step time after warm-up.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during the timed steps; on CPU
the rise of the resident set over the RSS before the first step, in a fresh subprocess per model
(``common.rss_rise``).

    OMP_NUM_THREADS=2 python benchmarks/bench_simmim.py                  # CPU: ViT-Tiny/4 32 px, Swin-T 64 px
    python benchmarks/bench_simmim.py --device cuda --precision bf16 --compile   # GPU: ViT-B/16 224, Swin-B 192
"""

from __future__ import annotations

import argparse
import json

import torch

from common import Runner, interleaved, json_subprocess, machine_line, rss_rise
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


def runner(impl, model, args, device):
    def loss_fn(m, batch):
        images, mask = batch
        if impl == "hf":
            return m(pixel_values=images, bool_masked_pos=mask).loss
        return m(images, mask).loss
    return Runner(impl, model, loss_fn, device, args.precision, args.compile, betas=(0.9, 0.999))


def make_batches(objective, args, backbone, device, n, seed):
    _, img, _, _, _, batch = shape(args, backbone)
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, img, img, generator=g).to(device), objective.draw_masking(batch, g).to(device))
            for _ in range(n)]


# --------------------------------------------------------------------------- measurements
def impls_for(backbone):
    return ["ours", "hf", "beit"] if backbone == "vit" else ["ours", "hf"]


def measure(args, backbone, device):
    """-> {impl: (median step s, peak bytes or None, first loss)}, timings interleaved."""
    runners = {}
    for impl in impls_for(backbone):
        model, ours = build(args, backbone, impl, device)
        runners[impl] = runner(impl, model, args, device)
    return interleaved(runners, lambda n, seed: make_batches(ours, args, backbone, device, n, seed), device,
                       args.warmup, args.rounds, args.steps)


def memory_probe(args, backbone, impl):
    """Run in a fresh process: peak RSS rise over the RSS before the first step."""
    device = torch.device("cpu")
    model, ours = build(args, backbone, impl, device)
    run = runner(impl, model, args, device)
    batches = make_batches(ours, args, backbone, device, args.warmup + 1, seed=1)
    print(json.dumps({"peak_bytes": rss_rise(lambda: [run.step(b) for b in batches])}))


def cpu_peak(args, backbone, impl):
    cmd = ["--device", "cpu", "--precision", args.precision, "--warmup", str(args.warmup),
           "--only", f"{backbone}:{impl}"] + (["--batch-size", str(args.batch_size)] if args.batch_size else [])
    return json_subprocess(__file__, cmd)["peak_bytes"]


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
    print(f"machine: {machine_line(device, 'transformers', 'timm')}")
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
