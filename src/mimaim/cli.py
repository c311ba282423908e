"""Command line: argument parsing and sub-commands only; the work lives in the library."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EPILOG = """examples:
  mimaim pretrain                                   # MAE, ViT-Micro/4, built-in digits, ~2 minutes on a CPU
  mimaim pretrain --data imagefolder:~/cifar10/train --epochs 100 --precision bf16
  mimaim pretrain --config configs/mae_vit_base.yaml --data imagefolder:/data/imagenet/train
  mimaim pretrain --resume runs/mae-digits
  torchrun --nproc_per_node=8 -m mimaim pretrain --config configs/mae_vit_base.yaml --data imagefolder:PATH
  mimaim probe runs/mae-digits
  mimaim reconstruct runs/mae-digits --images a.jpg b.jpg
"""


#: modules that add sub-commands of their own: each has ``add_parser(subparsers)``
EXTRA_COMMANDS: list[str] = ["mimaim.tokenizers.cli", "mimaim.eval.commands"]


def _pretrain_parser(sub) -> argparse.ArgumentParser:
    from .data import DATA_SPEC_HELP

    p = sub.add_parser("pretrain", help="pre-train an encoder with a self-supervised objective",
                       description="Pre-train an encoder. Values come from the defaults, then --config, then "
                                   "flags. --batch-size is the global optimiser batch, split across processes "
                                   "and --accum-steps; the learning rate is blr x batch/256 (MAE).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    S = argparse.SUPPRESS
    g = p.add_argument_group("what to train")
    g.add_argument("--config", help="YAML preset (see configs/), overridden by flags", default=S)
    g.add_argument("--objective", help="mae | aim | simmim | beit (those installed: see `mimaim list`)", default=S)
    g.add_argument("--model", help="backbone: vit_micro|vit_tiny|vit_small|vit_base|vit_large|vit_huge|...", default=S)
    g.add_argument("--img-size", type=int, help="input resolution in pixels (default 32)", default=S)
    g.add_argument("--patch-size", type=int, help="ViT patch size in pixels (default 4)", default=S)
    g.add_argument("--mask-ratio", type=float, help="share of patches masked (MAE default 0.75)", default=S)
    g.add_argument("--attention", default=S, help="AIM pre-training attention: prefix (default) | causal")
    g.add_argument("--tokenizer", default=S,
                   help="BEiT visual tokenizer: kmeans (default) | dalle:PATH | PATH of a `mimaim tokenizer train` output")
    g.add_argument("--opt", action="append", metavar="KEY=VALUE", default=S,
                   help="an objective option, e.g. --opt decoder_depth=8 (repeatable; `mimaim list` shows them)")
    g.add_argument("--recipe", choices=["quick", "paper"], default=S,
                   help="quick: objective heads sized for a CPU demo (default); paper: the paper's values")
    g = p.add_argument_group("data")
    g.add_argument("--data", help=f"{DATA_SPEC_HELP} (default digits)", default=S)
    g.add_argument("--val-fraction", type=float, default=S,
                   help="share of each class held out for probes, the last files of each class (default 0.2)")
    g.add_argument("--cache", choices=["auto", "on", "off"], default=S,
                   help="decode an image folder into memory once (auto: when it fits in 4 GB)")
    g.add_argument("--num-workers", type=int, default=S, help="DataLoader workers per process (-1: auto)")
    g.add_argument("--max-bad-fraction", type=float, default=S,
                   help="stop if more than this share of images cannot be read (default 0.01)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=S, help="epochs (default 20)")
    g.add_argument("--batch-size", type=int, default=S, help="global batch per optimiser step (default 64)")
    g.add_argument("--accum-steps", type=int, default=S, help="gradient accumulation micro-steps (default 1)")
    g.add_argument("--blr", type=float, default=S, help="base learning rate; lr = blr x batch/256 (default 1e-3)")
    g.add_argument("--lr", type=float, default=S, help="absolute learning rate (overrides --blr)")
    g.add_argument("--min-lr", type=float, default=S, help="floor of the cosine schedule (default 0)")
    g.add_argument("--warmup-epochs", type=float, default=S, help="linear warm-up epochs (default 2)")
    g.add_argument("--weight-decay", type=float, default=S, help="AdamW weight decay (default 0.05)")
    g.add_argument("--clip-grad", type=float, default=S, help="clip the gradient norm to this value (default off)")
    g = p.add_argument_group("engine")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=S,
                   help="auto: bf16 autocast on CUDA, fp32 on CPU; bf16 also works on CPUs with AVX512-BF16/AMX")
    g.add_argument("--compile", action="store_true", default=S, help="torch.compile the model")
    g.add_argument("--device", default=S, help="auto | cpu | cuda")
    g.add_argument("--seed", type=int, default=S, help="random seed (default 0)")
    g.add_argument("--out", default=S, help="run directory (default runs/<objective>-<data>, numbered if taken)")
    g.add_argument("--resume", metavar="RUN_DIR", default=S, help="continue the run in RUN_DIR from its last checkpoint")
    g.add_argument("--save-every", type=int, default=S, help="checkpoint every N steps (default: each epoch)")
    g.add_argument("--keep-last", type=int, default=S, help="checkpoints to keep (default 2)")
    g.add_argument("--log-every", type=int, default=S, help="log metrics every N steps (default 10)")
    g.add_argument("--max-steps", type=int, default=S, help="stop after N optimiser steps (for smoke tests)")
    g.add_argument("--no-progress", action="store_true", default=S, help="no progress bars")
    return p


def _default_out(objective: str, data: str) -> str:
    name = "digits" if data == "digits" else Path(data.split(":", 1)[-1].rstrip("/")).name or "data"
    base = Path("runs") / f"{objective}-{name}"
    out, n = base, 1
    while (out / "config.yaml").exists():
        n += 1
        out = Path(f"{base}-{n}")
    return str(out)


def cmd_pretrain(args) -> int:
    from .config import ConfigError, load_run_config, load_yaml, make_config
    from .engine.trainer import pretrain

    flags = {k: v for k, v in vars(args).items() if k not in ("command", "func", "config", "resume", "opt",
                                                             "mask_ratio", "attention", "tokenizer",
                                                             "no_progress")}
    options = {}
    for item in getattr(args, "opt", []) or []:
        if "=" not in item:
            raise ConfigError(f"--opt {item!r}: expected KEY=VALUE, e.g. --opt decoder_depth=8")
        key, value = item.split("=", 1)
        options[key.strip()] = value.strip()
    for key in ("mask_ratio", "attention", "tokenizer"):  # objective options with a flag of their own
        if hasattr(args, key):
            options[key] = getattr(args, key)
    if getattr(args, "no_progress", False):
        flags["progress"] = False
    resume = getattr(args, "resume", None)
    if resume:
        base = load_run_config(resume).to_dict()
        for key in ("objective", "model"):
            if key in flags and flags[key] != base[key]:
                raise ConfigError(f"--{key} {flags[key]!r} does not match the run being resumed, which used "
                                  f"{base[key]!r}; drop --{key} or start a new run with --out")
        base["out"] = str(resume)
    else:
        base = load_yaml(args.config) if hasattr(args, "config") else {}
    if options:
        flags["objective_options"] = {**(base.get("objective_options") or {}), **options}
    cfg = make_config(base, **flags)
    if not resume and "out" not in flags and "out" not in base:
        cfg.out = _default_out(cfg.objective, cfg.data)
    from .objectives.base import get_objective_class, parse_options
    from .engine.trainer import resolved_objective_options
    parse_options(get_objective_class(cfg.objective), resolved_objective_options(cfg))  # fail before any work
    pretrain(cfg, resume=bool(resume))
    return 0


def cmd_probe(args) -> int:
    from .eval.probe_run import format_table, probe_run

    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    rows = probe_run(args.run_dir, data=args.data, probes=args.probes.split(","), layers=layers, pool=args.pool,
                     random_init=not args.no_random_init, device=args.device, progress=not args.no_progress)
    r = rows[0]
    print(f"\nprobes on {r['data']}: {r['train_images']} train / {r['val_images']} held-out images "
          f"(checkpoint {r['checkpoint']}; features from "
          f"{'blocks ' + args.layers + ' averaged' if layers else 'the last block'}, trunk run bidirectionally)")
    print(format_table(rows))
    return 0


def cmd_reconstruct(args) -> int:
    from .engine.runs import load_run
    from .eval.pictures import load_images, reconstruction_figure

    cfg, objective, ckpt = load_run(args.run_dir, device=args.device)
    images = load_images(args.images, cfg.img_size) if args.images else None
    out = args.out or str(Path(args.run_dir) / f"reconstruction-{ckpt.name}.png")
    path = reconstruction_figure(objective, cfg, out, images=images, device=args.device, seed=args.seed)
    print(f"wrote {path}")
    return 0


def cmd_list(args) -> int:
    import dataclasses

    from .models import list_models
    from .objectives import get_objective_class, list_objectives

    print("objectives and their options (paper defaults):")
    for name in list_objectives():
        cls = get_objective_class(name)
        opts = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls.Options))
        quick = getattr(cls, "quick_options", {})
        print(f"  {name}: {opts}")
        if quick:
            print(f"      recipe 'quick' uses: {quick}")
    print("models: " + ", ".join(list_models()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="mimaim",
        description="Self-supervised pre-training of vision encoders: MAE, BEiT, SimMIM and AIM behind one "
                    "training engine, with probes and pictures.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"mimaim {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _pretrain_parser(sub).set_defaults(func=cmd_pretrain)

    p = sub.add_parser("probe", help="linear and k-NN probes of a run's frozen encoder vs random init",
                       description="Freeze the encoder of RUN_DIR, extract features once (cached in "
                                   "RUN_DIR/features), and report top-1 accuracy on the held-out split for each "
                                   "probe, beside the same architecture at random initialisation.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dir", help="a `mimaim pretrain` run directory")
    p.add_argument("--data", help="labelled data to probe on (default: the run's own data)")
    p.add_argument("--probes", default="linear,attentive,knn", help="comma-separated probes")
    p.add_argument("--layers", help="comma-separated block indices to average (e.g. -6,-5,-4,-3,-2,-1); "
                                    "default: the last block after the final norm")
    p.add_argument("--pool", default="auto", choices=["auto", "cls", "mean"],
                   help="auto: cls token when the backbone has one, else mean of patch tokens")
    p.add_argument("--no-random-init", action="store_true", help="skip the random-initialisation row")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("reconstruct", help="draw the objective's reconstruction picture for a run",
                       description="Write a PNG grid: for MAE the original, the masked input, the reconstruction, "
                                   "and the reconstruction with the visible patches pasted back.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dir", help="a `mimaim pretrain` run directory")
    p.add_argument("--images", nargs="+", help="image files (default: held-out images of the run's data)")
    p.add_argument("--out", help="PNG path (default RUN_DIR/reconstruction-<checkpoint>.png)")
    p.add_argument("--seed", type=int, default=0, help="seed of the mask drawn for the picture")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("list", help="list objectives with their options, and models")
    p.set_defaults(func=cmd_list)

    import importlib
    for module in EXTRA_COMMANDS:
        importlib.import_module(module).add_parser(sub)
    return parser


def _join_negative_values(argv: list[str]) -> list[str]:
    """``--layers -2,-1`` -> ``--layers=-2,-1``: argparse would read "-2,-1" as an option."""
    out = []
    for arg in argv:
        if out and out[-1] == "--layers" and arg.startswith("-") and arg[1:2].isdigit():
            out[-1] = f"--layers={arg}"
        else:
            out.append(arg)
    return out


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(_join_negative_values(list(sys.argv[1:] if argv is None else argv)))
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\nmimaim: interrupted; a run continues with `mimaim pretrain --resume RUN_DIR`", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001
        from .config import ConfigError
        from .data import DataError
        from .engine.checkpoint import CheckpointError
        from .engine.trainer import TrainingDiverged
        known = (ConfigError, DataError, CheckpointError, TrainingDiverged, FileNotFoundError, FileExistsError,
                 ValueError)
        if isinstance(err, known) and not os.environ.get("MIMAIM_DEBUG"):
            print(f"mimaim: error: {err}", file=sys.stderr)
            return 1 if isinstance(err, TrainingDiverged) else 2
        raise


if __name__ == "__main__":
    sys.exit(main())
