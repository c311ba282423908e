"""Data-loader throughput: JPEG folder vs WebDataset shards vs decoded cache, beside the model's.

On a 2-core machine JPEG decoding competes with training for the same cores. This prints
how many images/s the training loader alone delivers (``make_epoch_loader``: read + decode
+ RandomResizedCrop + flip + normalise + masking draw + collate) from

* the image folder, every JPEG decoded every epoch (``--cache off``),
* WebDataset shards written from the same images (``mimaim shards``; ``--data wds:...``),
* the decoded in-memory cache (``--cache on``; no file read, no decode),

with 0 and 1 worker processes, beside how many images/s a training step consumes, so that
you can see which one bounds a run. The settings are timed in interleaved rounds and the
best round printed, with the CPU model and the load average before and after (other
processes on the machine slow every row alike).

    python benchmarks/bench_loader.py --data imagefolder:/tmp/cifar/train --max-images 10000
    python benchmarks/bench_loader.py --data imagefolder:PATH --shards SHARD_DIR --workers 0,1,2,4

``--data imagefolder:PATH`` is any folder of images with class sub-folders. The numbers in
docs/results.md used the CIFAR-10 training split as an image-folder tree of JPEGs
(``train/<class>/<n>.jpg``, 50,000 images), which you write yourself from the CIFAR-10 python
batches (https://www.cs.toronto.edu/~kriz/cifar.html).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time

import torch

from mimaim.config import make_config
from mimaim.data import build_source, make_epoch_loader, pretrain_transform, training_subset
from mimaim.data.shards import build_shard_source, write_shards
from mimaim.data.sources import decode_all
from mimaim.engine.optim import build_optimizer
from mimaim.engine.build import build_run_objective


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        import platform

        return platform.processor() or platform.machine()


def loader_rate(source, transform, masking_fn, batch_size: int, workers: int, batches: int) -> float:
    loader = make_epoch_loader(source, transform, masking_fn, seed=0, epoch=0, start_step=0, batch_size=batch_size,
                               accum_steps=1, rank=0, world_size=1, num_workers=workers, pin_memory=False)
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    start = time.perf_counter()
    n = 0
    for _, batch in zip(range(batches or len(loader) - 1), it):
        n += batch["image"].shape[0]
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
    p.add_argument("--data", required=True, help="imagefolder:PATH, a folder of images with class sub-folders "
                   "(e.g. the CIFAR-10 training split as JPEGs, train/<class>/<n>.jpg)")
    p.add_argument("--max-images", type=int, default=0,
                   help="use this many images, the same share of each class (0: all)")
    p.add_argument("--shards", help="existing shards of the same images (default: written to a temporary folder)")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--workers", default="0,1", help="comma-separated loader worker counts")
    p.add_argument("--objective", default="mae")
    p.add_argument("--model", default="vit_micro")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=0,
                   help="batches timed per loader setting (0: the whole epoch after the first batch; shards read "
                        "a whole shard when a stream starts, so short timings understate them)")
    p.add_argument("--rounds", type=int, default=2,
                   help="interleaved rounds over all settings; the best round is printed (other load only slows)")
    p.add_argument("--steps", type=int, default=5, help="training steps timed (0: no model row)")
    args = p.parse_args()

    cfg = make_config(dict(objective=args.objective, model=args.model, img_size=args.img_size,
                           patch_size=args.patch_size, batch_size=args.batch_size, data=args.data))
    objective = build_run_objective(cfg)
    transform = pretrain_transform(cfg.img_size, objective.augmentation)
    masking_fn = objective.sample_masking
    load_before = os.getloadavg()
    print(f"CPU: {cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; load average {load_before[0]:.1f} (1 min) before")

    raw = build_source(args.data, cache="off", progress=False)
    if args.max_images and args.max_images < len(raw):
        raw = training_subset(raw, args.max_images / len(raw), seed=0)
    workers = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench_loader_shards_") as tmp:
        t = time.perf_counter()
        if args.shards:
            shards = build_shard_source(args.shards)
            shard_note = f"shards from {args.shards}"
        else:
            write_shards(raw, tmp, args.shard_size, progress=False)
            shards = build_shard_source(tmp)
            shard_note = f"writing {len(shards.shards)} shards took {time.perf_counter() - t:.1f}s"
        t = time.perf_counter()
        cached = decode_all(raw, max_bad_fraction=0.01, progress=False)
        decode_s = time.perf_counter() - t
        settings = [(f"{name}, {w} worker(s)", source, w) for w in workers
                    for name, source in (("JPEG folder, decoded every epoch", raw), ("WebDataset shards", shards),
                                         ("decoded in-memory cache", cached))]
        rates: dict[str, list[float]] = {}
        for _ in range(args.rounds):  # interleaved, so a burst of other load hits every setting alike
            for name, source, w in settings:
                rates.setdefault(name, []).append(
                    loader_rate(source, transform, masking_fn, args.batch_size, w, args.batches))
        rows = [(name, max(r)) for name, r in rates.items()]
    if args.steps:
        rows.append((f"training step: {args.objective} {args.model}/{args.patch_size} at {args.img_size}px, fp32",
                     model_rate(cfg, args.steps)))
    load_after = os.getloadavg()
    width = max(len(r[0]) for r in rows)
    timed = f"{args.batches} batches" if args.batches else "one epoch"
    print(f"\n{len(raw)} images of {args.data}, batch {args.batch_size}, {timed} timed per row, best of "
          f"{args.rounds} interleaved rounds; "
          f"{shard_note}; building the decoded cache took {decode_s:.1f}s "
          f"({sum(a.nbytes for a in cached.items) / 2**20:.0f} MiB); load average {load_after[0]:.1f} after\n")
    print(f"| {'what':<{width}} | images/s |")
    print(f"|{'-' * (width + 2)}|----------|")
    for name, rate in rows:
        print(f"| {name:<{width}} | {rate:8.0f} |")


if __name__ == "__main__":
    main()
