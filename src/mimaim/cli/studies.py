"""``mimaim compare`` and ``mimaim scale``: grids of ordinary runs (the work is in ``studies/``); every cell's
settings are ``PretrainConfig`` fields, ``--set finetune.KEY=VALUE`` sets compare's ``FinetuneConfig``."""

from __future__ import annotations

import argparse

from ..config import ConfigError, PretrainConfig, convert, load_yaml, parse_overrides, resolve_config
from ..studies import SAME_CROP_SCALE, VARIANTS
from .options import add_fields, given

FORMATTER = argparse.RawDescriptionHelpFormatter
#: PretrainConfig fields every cell of a grid shares, offered as flags (others: --set)
RUN_FIELDS = ("data", "model", "trunk", "img_size", "patch_size", "epochs", "batch_size", "blr", "warmup_epochs",
              "val_fraction", "recipe", "seed", "max_steps", "progress", "online_probe")


def _add_run_options(p: argparse.ArgumentParser, default_model: str) -> None:
    g = p.add_argument_group("pre-training of every cell")
    g.add_argument("--config", help="YAML preset of PretrainConfig fields for every cell (flags override it)")
    p.set_defaults(fields=add_fields(
        g, PretrainConfig, include=RUN_FIELDS, required=("data",),
        helps={"data": "labelled data (class sub-folders): digits, imagefolder:PATH or wds:SHARDS",
               "model": f"backbone for every cell (default {default_model})", "epochs": "pre-training epochs per cell",
               "trunk": "shared: one ViT for every objective (sin-cos positions, no cls token) | paper: each "
                        "objective's own flavour (default: shared in compare, paper in scale)",
               "val_fraction": "held-out share of each class for the probes"}))
    g.add_argument("--set", action="append", metavar="KEY=VALUE", dest="overrides",
                   help="any other setting of every cell, e.g. --set precision=bf16, --set objective.KEY=VALUE; "
                        "compare's fine-tuning: --set finetune.blr=1e-3 (repeatable)")
    g = p.add_argument_group("probes and output")
    g.add_argument("--out", required=True, help="results folder; every cell is a run directory OUT/<cell>/")
    g.add_argument("--probes", help="comma-separated probes (default: linear, attentive, knn; scale: linear, knn)")
    g.add_argument("--layers", help="blocks averaged for probe features, e.g. -6,-5,-4,-3,-2,-1 (default: "
                                    "each objective's probe protocol; stages for a Swin)")
    g.add_argument("--device", default="cpu", help="device for probes and fine-tuning (pre-training: --set device=)")
    g.add_argument("--dry-run", action="store_true",
                   help="print the grid, FLOPs per cell and a time estimate from timing two steps; train nothing")


def _base(args, default_model: str) -> tuple[dict, dict]:
    """(PretrainConfig fields of every cell: defaults < --config < flags < --set, checked; --set finetune.*)."""
    preset = load_yaml(args.config) if args.config else {}
    preset.setdefault("model", default_model)
    flags = {**given(args, args.fields), **parse_overrides(args.overrides)}
    finetune = flags.pop("finetune", {})
    resolve_config(preset, flags)  # a bad value stops here, before any cell
    return {**preset, **flags}, finetune


def _probe_args(args):
    probes = [p.strip() for p in args.probes.split(",")] if args.probes else None
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    return probes, layers


def _crop_scale(value: str) -> tuple[float, float]:
    scale = convert(value, (0.2, 1.0), "--crop-scale")
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ConfigError(f"--crop-scale {value!r}: expected LOW,HIGH with 0 < LOW <= HIGH <= 1, e.g. 0.2,1.0")
    return scale


def cmd_compare(args) -> int:
    from ..studies.compare import compare

    if hasattr(args, "epochs") and args.budget_flops is not None:
        raise ConfigError("--epochs and --budget-flops set the same budget two ways; pass one of them")
    probes, layers = _probe_args(args)
    base, finetune = _base(args, "vit_tiny")
    compare(args.objectives, args.out, base, budget_flops=args.budget_flops,
            same_augmentation=not args.paper_augmentation, crop_scale=_crop_scale(args.crop_scale),
            probes=probes, layers=layers, random_init=not args.no_random_init, finetune_epochs=args.finetune_epochs,
            finetune_options=finetune, dry_run=args.dry_run, device=args.device,
            progress=getattr(args, "progress", True))
    return 0


def cmd_scale(args) -> int:
    from ..studies.scale import scale

    probes, layers = _probe_args(args)
    base, finetune = _base(args, "vit_micro")
    if finetune:
        raise ConfigError("--set finetune.*: mimaim scale does not fine-tune; drop these settings")
    scale(args.objective, args.models, args.data_fractions, args.out, base, probes=probes, layers=layers,
          same_steps=not args.same_epochs, offset=args.fit_offset, dry_run=args.dry_run, device=args.device,
          progress=getattr(args, "progress", True))
    return 0


