"""Command line: argument parsing and sub-commands only; the work lives in the library. Building the parser
imports no torch: each command module imports the library when it runs."""

from __future__ import annotations

import argparse
import os
import sys

from ..version import __version__
from . import data, evaluate, pretrain, studies

EPILOG = """examples:
  mimaim pretrain                                   # MAE, ViT-Micro/4, built-in digits, ~2 minutes on a CPU
  mimaim pretrain --data imagefolder:~/cifar10/train --epochs 100 --precision bf16
  mimaim pretrain --config configs/mae_vit_base.yaml --data imagefolder:/data/imagenet/train
  mimaim pretrain --objective aim --set objective.head_depth=4 --set min_lr=1e-6
  mimaim pretrain --resume runs/mae-digits --lr 1e-4 --clip-grad 1.0  # after a NaN stop: new optimiser settings
  mimaim pretrain --config PRESET --out runs/x --resume auto        # one command a scheduler re-issues after a kill
  mimaim pretrain --init runs/mae-digits --data imagefolder:~/mydomain   # a new run from another run's weights
  mimaim pretrain --objective mypackage.objective:MyObjective       # a fifth objective, one file, no package edit
  torchrun --nproc_per_node=8 -m mimaim pretrain --config configs/mae_vit_base.yaml --data imagefolder:PATH
  mimaim probe runs/mae-digits
  mimaim reconstruct runs/mae-digits --images a.jpg b.jpg
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mimaim", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Self-supervised pre-training of vision encoders: MAE, BEiT, SimMIM and AIM behind one "
                    "training engine, with probes and pictures.")
    parser.add_argument("--version", action="version", version=f"mimaim {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (pretrain, evaluate, studies, data):
        module.add_parser(sub)
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
        from ..engine.checkpoint import CheckpointError
        from ..engine.trainer import TrainingDiverged

        known = (ValueError, CheckpointError, TrainingDiverged, FileNotFoundError, FileExistsError,
                 NotImplementedError)  # ValueError covers ConfigError and DataError
        if isinstance(err, known) and not os.environ.get("MIMAIM_DEBUG"):
            print(f"mimaim: error: {err}", file=sys.stderr)
            return 1 if isinstance(err, TrainingDiverged) else 2
        raise


if __name__ == "__main__":
    sys.exit(main())
