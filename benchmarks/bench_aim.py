"""Training throughput and peak memory: mimaim's AIM vs mimaim's MAE vs lightly's AIM, same shape.

* ``aim (mimaim)``: prefix-causal trunk over all N patches + MLP head; on CUDA the mask runs
  through ``flex_attention`` with a ``BlockMask`` (``--kernel sdpa`` forces the dense mask).
  The head is laid out as lightly's (``lightly_style_aim`` from the repository's
  tests/lightly_aim.py, reached through ``common.lightly_aim_pair``) so that both sides hold the
  same weights; the head mimaim trains (ml-l3m's) adds a LayerNorm per block and biases.
* ``aim (lightly)``: ``MaskedCausalVisionTransformer`` + ``AIMPredictionHead`` holding the
  *same weights* (tests/lightly_aim.py's converters), dense boolean mask through SDPA, trained on
  AIM's next-patch loss.
* ``mae (mimaim)``: MAE on the same trunk shape (encoder sees 25% of the patches).

Each step is forward, backward and AdamW (betas 0.9/0.95, wd 0.05) on random images with the
same prefix lengths for both AIMs. Timings are interleaved in rounds (order rotating) so that
load from other processes on a shared machine hits all alike; the table reports the median
step time over all timed steps after warm-up, as images/s.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during the timed steps; on CPU the
rise of the resident set over the RSS before the first step, in a fresh subprocess per model
(``common.rss_rise``).

    OMP_NUM_THREADS=2 python benchmarks/bench_aim.py                     # CPU: ViT-Tiny/4, 32 px, batch 64
    python benchmarks/bench_aim.py --device cuda --precision bf16 --compile   # GPU: ViT-B/16, 224 px
"""

from __future__ import annotations

import argparse
import json

import torch

from common import (Runner, interleaved, json_subprocess, lightly_aim_pair, machine_line, repeat_arguments,
                    rss_rise, shape_arguments)
from mimaim.objectives import build_objective

NAMES = ("aim (mimaim)", "aim (lightly)", "mae (mimaim)")
CPU_DEFAULTS = dict(model="vit_tiny", img_size=32, patch_size=4, batch_size=64, precision="fp32", head="256,2",
                    decoder="128,2,4")
CUDA_DEFAULTS = dict(model="vit_base", img_size=224, patch_size=16, batch_size=128, precision="bf16", head="2048,12",
                     decoder="512,8,16")


def parse_args(argv=None):
    p = shape_arguments(argparse.ArgumentParser(description=__doc__,
                                                formatter_class=argparse.RawDescriptionHelpFormatter))
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
def build(name, args, device):
    torch.manual_seed(0)
    width, depth = (int(v) for v in args.head.split(","))
    if name == "mae (mimaim)":
        w, d, h = (int(v) for v in args.decoder.split(","))
        model = build_objective("mae", args.model, args.img_size, args.patch_size,
                                dict(decoder_embed_dim=w, decoder_depth=d, decoder_num_heads=h))
    else:  # our AIM with the head laid out as lightly's, and lightly's AIM holding its weights
        ours, peer = lightly_aim_pair(args.model, args.img_size, args.patch_size,
                                      dict(head_width=width, head_depth=depth, attention_kernel=args.kernel),
                                      peer=name == "aim (lightly)")
        model = peer if name == "aim (lightly)" else ours
    return model.to(device).train()


def runner(name, model, args, device):
    def loss_fn(m, batch):
        images, prefix_len, noise = batch
        if name == "aim (lightly)":
            return m(images, prefix_len)
        return m(images, noise if name.startswith("mae") else prefix_len).loss
    return Runner(name, model, loss_fn, device, args.precision, args.compile, betas=(0.9, 0.95))


def make_batches(args, device, n, seed):
    g = torch.Generator().manual_seed(seed)
    N = (args.img_size // args.patch_size) ** 2
    return [(torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g).to(device),
             torch.randint(1, N, (args.batch_size,), generator=g).to(device),
             torch.rand(args.batch_size, N, generator=g).to(device)) for _ in range(n)]


# --------------------------------------------------------------------------- measurements
def measure(args, device):
    runners = {name: runner(name, build(name, args, device), args, device) for name in NAMES}
    return interleaved(runners, lambda n, seed: make_batches(args, device, n, seed), device, args.warmup,
                       args.rounds, args.steps)


def memory_probe(args):
    device = torch.device("cpu")
    run = runner(args.only, build(args.only, args, device), args, device)
    batches = make_batches(args, device, 2, seed=1)
    print(json.dumps({"peak_rise": rss_rise(lambda: [run.step(b) for b in batches])}))


def cpu_peak_memory(args, name):
    cmd = ["--memory-probe", "--only", name, *repeat_arguments(args, "model", "img_size", "patch_size", "batch_size",
                                                                 "precision", "head", "decoder", "kernel")]
    return json_subprocess(__file__, cmd)["peak_rise"]


def main(argv=None):
    args = parse_args(argv)
    if args.memory_probe:
        memory_probe(args)
        return
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but CUDA is not available")
    results = measure(args, device)
    print(f"# {machine_line(device, 'timm', 'lightly')}")
    print(f"# {args.model}/{args.patch_size} at {args.img_size}px, batch {args.batch_size}, {args.precision}, "
          f"AIM head {args.head} (width,depth), MAE decoder {args.decoder}, kernel {args.kernel}, "
          f"compile {args.compile}; median of {args.rounds}x{args.steps} steps after {args.warmup} warm-up")
    print("| model | step (ms) | images/s | peak memory (MiB) |")
    print("|---|---|---|---|")
    for name in NAMES:
        seconds, peak, _ = results[name]
        if peak is None and device.type == "cpu" and not args.no_memory:
            peak = cpu_peak_memory(args, name)
        mem = f"{peak / 2**20:.0f}" if peak is not None else "-"
        print(f"| {name} | {seconds * 1e3:.0f} | {args.batch_size / seconds:.1f} | {mem} |")


if __name__ == "__main__":
    main()
