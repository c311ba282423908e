"""Training throughput and peak memory: mimaim's BEiT vs HF ``BeitForMaskedImageModeling``, same shape.

Both hold the same weights (``mimaim.interop.hf_beit``), see the same images, the same
blockwise masks and the same token ids, and take the same step: forward, cross-entropy on
the masked positions, backward, AdamW (betas 0.9/0.999, wd 0.05). The ids are computed
once beforehand (k-means tokenizer), so the table compares the models, not the tokenizers;
the tokenizer's own time per batch is printed below it.

Each implementation runs in a fresh subprocess per round (rounds alternate the order, so
load from other processes on a shared machine hits both alike); the table gives the median
step time over all timed steps as images/s. Peak memory: on CUDA
``torch.cuda.max_memory_allocated`` during the timed steps; on CPU the rise of peak RSS
over the RSS before the first step (``VmHWM - VmRSS`` from /proc).

    OMP_NUM_THREADS=2 python benchmarks/bench_beit.py                              # CPU: ViT-Tiny/4, 32 px
    python benchmarks/bench_beit.py --device cuda --precision bf16 --compile       # GPU: ViT-B/16, 224 px
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from common import json_subprocess, machine_line, rss_rise, sync

NAMES = ("beit (mimaim)", "beit (HF transformers)")
CPU_DEFAULTS = dict(model="vit_tiny", img_size=32, patch_size=4, batch_size=32, precision="fp32")
CUDA_DEFAULTS = dict(model="vit_base", img_size=224, patch_size=16, batch_size=128, precision="bf16")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model")
    p.add_argument("--img-size", type=int)
    p.add_argument("--patch-size", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--precision", choices=["fp32", "bf16"])
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps per model per round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for k, v in (CUDA_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def build(args):
    from mimaim.interop.hf_beit import to_hf
    from mimaim.objectives import build_objective

    torch.manual_seed(0)
    obj = build_objective("beit", args.model, args.img_size, args.patch_size, {"drop_path": 0.0})
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g)
    mask = obj.draw_masking(args.batch_size, g)
    t = time.perf_counter()
    ids = obj.visual_tokens(images)  # fits the k-means codebook on this batch
    t_fit = time.perf_counter() - t
    t = time.perf_counter()
    obj.visual_tokens(images)
    t_tok = time.perf_counter() - t
    return obj, to_hf(obj), images, mask, ids, t_fit, t_tok


def worker(args) -> dict:
    device = torch.device(args.device)
    obj, hf, images, mask, ids, t_fit, t_tok = build(args)
    if args.worker == NAMES[0]:
        model = obj
        obj.visual_tokens = lambda x: ids.to(x.device)  # the same precomputed ids as HF gets

        def loss_fn(m, x, msk):
            return m(x, msk).loss
    else:
        model = hf
        labels = ids[mask].to(device)

        def loss_fn(m, x, msk):
            return m(pixel_values=x, bool_masked_pos=msk, labels=labels).loss
    model = model.to(device).train()
    images, mask = images.to(device), mask.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05)
    step_model = torch.compile(model) if args.compile else model
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step():
        with amp:
            loss = loss_fn(step_model, images, mask)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = []

    def run():
        for _ in range(args.warmup):
            step()
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(args.steps):
            t = time.perf_counter()
            step()
            sync(device)
            times.append(time.perf_counter() - t)

    rise = rss_rise(run)  # this process's own peak over its RSS before the first step
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else rise / 2**20
    return {"times": times, "peak_mib": peak, "tok_fit_s": t_fit, "tok_s": t_tok}


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    print(f"machine: {machine_line(torch.device(args.device), 'transformers')}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}")
    print(f"shape: {args.model}/{args.patch_size} at {args.img_size}px, batch {args.batch_size}, {args.precision}"
          f"{', compiled' if args.compile else ''}, device {args.device}; {args.rounds} rounds x {args.steps} steps")
    results = {n: {"times": [], "peak": [], "tok": []} for n in NAMES}
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    for r in range(args.rounds):
        for name in (NAMES if r % 2 == 0 else NAMES[::-1]):
            res = json_subprocess(__file__, [*passthrough, "--worker", name])
            results[name]["times"] += res["times"]
            results[name]["peak"].append(res["peak_mib"])
            results[name]["tok"].append((res["tok_fit_s"], res["tok_s"]))
    print("\n| implementation | images/s (median step) | step time (s) | peak memory (MiB) |")
    print("|---|---|---|---|")
    for name in NAMES:
        t = statistics.median(results[name]["times"])
        print(f"| {name} | {args.batch_size / t:.1f} | {t:.3f} | {max(results[name]['peak']):.0f} |")
    fit, tok = results[NAMES[0]]["tok"][0]
    print(f"\nk-means tokenizer: fit on the first batch {fit:.2f}s, then {tok * 1000:.0f} ms per batch of "
          f"{args.batch_size} (not in the table)")


if __name__ == "__main__":
    main()