def add_parser(sub) -> None:
    variants = "; ".join(f"{k} = {v[0]} with {v[1]}" for k, v in VARIANTS.items())
    p = sub.add_parser(
        "compare", help="pre-train and probe several objectives with the same trunk, data, augmentation and budget",
        formatter_class=FORMATTER,
        description="Pre-train every objective in --objectives with the same backbone, data and budget, probe each "
                    "(linear, attentive, k-NN) on the held-out split beside a random-init row, and "
                    "write OUT/results.csv, OUT/results.md, OUT/loss_curves.png and OUT/probe_accuracy.png. Every "
                    "cell is an ordinary run directory OUT/<cell>/: re-running the same command skips finished "
                    "cells and resumes a half-finished one.\n\n"
                    "Trunk: --trunk shared (default) builds every objective on one ViT (--model's width, depth "
                    "and heads; fixed 2-D sin-cos positions, no cls token, xavier init), so that the cells differ "
                    "in objective, masking and target only; --trunk paper gives each objective its paper's own.\n"
                    "Budget: --epochs N (the same epochs for every cell; default) or --budget-flops F (the same "
                    "training FLOPs: forward + backward of the whole objective per image, counted with torch's "
                    "FlopCounterMode, rounded to whole epochs so every schedule completes).\n"
                    f"Augmentation: by default the SAME for every cell (RandomResizedCrop scale --crop-scale, "
                    f"default {SAME_CROP_SCALE}, + flip, no colour jitter); --paper-augmentation gives each objective "
                    "its paper's own.\n"
                    f"Objectives: any of `mimaim list`, the variants ({variants}), or OBJECTIVE@KEY=VALUE[@...] "
                    "with the keys of --set (objective.KEY for the objective's options).",
        epilog="examples:\n"
               "  mimaim compare --objectives mae,simmim,beit,aim --data imagefolder:/tmp/cifar/train "
               "--epochs 10 --out runs/compare --dry-run\n"
               "  mimaim compare --objectives aim,aim-causal,aim-masked50 --data imagefolder:PATH "
               "--budget-flops 1e15 --out runs/aim-ablation\n"
               "  mimaim compare --objectives mae,mae@objective.mask_ratio=0.5 --data imagefolder:PATH --epochs 5 "
               "--finetune-epochs 5 --set finetune.blr=1e-2 --out runs/mae-ratio")
    p.add_argument("--objectives", required=True, help="comma-separated objectives / variants")
    p.add_argument("--budget-flops", type=float, help="training FLOPs per cell (instead of --epochs)")
    p.add_argument("--paper-augmentation", action="store_true",
                   help="each objective's own paper augmentation (default: one crop scale for every objective)")
    p.add_argument("--crop-scale", default=",".join(str(x) for x in SAME_CROP_SCALE),
                   help="LOW,HIGH RandomResizedCrop scale of the shared augmentation")
    p.add_argument("--no-random-init", action="store_true", help="skip the random-initialisation row")
    p.add_argument("--finetune-epochs", type=int, default=0,
                   help="add a fine-tune column (N epochs per cell; 0 = off; recipe: --set finetune.KEY=VALUE)")
    _add_run_options(p, "vit_tiny")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "scale", help="one objective over model sizes x data fractions, with a fitted power law",
        formatter_class=FORMATTER,
        description="Pre-train --objective for every model in --models and every fraction in --data-fractions (a "
                    "nested, seeded, per-class share of the training split; the held-out split stays whole), probe "
                    "each, and draw OUT/scale_loss_vs_params.png (log-log, fitted L = a*N^-alpha, exponent printed), "
                    "OUT/scale_accuracy_vs_loss.png and OUT/scale_accuracy_vs_data.png; the table and the fit go to "
                    "OUT/scale_results.csv and OUT/scale_fit.csv. Finished cells are skipped, half-finished ones "
                    "resumed. Budget: every cell takes the same optimiser steps as the full data at --epochs (a "
                    "fraction f trains epochs/f epochs) unless --same-epochs.",
        epilog="example:\n  mimaim scale --objective aim --models vit_micro,vit_tiny,vit_small "
               "--data-fractions 0.1,0.3,1.0 --data imagefolder:/tmp/cifar/train --epochs 5 --out runs/scale")
    p.add_argument("--objective", required=True, help="objective or variant (as in `mimaim compare`)")
    p.add_argument("--models", required=True, help="comma-separated backbones, e.g. vit_micro,vit_tiny,vit_small")
    p.add_argument("--data-fractions", default="1.0", help="comma-separated fractions in (0, 1] (default 1.0)")
    p.add_argument("--same-epochs", action="store_true", help="same epochs (not steps) for every data fraction")
    p.add_argument("--fit-offset", action="store_true", help="fit L = a*N^-alpha + c (needs 3+ model sizes)")
    _add_run_options(p, "vit_micro")
    p.set_defaults(func=cmd_scale)
