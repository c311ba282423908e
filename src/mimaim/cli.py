"""Command line: argument parsing and sub-commands only; the work lives in the library."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .options import DefaultsHelpFormatter

EPILOG = """examples:
  mimaim pretrain                                   # MAE, ViT-Micro/4, built-in digits, ~2 minutes on a CPU
  mimaim pretrain --data imagefolder:~/cifar10/train --epochs 100 --precision bf16
  mimaim pretrain --config configs/mae_vit_base.yaml --data imagefolder:/data/imagenet/train
  mimaim pretrain --resume runs/mae-digits
  mimaim pretrain --resume runs/mae-digits --lr 1e-4 --clip-grad 1.0  # after a NaN stop: new optimiser settings
  mimaim pretrain --config PRESET --out runs/x --resume auto        # one command a scheduler re-issues after a kill
  mimaim pretrain --init runs/mae-digits --data imagefolder:~/mydomain   # a new run from another run's weights
  mimaim pretrain --objective mypackage.objective:MyObjective       # a fifth objective, one file, no package edit
  torchrun --nproc_per_node=8 -m mimaim pretrain --config configs/mae_vit_base.yaml --data imagefolder:PATH
  mimaim probe runs/mae-digits
  mimaim reconstruct runs/mae-digits --images a.jpg b.jpg
"""


#: modules that add sub-commands of their own: each has ``add_parser(subparsers)``
EXTRA_COMMANDS: list[str] = ["mimaim.tokenizers.cli", "mimaim.eval.commands", "mimaim.data.commands",
                              "mimaim.interop.commands"]


#: objective options with a flag of their own (the rest: --opt KEY=VALUE)
OBJECTIVE_FLAGS = {"mask_ratio": (float, "share of patches masked (MAE default 0.75)"),
                   "attention": (str, "AIM pre-training attention: prefix (default) | causal"),
                   "tokenizer": (str, "BEiT visual tokenizer: kmeans (default) | dalle:PATH | PATH of a "
                                      "`mimaim tokenizer train` output")}


def _pretrain_parser(sub) -> argparse.ArgumentParser:
    from .config import PretrainConfig, RESUME_MUTABLE
    from .data import DATA_SPEC_HELP
    from .options import add_dataclass_arguments

    p = sub.add_parser("pretrain", help="pre-train an encoder with a self-supervised objective",
                       description="Pre-train an encoder. Values come from the defaults, then --config, then "
                                   "flags. --batch-size is the global optimiser batch, split across processes "
                                   "and --accum-steps; the learning rate is blr x batch/256 (MAE).",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    S = argparse.SUPPRESS
    g = p.add_argument_group("what to train")
    g.add_argument("--config", help="YAML preset (see configs/), overridden by flags", default=S)
    for name, (typ, text) in OBJECTIVE_FLAGS.items():
        g.add_argument("--" + name.replace("_", "-"), type=typ, help=text, default=S)
    g.add_argument("--opt", action="append", metavar="KEY=VALUE", default=S,
                   help="an objective option, e.g. --opt decoder_depth=8 (repeatable; `mimaim list` shows them)")
    g.add_argument("--set", action="append", metavar="KEY=VALUE", dest="set_fields", default=S,
                   help="any config field, e.g. --set augmentation={crop_scale: [0.4, 1.0]} (repeatable)")
    g.add_argument("--resume", metavar="RUN_DIR", default=S,
                   help="continue the run in RUN_DIR from its last checkpoint (from step 0 if it has none; a new "
                        "run from this command's settings if RUN_DIR holds no run yet; `auto`: the --out folder). "
                        "A resumed run keeps its recorded config except: "
                        + ", ".join(sorted(RESUME_MUTABLE - {"out"})))
    g.add_argument("--dry-run", action="store_true", default=S,
                   help="print parameters, expected memory and FLOPs; train nothing")
    g.add_argument("--gpus", type=int, metavar="N", default=S,
                   help="with --dry-run: the number of GPUs to plan for (default: WORLD_SIZE, else 1)")
    add_dataclass_arguments(p, PretrainConfig, helps={"data": DATA_SPEC_HELP}, sections={"what to train": g})
    return p


def cmd_pretrain(args) -> int:
    from .launch import pretrain_command
    from .options import parse_assignments

    flags = {k: v for k, v in vars(args).items()
             if k not in ("command", "func", "config", "resume", "opt", "set_fields", "dry_run", "gpus",
                          *OBJECTIVE_FLAGS)}
    flags.update(parse_assignments(getattr(args, "set_fields", None), "--set", "precision=bf16"))
    options = parse_assignments(getattr(args, "opt", None), "--opt", "decoder_depth=8")
    options.update({k: getattr(args, k) for k in OBJECTIVE_FLAGS if hasattr(args, k)})
    if options:
        flags["objective_options"] = {**(flags.get("objective_options") or {}), **options}
    pretrain_command(flags, preset=getattr(args, "config", None), resume=getattr(args, "resume", None),
                     dry_run=getattr(args, "dry_run", False), gpus=getattr(args, "gpus", None))
    return 0


def cmd_probe(args) -> int:
    from .eval.probe_run import format_table, probe_run

    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    rows = probe_run(args.run_dir, data=args.data, probes=args.probes.split(","), layers=layers, pool=args.pool,
                     norm=getattr(args, "norm", None), random_init=not args.no_random_init, device=args.device,
                     progress=not args.no_progress)
    r = rows[0]
    print(f"\nprobes on {r['data']}: {r['train_images']} train / {r['val_images']} held-out images "
          f"(checkpoint {r['checkpoint']}; trunk run bidirectionally, no masking)")
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
    from .models import list_models
    from .objectives.base import describe_objectives

    print(describe_objectives())
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
                       formatter_class=DefaultsHelpFormatter)
    p.add_argument("run_dir", help="a `mimaim pretrain` run directory")
    p.add_argument("--data", help="labelled data to probe on (default: the run's own data)")
    p.add_argument("--probes", default="linear,attentive,knn", help="comma-separated probes")
    p.add_argument("--layers", help="comma-separated block indices to average (e.g. -6,-5,-4,-3,-2,-1); "
                                    "default: the objective's declared protocol (printed above the table)")
    p.add_argument("--pool", default="auto", choices=["auto", "cls", "mean"],
                   help="auto: the objective's declared protocol (printed above the table); cls: the cls token; "
                        "mean: the mean of patch tokens")
    p.add_argument("--norm", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                   help="apply the final LayerNorm to the blocks read (default: the objective's protocol)")
    p.add_argument("--no-random-init", action="store_true", help="skip the random-initialisation row")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("reconstruct", help="draw the objective's reconstruction picture for a run",
                       description="Write a PNG grid: for MAE the original, the masked input, the reconstruction, "
                                   "and the reconstruction with the visible patches pasted back.",
                       formatter_class=DefaultsHelpFormatter)
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
        from .options import OptionError
        known = (ConfigError, DataError, CheckpointError, TrainingDiverged, FileNotFoundError, FileExistsError,
                 ValueError, OptionError, NotImplementedError)
        if isinstance(err, known) and not os.environ.get("MIMAIM_DEBUG"):
            print(f"mimaim: error: {err}", file=sys.stderr)
            return 1 if isinstance(err, TrainingDiverged) else 2
        raise


if __name__ == "__main__":
    sys.exit(main())
