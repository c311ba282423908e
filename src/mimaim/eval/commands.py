"""Sub-commands ``mimaim finetune``, ``mimaim compare`` and ``mimaim scale``: parsing only.

Their flags are generated from the dataclass fields that hold the settings (``FinetuneConfig``
for fine-tuning, ``PretrainConfig`` for every cell's pre-training) by ``options.py``, as for
``mimaim pretrain``; ``--set KEY=VALUE`` is the one KEY=VALUE syntax for any other field.
The work lives in ``eval/finetune.py`` and ``studies/compare.py``, ``studies/scale.py``.
"""

from __future__ import annotations

import argparse

FORMATTER = argparse.RawDescriptionHelpFormatter

#: the fine-tuning recipe's fields, offered to compare as --ft-*
FINETUNE_RECIPE_FIELDS = ("recipe", "batch_size", "blr", "lr", "min_lr", "warmup_epochs", "weight_decay",
                          "layer_decay", "drop_path", "smoothing", "mixup", "cutmix", "auto_augment", "reprob",
                          "crop_scale", "hflip", "img_size")
#: PretrainConfig fields every cell of a grid shares, offered as flags (others: --set)
RUN_FIELDS = ("data", "model", "img_size", "patch_size", "epochs", "batch_size", "blr", "warmup_epochs",
              "val_fraction", "recipe", "seed", "max_steps", "progress")


def _studies():
    from ..studies import compare, scale
    return compare, scale


def _floats(value: str, flag: str) -> tuple[float, float]:
    from ..config import ConfigError

    try:
        lo, hi = (float(x) for x in value.split(","))
    except ValueError:
        raise ConfigError(f"{flag} {value!r}: expected two numbers LOW,HIGH, e.g. 0.2,1.0") from None
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"{flag} {value!r}: need 0 < LOW <= HIGH <= 1")
    return lo, hi


def _add_run_options(p: argparse.ArgumentParser, default_model: str) -> None:
    """Pre-training settings shared by every cell of a grid, generated from ``PretrainConfig``."""
    from ..config import PretrainConfig
    from ..data import DATA_SPEC_HELP
    from ..options import add_dataclass_arguments

    g = p.add_argument_group("pre-training of every cell")
    g.add_argument("--config", help="YAML preset of PretrainConfig fields for every cell (flags override it)")
    add_dataclass_arguments(g, PretrainConfig, include=RUN_FIELDS, groups=False, required=("data",),
                            helps={"data": f"labelled data: {DATA_SPEC_HELP} (class sub-folders)",
                                   "model": "backbone for every cell", "epochs": "pre-training epochs per cell",
                                   "val_fraction": "held-out share of each class for the probes"},
                            help_defaults={"model": default_model})
    g.add_argument("--set", action="append", metavar="KEY=VALUE", dest="set_fields",
                   help="any other PretrainConfig field for every cell, e.g. --set precision=bf16 (repeatable)")
    g = p.add_argument_group("probes and output")
    g.add_argument("--out", required=True, help="results folder; every cell is a run directory OUT/<cell>/")
    g.add_argument("--probes", help="comma-separated probes (default: linear, attentive if installed, knn)")
    g.add_argument("--layers", help="blocks averaged for probe features, e.g. -6,-5,-4,-3,-2,-1 (default: "
                                    "each objective's probe protocol)")
    g.add_argument("--device", default="cpu", help="device for probes and fine-tuning (pre-training: --set device=)")
    g.add_argument("--dry-run", action="store_true",
                   help="print the grid, FLOPs per cell and a time estimate from timing two steps; train nothing")


def _base(args, default_model: str) -> dict:
    """PretrainConfig fields of every cell: defaults < --config < flags < --set, checked by the one resolver."""
    from ..config import load_yaml, resolve_config
    from ..options import given, parse_assignments

    preset = load_yaml(args.config) if args.config else {}
    preset.setdefault("model", default_model)
    flags = {**given(args, RUN_FIELDS), **parse_assignments(args.set_fields, "--set", "precision=bf16")}
    resolve_config(preset, flags)  # a bad value stops here, before any cell
    return {**preset, **flags}


def _probe_args(args):
    probes = [p.strip() for p in args.probes.split(",")] if args.probes else None
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    return probes, layers


# --------------------------------------------------------------------------- commands
def cmd_finetune(args) -> int:
    from ..options import given
    from .finetune import FinetuneConfig, finetune

    fcfg = FinetuneConfig(**given(args, args.finetune_fields))
    result = finetune(args.run_dir, fcfg)
    print(f"top-1 {result['top1']:.2f}% on {result['val_images']} held-out images of {result['data']} "
          f"({result['objective']} {result['model']}, {fcfg.init} weights, "
          f"{result['img_size']}px, {result['steps']} steps, {result['wall_time_s']:.1f}s)")
    return 0


def cmd_compare(args) -> int:
    from ..config import ConfigError
    from ..options import given

    compare = _studies()[0].compare
    if hasattr(args, "epochs") and args.budget_flops is not None:
        raise ConfigError("--epochs and --budget-flops set the same budget two ways; pass one of them")
    probes, layers = _probe_args(args)
    compare(args.objectives, args.out, _base(args, "vit_tiny"), budget_flops=args.budget_flops,
            same_augmentation=not args.paper_augmentation, crop_scale=_floats(args.crop_scale, "--crop-scale"),
            probes=probes, layers=layers, random_init=not args.no_random_init, finetune_epochs=args.finetune_epochs,
            finetune_options=given(args, args.finetune_fields, "ft_") if args.finetune_epochs else None,
            dry_run=args.dry_run, device=args.device, progress=getattr(args, "progress", True))
    return 0


