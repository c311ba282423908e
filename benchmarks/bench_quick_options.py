"""Per-step time of the quick default runs, old vs new ``quick_options``, interleaved in one process.

Whole-run timings are unreliable on a shared CPU; the ratio of two configurations timed in
alternation (A, B, A, B, ...) in the same process is not. Each step is what the default run
does per optimiser step: forward, backward and a fused AdamW step on a batch of 64 32-px
images (vit_micro/4, the defaults of ``mimaim pretrain``), with the objective's own masking.

    python benchmarks/bench_quick_options.py --rounds 20 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mimaim.engine.optim import build_optimizer
from mimaim.objectives import build_objective

CANDIDATES = {
    "mae": [{"decoder_embed_dim": 128, "decoder_depth": 2, "decoder_num_heads": 4},
            {"decoder_embed_dim": 128, "decoder_depth": 1, "decoder_num_heads": 4},
            {"decoder_embed_dim": 64, "decoder_depth": 2, "decoder_num_heads": 4},
            {"decoder_embed_dim": 64, "decoder_depth": 2, "decoder_num_heads": 2}],
    "aim": [{"head_depth": 2, "head_width": 256},  # the old quick head
            {"head_depth": 2, "head_width": 128},
            {"head_depth": 1, "head_width": 128}],
    "simmim": [{"mask_patch_size": 8, "window_size": 4, "drop_path_rate": 0.0},
               {"mask_patch_size": 8, "window_size": 4, "drop_path_rate": 0.0, "vit_flavour": "plain"}],
}


def make_step(name, options, batch, seed=0):
    torch.manual_seed(seed)
    obj = build_objective(name, "vit_micro", 32, 4, options)
    opt = build_optimizer(obj, 1e-4, 0.05, (0.9, 0.95), obj.no_weight_decay())
    x = torch.randn(batch, 3, 32, 32)
    masking = obj.draw_masking(batch, torch.Generator().manual_seed(seed))

    def step():
        loss = obj(x, masking).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objectives", default="mae,aim,simmim")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.objectives.split(","):
        steps = [make_step(name, o, args.batch) for o in CANDIDATES[name]]
        for s in steps:  # warm-up
            s()
            s()
        times = [[] for _ in steps]
        for _ in range(args.rounds):
            for i, s in enumerate(steps):
                t0 = time.perf_counter()
                s()
                times[i].append(time.perf_counter() - t0)
        base = statistics.median(times[0])
        print(f"{name}: baseline {CANDIDATES[name][0]} median {base * 1000:.0f} ms/step")
        for o, t in zip(CANDIDATES[name][1:], times[1:]):
            # per-round ratio against the baseline timed next to it, then the median
            ratios = [b / a for a, b in zip(times[0], t)]
            print(f"  {o}: median {statistics.median(t) * 1000:.0f} ms/step, ratio to baseline "
                  f"{statistics.median(ratios):.2f} (IQR {statistics.quantiles(ratios, n=4)[0]:.2f}-"
                  f"{statistics.quantiles(ratios, n=4)[2]:.2f})")


if __name__ == "__main__":
    main()
