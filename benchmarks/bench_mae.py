"""Training throughput and peak memory: mimaim's MAE vs HF ``ViTMAEForPreTraining``.

Both hold the same weights (converted with ``mimaim.interop.hf_mae``), see the same
images and the same masking noise, and take the same step: forward, backward, AdamW
(betas 0.9/0.95, wd 0.05). Timings are interleaved (ours, HF, HF, ours, ...) in rounds so
that load from other processes on a shared machine hits both alike; the table gives the
median step time over all timed steps after warm-up.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during the timed steps; on CPU
the rise of the resident set size during three steps over the RSS before them (weights,
batches and the allocator's cache excluded; activations, gradients and AdamW state
included), in a fresh subprocess per implementation (``common.rss_rise``).

    OMP_NUM_THREADS=2 python benchmarks/bench_mae.py                 # CPU: ViT-Tiny/4, 32 px, batch 64, fp32 + bf16
    python benchmarks/bench_mae.py --device cuda --compile           # GPU: ViT-B/16, 224 px, bf16, SDPA
"""

from __future__ import annotations

import argparse
import gc
import json

import torch

from common import (Runner, interleaved, json_subprocess, machine_line, repeat_arguments, rss_rise,
                    shape_arguments)
from mimaim.interop.hf_mae import mae_to_hf_model
from mimaim.objectives import build_objective

CPU_DEFAULTS = dict(model="vit_tiny", img_size=32, patch_size=4, batch_size=64, precision="fp32,bf16",
                    decoder="128,2,4")
CUDA_DEFAULTS = dict(model="vit_base", img_size=224, patch_size=16, batch_size=128, precision="bf16",
                     decoder="512,8,16")


def parse_args(argv=None):
    p = shape_arguments(argparse.ArgumentParser(description=__doc__,
                                                formatter_class=argparse.RawDescriptionHelpFormatter))
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


def runner(name, model, args, device, precision):
    if name == "ours":
        def loss_fn(m, batch):
            return m(batch[0], masking=batch[1]).loss
    else:
        def loss_fn(m, batch):
            return m(pixel_values=batch[0], noise=batch[1]).loss
    return Runner(name, model, loss_fn, device, precision, args.compile, betas=(0.9, 0.95), fused=True)


def make_batches(args, device, n, seed):
    g = torch.Generator().manual_seed(seed)
    num_patches = (args.img_size // args.patch_size) ** 2
    return [(torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g).to(device),
             torch.rand(args.batch_size, num_patches, generator=g).to(device)) for _ in range(n)]


# --------------------------------------------------------------------------- measurements
def measure_precision(args, device, precision):
    """Interleaved timing of ours and HF at one precision -> dict name -> (median s, peak bytes, loss0)."""
    ours, hf = build_pair(args, device)
    runners = {"ours": runner("ours", ours, args, device, precision), "hf": runner("hf", hf, args, device, precision)}
    return interleaved(runners, lambda n, seed: make_batches(args, device, n, seed), device, args.warmup,
                       args.rounds, args.steps)


def memory_probe(args):
    """Subprocess body: the peak RSS over a few steps of one model, less the RSS before them."""
    device = torch.device("cpu")
    ours, hf = build_pair(args, device)
    model = ours if args.only == "ours" else hf
    del ours, hf
    gc.collect()
    run = runner(args.only, model, args, device, args.precision)
    batches = make_batches(args, device, 3, seed=1)
    print(json.dumps({"peak_rise": rss_rise(lambda: [run.step(b) for b in batches])}))


def cpu_peak_memory(args, name, precision):
    cmd = ["--memory-probe", "--only", name, "--precision", precision,
           *repeat_arguments(args, "model", "img_size", "patch_size", "batch_size", "decoder", "mask_ratio")]
    return json_subprocess(__file__, cmd)["peak_rise"]


# --------------------------------------------------------------------------- report
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
    print(machine_line(device, "transformers"))
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
    print("| precision | model | images/s | step ms | peak memory MiB | vs HF | loss at step 0 |")
    print("|---|---|---|---|---|---|---|")
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