def cmd_scale(args) -> int:
    scale = _studies()[1].scale
    probes, layers = _probe_args(args)
    scale(args.objective, args.models, args.data_fractions, args.out, _base(args, "vit_micro"), probes=probes,
          layers=layers, same_steps=not args.same_epochs, offset=args.fit_offset, dry_run=args.dry_run,
          device=args.device, progress=getattr(args, "progress", True))
    return 0


def add_parser(sub) -> None:
    from ..options import add_dataclass_arguments
    from .finetune import FinetuneConfig

    compare_module = _studies()[0]
    SAME_CROP_SCALE, VARIANTS = compare_module.SAME_CROP_SCALE, compare_module.VARIANTS

    # ---- finetune
    p = sub.add_parser(
        "finetune", help="fine-tune a run's encoder end to end (MAE/BEiT recipe) and report held-out top-1",
        formatter_class=FORMATTER,
        description="Fine-tune the pre-trained encoder of RUN_DIR end to end as MAE's main_finetune.py: layer-wise "
                    "lr decay (timm groups), drop path, trainable position table, AdamW (0.9, 0.999), cosine "
                    "schedule with warm-up; mean-pooled patch tokens -> fc_norm -> head. --recipe quick (default) "
                    "is sized for small data (BatchNorm before the head, blr 1e-2, 10 epochs, no mixup/cutmix/"
                    "RandAugment); --recipe paper is MAE's ImageNet recipe. Reports top-1 on "
                    "the held-out split (the last --val-fraction of each class, as `mimaim probe`) and writes "
                    "RUN_DIR/finetune[-<size>px][-random].json.",
        epilog="examples:\n  mimaim finetune runs/mae-cifar --data imagefolder:/tmp/cifar/train --epochs 20\n"
               "  mimaim finetune runs/mae-cifar --epochs 20 --img-size 48     # position tables resized\n"
               "  mimaim finetune runs/mae-cifar --epochs 20 --init random     # the from-scratch baseline")
    p.add_argument("run_dir", help="a `mimaim pretrain` run directory")
    fields = add_dataclass_arguments(p, FinetuneConfig, flags={"progress": "--no-progress"})
    p.set_defaults(func=cmd_finetune, finetune_fields=fields)

    # ---- compare
    variants = "; ".join(f"{k} = {v[0]} with {v[1]}" for k, v in VARIANTS.items())
    p = sub.add_parser(
        "compare", help="pre-train and probe several objectives with the same trunk, data, augmentation and budget",
        formatter_class=FORMATTER,
        description="Pre-train every objective in --objectives with the same backbone, data and budget, probe each "
                    "(linear, attentive if installed, k-NN) on the held-out split beside a random-init row, and "
                    "write OUT/results.csv, OUT/results.md, OUT/loss_curves.png and OUT/probe_accuracy.png. Every "
                    "cell is an ordinary run directory OUT/<cell>/: re-running the same command skips finished "
                    "cells and resumes a half-finished one.\n\n"
                    "Budget: --epochs N (the same epochs for every cell; default) or --budget-flops F (the same "
                    "training FLOPs: forward + backward of the whole objective per image, counted with torch's "
                    "FlopCounterMode, rounded to whole epochs so every schedule completes).\n"
                    f"Augmentation: by default the SAME for every cell (RandomResizedCrop scale --crop-scale, "
                    f"default {SAME_CROP_SCALE}, + flip, no colour jitter); --paper-augmentation gives each objective "
                    "its paper's own.\n"
                    f"Objectives: any of `mimaim list`, the variants ({variants}), or OBJECTIVE@KEY=VALUE[@...].",
        epilog="examples:\n"
               "  mimaim compare --objectives mae,simmim,beit,aim --data imagefolder:/tmp/cifar/train "
               "--epochs 10 --out runs/compare --dry-run\n"
               "  mimaim compare --objectives aim,aim-causal,aim-masked50 --data imagefolder:PATH "
               "--budget-flops 1e15 --out runs/aim-ablation\n"
               "  mimaim compare --objectives mae,mae@mask_ratio=0.5 --data imagefolder:PATH --epochs 5 "
               "--finetune-epochs 5 --out runs/mae-ratio")
    p.add_argument("--objectives", required=True, help="comma-separated objectives / variants")
    p.add_argument("--budget-flops", type=float, help="training FLOPs per cell (instead of --epochs)")
    aug = p.add_mutually_exclusive_group()
    aug.add_argument("--same-augmentation", action="store_true", default=True,
                     help="one crop scale for every objective (the default)")
    aug.add_argument("--paper-augmentation", action="store_true", help="each objective's own paper augmentation")
    p.add_argument("--crop-scale", default=",".join(str(x) for x in SAME_CROP_SCALE),
                   help="LOW,HIGH RandomResizedCrop scale under --same-augmentation")
    p.add_argument("--no-random-init", action="store_true", help="skip the random-initialisation row")
    p.add_argument("--finetune-epochs", type=int, default=0, help="add a fine-tune column (N epochs per cell; 0 = off)")
    _add_run_options(p, "vit_tiny")
    g = p.add_argument_group("fine-tuning of every cell (with --finetune-epochs)")
    fields = add_dataclass_arguments(g, FinetuneConfig, include=FINETUNE_RECIPE_FIELDS, prefix="ft-", groups=False)
    p.set_defaults(func=cmd_compare, finetune_fields=fields)

    # ---- scale
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
