"""Data-loader throughput beside the model's, on an image folder.

On a 2-core machine JPEG decoding competes with training for the same cores. This prints
how many images/s the loader alone delivers (decode + RandomResizedCrop + flip + normalise
+ masking draw), with and without the decoded in-memory cache and with 0 or 1 worker
processes, beside how many images/s a training step consumes, so that you can see which
one bounds a run.

    python benchmarks/bench_loader.py --data imagefolder:/tmp/cifar/train
    python benchmarks/bench_loader.py --data imagefolder:PATH --objective aim --model vit_tiny --batch-size 128
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from mimaim.config import make_config
from mimaim.data import GlobalBatchSampler, PretrainDataset, build_source, make_loader, pretrain_transform
from mimaim.engine.optim import build_optimizer
from mimaim.engine.trainer import build_run_objective


def loader_rate(dataset, batch_size: int, workers: int, batches: int) -> float:
    sampler = GlobalBatchSampler(len(dataset), batch_size, seed=0, epoch=0)
    loader = make_loader(dataset, sampler, workers)
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    start = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += next(it)["image"].shape[0]
    return n / (time.perf_counter() - start)


def model_rate(cfg, steps: int) -> float:
    objective = build_run_objective(cfg)
    optimizer = build_optimizer(objective, 1e-4, 0.05, (0.9, 0.95), objective.no_weight_decay())
    images = torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size)
    masking = objective.draw_masking(cfg.batch_size, torch.Generator().manual_seed(0))
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        objective(images, masking).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return cfg.batch_size / sorted(times[1:])[len(times[1:]) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="imagefolder:PATH")
    p.add_argument("--objective", default="mae")
    p.add_argument("--model", default="vit_micro")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=20, help="batches timed per loader setting")
    p.add_argument("--steps", type=int, default=5, help="training steps timed")
    args = p.parse_args()

    cfg = make_config(dict(objective=args.objective, model=args.model, img_size=args.img_size,
                           patch_size=args.patch_size, batch_size=args.batch_size, data=args.data))
    objective = build_run_objective(cfg)
    aug = objective.augmentation
    transform = pretrain_transform(cfg.img_size, aug.crop_scale, aug.crop_ratio, aug.hflip, aug.color_jitter)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    t = time.perf_counter()
    raw = build_source(args.data, cache="off", progress=False)
    for workers in (0, 1):
        ds = PretrainDataset(raw, transform, objective.sample_masking, seed=0)
        rows.append((f"JPEG decoded every epoch, {workers} worker(s)", loader_rate(ds, args.batch_size, workers, args.batches)))
    t = time.perf_counter()
    cached = build_source(args.data, cache="on", progress=False)
    decode_s = time.perf_counter() - t
    for workers in (0, 1):
        ds = PretrainDataset(cached, transform, objective.sample_masking, seed=0)
        rows.append((f"decoded cache, {workers} worker(s)", loader_rate(ds, args.batch_size, workers, args.batches)))
    rows.append((f"training step: {args.objective} {args.model}/{args.patch_size} at {args.img_size}px, fp32",
                 model_rate(cfg, args.steps)))
    width = max(len(r[0]) for r in rows)
    print(f"\n{len(raw)} images; building the decoded cache took {decode_s:.1f}s "
          f"({sum(a.nbytes for a in cached.items) / 2**20:.0f} MiB)\n")
    print(f"| {'what':<{width}} | images/s |")
    print(f"|{'-' * (width + 2)}|----------|")
    for name, rate in rows:
        print(f"| {name:<{width}} | {rate:8.0f} |")


if __name__ == "__main__":
    main()
