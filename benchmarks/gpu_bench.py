"""The GPU suite's model table: training img/s, MFU and peak memory, mimaim beside its peer.

One process, one row per model, each built at the paper's shape (ViT-B/16 at 224 px) and
trained in bf16 (autocast) with ``torch.compile``; each mimaim objective sits beside its
peer holding the *same weights* (converted with ``mimaim.interop``; for AIM with the repository's
tests/lightly_aim.py, our AIM then carrying its head laid out as lightly's) and fed the same
batches and masks:

    mae      mimaim MAE-B/16, paper decoder (512 x 8)     HF ViTMAEForPreTraining (sdpa)
    aim      mimaim AIM-B/16, prefix mask via flex        lightly MaskedCausalVisionTransformer + AIMPredictionHead
    aim-sdpa the same AIM with a dense boolean SDPA mask  (the flex-vs-dense comparison)
    simmim   mimaim SimMIM ViT-B/16                        HF ViTForMaskedImageModeling (sdpa)
    beit     mimaim BEiT-B/16 (ids precomputed)            HF BeitForMaskedImageModeling (sdpa)

MFU = img/s x training FLOPs per image / 989e12 (H100/H200 dense bf16 peak). The FLOPs are
counted once per shape by ``FlopCounterMode`` over a forward + backward traced on meta
tensors (``mimaim.engine.estimate``, attention as the fused kernel), and the same count is
used for both sides of a pair (they compute the same function). Peak memory is
``torch.cuda.max_memory_allocated`` over the timed steps; ``est`` is the ``--dry-run``
estimate for the same run on one GPU.

    python benchmarks/gpu_bench.py                 # CUDA, ~5 min on one H100/H200
    python benchmarks/gpu_bench.py --smoke         # CPU, tiny shapes, no compile: the same code path in < 1 min
    python benchmarks/gpu_bench.py --only mae,aim --json rows.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback

import torch
from torch import nn

PEAK_BF16_FLOPS = 989e12  # H100/H200 SXM dense bf16
ROWS = ("mae", "aim", "aim-sdpa", "simmim", "beit")
CUDA_SHAPE = dict(model="vit_base", img_size=224, patch_size=16, batch_size=256)
SMOKE_SHAPE = dict(model="vit_micro", img_size=32, patch_size=4, batch_size=4)
SMOKE_BACKBONE = dict(depth=2)  # vit_micro with 2 blocks


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, no compile (checks the code path)")
    p.add_argument("--only", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    p.add_argument("--batch-size", type=int, help="per step (CUDA default 256)")
    p.add_argument("--no-compile", action="store_true", help="eager on CUDA too")
    p.add_argument("--no-peers", action="store_true", help="time mimaim only")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation happens here)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per model")
    p.add_argument("--json", help="append one JSON line per row to this file")
    args = p.parse_args(argv)
    args.device = torch.device("cpu" if args.smoke else "cuda")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("CUDA is not available; run with --smoke for the CPU check")
    shape = SMOKE_SHAPE if args.smoke else CUDA_SHAPE
    for key, value in shape.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.compile = not (args.smoke or args.no_compile)
    if args.smoke:
        args.warmup, args.steps = 1, 2
    return args


# --------------------------------------------------------------------------- the pairs
class Side:
    """One trainable model and how to call it: ``loss(images, masking) -> scalar``."""

    def __init__(self, label: str, model: nn.Module, loss_fn, objective: nn.Module):
        self.label, self.model, self.loss_fn, self.objective = label, model, loss_fn, objective


def _sdpa(hf_model):
    if hasattr(hf_model, "set_attn_implementation"):
        hf_model.set_attn_implementation("sdpa")
    else:  # older transformers read the config at forward time
        hf_model.config._attn_implementation = "sdpa"
    return hf_model.train()


def build_row(row: str, args) -> tuple[Side, Side | None, nn.Module]:
    """-> (ours, peer or None, objective for the FLOP count). Same weights on both sides."""
    from common import lightly_aim_pair
    from mimaim.objectives import build_objective

    m, img, p = args.model, args.img_size, args.patch_size
    torch.manual_seed(0)
    if args.smoke:
        def build_objective(*a, _build=build_objective):  # noqa: F811 - the same builder, 2 blocks deep
            return _build(*a, **SMOKE_BACKBONE)
    if row == "mae":
        opts = {} if not args.smoke else {"decoder_embed_dim": 64, "decoder_depth": 2, "decoder_num_heads": 2}
        ours = build_objective("mae", m, img, p, {"mask_ratio": 0.75, "norm_pix_loss": True, **opts})
        peer = None
        if not args.no_peers:
            from mimaim.interop.hf_mae import mae_to_hf_model
            peer = Side("HF ViTMAE", _sdpa(mae_to_hf_model(ours, attn_implementation="sdpa")),
                        lambda mdl, x, k: mdl(pixel_values=x, noise=k).loss, ours)
        return Side("mimaim MAE", ours, lambda mdl, x, k: mdl(x, k).loss, ours), peer, ours
    if row in ("aim", "aim-sdpa"):
        head = {"head_width": 256, "head_depth": 2} if args.smoke else {}
        kernel = "flex" if row == "aim" and args.device.type == "cuda" else "sdpa"
        # both AIM rows carry the head laid out as lightly's AIMPredictionHead (tests/lightly_aim.py, through
        # common.lightly_aim_pair), so that the peer holds the same weights and the two rows compare kernels
        ours, lightly = lightly_aim_pair(m, img, p, {"attention_kernel": kernel, **head},
                                         peer=row == "aim" and not args.no_peers,
                                         **(SMOKE_BACKBONE if args.smoke else {}))
        label = f"mimaim AIM ({'flex' if kernel == 'flex' else 'dense SDPA mask'})"
        peer = Side("lightly AIM", lightly, lambda mdl, x, k: mdl(x, k), ours) if lightly is not None else None
        return Side(label, ours, lambda mdl, x, k: mdl(x, k).loss, ours), peer, ours
    if row == "simmim":
        ours = build_objective("simmim", m, img, p, {"mask_patch_size": 32 if not args.smoke else 16,
                                                     "vit_flavour": "plain", "drop_path_rate": 0.0})
        peer = None
        if not args.no_peers:
            from mimaim.interop.hf_simmim import simmim_to_hf_model
            peer = Side("HF ViT-MIM", _sdpa(simmim_to_hf_model(ours)),
                        lambda mdl, x, k: mdl(pixel_values=x, bool_masked_pos=k).loss, ours)
        return Side("mimaim SimMIM", ours, lambda mdl, x, k: mdl(x, k).loss, ours), peer, ours
    if row == "beit":
        ours = build_objective("beit", m, img, p, {"drop_path": 0.0})
        g = torch.Generator().manual_seed(0)
        fit = torch.randn(args.batch_size, 3, img, img, generator=g)
        ours.visual_tokens(fit)  # fits the k-means codebook once
        ids_cache: dict = {}

        def ids_for(x):  # the same ids for both sides, computed once per batch outside the timing
            return ids_cache[x.data_ptr()]

        ours.ids_for = ids_for
        ours.visual_tokens = lambda x: ids_cache[x.data_ptr()]
        peer = None
        if not args.no_peers:
            from mimaim.interop.hf_beit import to_hf
            peer = Side("HF BEiT", _sdpa(to_hf(ours)),
                        lambda mdl, x, k: mdl(pixel_values=x, bool_masked_pos=k,
                                              labels=ids_cache[x.data_ptr()][k]).loss, ours)
        side = Side("mimaim BEiT", ours, lambda mdl, x, k: mdl(x, k).loss, ours)
        side.ids_cache = ids_cache
        return side, peer, ours
    raise ValueError(f"unknown row {row!r}; choose from {', '.join(ROWS)}")


def make_batches(objective, args, n: int, seed: int, ids_cache=None):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g)
        masking = objective.draw_masking(args.batch_size, g)
        if ids_cache is not None:
            ids = objective.tokenizer.tokenize(images, objective.encoder.grid_size).flatten(1)
        images, masking = images.to(args.device), masking.to(args.device)
        if ids_cache is not None:
            ids_cache[images.data_ptr()] = ids.to(args.device)
        out.append((images, masking))
    return out


# --------------------------------------------------------------------------- timing
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_side(side: Side, batches_warm, batches, args) -> dict:
    device = args.device
    model = side.model.to(device).train()
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=True)
    run = torch.compile(model) if args.compile else model

    def step(x, k):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = side.loss_fn(run, x, k)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for x, k in batches_warm:
        step(x, k)
    sync(device)
    warm_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, loss = [], None
    for x, k in batches:
        t = time.perf_counter()
        loss = step(x, k)
        sync(device)
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else float("nan")
    del optimizer, run
    side.model.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"step_s": statistics.median(times), "img_s": args.batch_size / statistics.median(times),
            "peak_gib": peak / 2**30, "warmup_s": warm_s, "loss": float(loss.detach())}


def run_row(row: str, args) -> list[dict]:
    from mimaim.engine.estimate import estimate

    try:
        ours, peer, objective = build_row(row, args)
    except Exception as err:  # noqa: BLE001
        traceback.print_exc()
        return [{"row": row, "model": row, "batch": args.batch_size, "compile": args.compile,
                 "shape": f"{args.model}/{args.patch_size}@{args.img_size}",
                 "error": f"building: {type(err).__name__}: {err}"[:300]}]
    est = estimate(objective, "ddp", "bf16", args.batch_size, 1)
    ids_cache = getattr(ours, "ids_cache", None)
    warm = make_batches(objective, args, args.warmup, seed=1, ids_cache=ids_cache)
    timed = make_batches(objective, args, args.steps, seed=2, ids_cache=ids_cache)
    out = []
    for side in (ours, peer):
        if side is None:
            continue
        result = {"row": row, "model": side.label, "batch": args.batch_size,
                  "shape": f"{args.model}/{args.patch_size}@{args.img_size}", "compile": args.compile}
        try:
            result.update(time_side(side, warm, timed, args))
            result["mfu"] = result["img_s"] * est["flops_per_image"] / PEAK_BF16_FLOPS
            result["gflop_per_img"] = est["flops_per_image"] / 1e9
            if side is ours:
                result["est_gib"] = est["total_bytes"] / 2**30
        except Exception as err:  # noqa: BLE001 - one broken row must not hide the others
            result["error"] = f"{type(err).__name__}: {err}"[:300]
            traceback.print_exc()
        out.append(result)
        print(json.dumps(result), file=sys.stderr, flush=True)
    return out


def format_table(results: list[dict], device_name: str) -> str:
    lines = [f"training throughput on {device_name} (bf16 autocast{', torch.compile' if results and results[0].get('compile') else ''}):",
             f"{'row':<9}{'model':<32}{'shape':<18}{'batch':>6}{'img/s':>9}{'MFU':>7}{'peak GiB':>10}"
             f"{'est GiB':>9}{'vs peer':>9}"]
    by_row: dict[str, list[dict]] = {}
    for r in results:
        by_row.setdefault(r["row"], []).append(r)
    for row, rs in by_row.items():
        peer_rate = rs[1].get("img_s") if len(rs) > 1 else None
        for r in rs:
            if "error" in r:
                lines.append(f"{row:<9}{r['model']:<32}{r['shape']:<18}{r['batch']:>6}  FAILED: {r['error']}")
                continue
            ratio = f"{r['img_s'] / peer_rate:.2f}x" if peer_rate and r is rs[0] else ""
            est = f"{r['est_gib']:.1f}" if "est_gib" in r else ""
            peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] == r["peak_gib"] else "-"
            lines.append(f"{row:<9}{r['model']:<32}{r['shape']:<18}{r['batch']:>6}{r['img_s']:>9.1f}"
                         f"{100 * r['mfu']:>6.1f}%{peak:>10}{est:>9}{ratio:>9}")
    flex = next((r for r in results if r["row"] == "aim" and "flex" in r["model"] and "img_s" in r), None)
    dense = next((r for r in results if r["row"] == "aim-sdpa" and "img_s" in r), None)
    if flex and dense:
        lines.append(f"AIM prefix mask: flex_attention {flex['img_s']:.1f} img/s vs dense SDPA mask {dense['img_s']:.1f} "
                     f"img/s = {flex['img_s'] / dense['img_s']:.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        device_name = torch.cuda.get_device_name()
    else:
        torch.set_num_threads(min(2, torch.get_num_threads()))
        device_name = "CPU (smoke: tiny shapes, no compile; numbers mean nothing)"
    results = []
    for row in [r.strip() for r in args.only.split(",") if r.strip()]:
        t = time.perf_counter()
        results.extend(run_row(row, args))
        print(f"[{row}: {time.perf_counter() - t:.0f}s]", file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "a") as fh:
            for r in results:
                fh.write(json.dumps(r) + "\n")
    print(format_table(results, device_name))
    print(f"torch {torch.__version__}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
