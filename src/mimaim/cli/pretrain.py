"""``mimaim pretrain``: resolve the config, assemble the run (``--init`` weights), train, draw the picture. The same
command relaunched continues the run: ``--resume RUN_DIR`` (``auto``: ``--out``) keeps its recorded config
(``config.RESUME_MUTABLE`` may change), or starts RUN_DIR from this command's settings if it holds no run yet."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from ..config import RESUME_MUTABLE, ConfigError, PretrainConfig, load_yaml, parse_overrides, resolve_config
from ..config import W as WHAT
from .options import SUPPRESS, add_fields, given

#: objective options with a flag of their own (any option: --set objective.KEY=VALUE)
OBJECTIVE_FLAGS = {"mask_ratio": (float, "share of patches masked (MAE default 0.75)"),
                   "attention": (str, "AIM pre-training attention: prefix (default) | causal"),
                   "tokenizer": (str, "BEiT visual tokenizer: kmeans (default) | dalle:PATH | PATH of a "
                                      "`mimaim tokenizer train` output")}


def add_parser(sub) -> None:
    p = sub.add_parser("pretrain", help="pre-train an encoder with a self-supervised objective",
                       description="Pre-train an encoder. Values come from the defaults, then --config, then "
                                   "flags and --set. --batch-size is the global optimiser batch, split across "
                                   "processes and --accum-steps; the learning rate is blr x batch/256 (MAE).",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group(WHAT)
    g.add_argument("--config", help="YAML preset (see configs/), overridden by flags", default=SUPPRESS)
    for name, (typ, text) in OBJECTIVE_FLAGS.items():
        g.add_argument("--" + name.replace("_", "-"), type=typ, help=text, default=SUPPRESS)
    g.add_argument("--set", action="append", metavar="KEY=VALUE", dest="overrides", default=SUPPRESS,
                   help="any setting, e.g. --set min_lr=1e-6; an objective's option: --set objective.decoder_depth=8 "
                        "(`mimaim list` shows them); the augmentation: --set augmentation.crop_scale=0.4,1 (a wrong "
                        "key's error lists the keys); repeatable")
    g.add_argument("--resume", metavar="RUN_DIR", default=SUPPRESS,
                   help="continue the run in RUN_DIR from its last checkpoint (from step 0 if it has none; a new "
                        "run from this command's settings if RUN_DIR holds no run yet; `auto`: the --out folder). "
                        "A resumed run keeps its recorded config except: " + ", ".join(sorted(RESUME_MUTABLE)))
    g.add_argument("--dry-run", action="store_true", default=SUPPRESS,
                   help="print parameters, expected memory and FLOPs, and what --init would load; train nothing")
    g.add_argument("--gpus", type=int, metavar="N", default=SUPPRESS,
                   help="with --dry-run: the number of GPUs to plan for (default: WORLD_SIZE, else 1)")
    p.set_defaults(func=cmd_pretrain, fields=add_fields(p, PretrainConfig, sections={WHAT: g}))


def cmd_pretrain(args) -> int:
    flags = given(args, args.fields)
    sets = parse_overrides(getattr(args, "overrides", None))
    options = {**sets.pop("objective_options", {}), **given(args, OBJECTIVE_FLAGS)}
    flags.update(sets)
    if options:
        flags["objective_options"] = options
    pretrain_command(flags, preset=getattr(args, "config", None), resume=getattr(args, "resume", None),
                     dry_run=getattr(args, "dry_run", False), gpus=getattr(args, "gpus", None))
    return 0


def resolve_pretrain(flags: dict, preset: str | None = None, resume: str | None = None) -> tuple[PretrainConfig, bool]:
    """-> (config, whether to continue an existing run). See the module docstring for ``resume``."""
    from ..objectives import get_objective_class

    preset_values = load_yaml(preset) if preset else {}
    flags = dict(flags)
    if resume == "auto":
        if "out" not in flags:
            raise ConfigError("--resume auto continues the run in --out; pass --out RUN_DIR as well")
        resume = flags["out"]
    if resume:
        if "out" in flags and Path(flags["out"]).resolve() != Path(resume).resolve():
            raise ConfigError(f"--out {flags['out']} and --resume {resume} name different folders; "
                              "pass the same one (or only --resume)")
        flags["out"] = str(resume)
        recorded = Path(resume) / "config.yaml"
        if recorded.is_file():
            if "blr" in flags and "lr" not in flags:  # a new --blr replaces a recorded absolute --lr
                flags["lr"] = None
            return resolve_config(preset_values, flags, {**load_yaml(recorded), "out": str(resume)}), True
        if not preset_values and set(flags) <= {"out", "progress", "device", "num_workers"}:
            raise ConfigError(f"{str(resume)!r} is not a mimaim run directory (no config.yaml) and the command "
                              "names no settings to start one; pass the --out folder of a `mimaim pretrain` run, "
                              "or the run's settings (e.g. --config PRESET) so that the same command starts it "
                              "when it does not exist yet")
        print(f"{resume} holds no run yet: starting it from the settings on this command line", file=sys.stderr)
    cfg = resolve_config(preset_values, flags)
    if cfg.recipe == "quick" and "epochs" not in {**preset_values, **flags}:
        cfg.epochs = get_objective_class(cfg.objective).quick_epochs or cfg.epochs
    if not resume and "out" not in flags and "out" not in preset_values:
        cfg.out = default_out(cfg.objective, cfg.data)
    return cfg, False


def default_out(objective: str, data: str) -> str:
    name = "digits" if data == "digits" else Path(data.split(":", 1)[-1].rstrip("/")).name or "data"
    base = Path("runs") / f"{objective.replace(':', '.')}-{name}"
    out, n = base, 1
    while (out / "config.yaml").exists():
        n += 1
        out = Path(f"{base}-{n}")
    return str(out)


def pretrain_command(flags: dict, preset: str | None = None, resume: str | None = None,
                     dry_run: bool = False, gpus: int | None = None) -> Path | None:
    """What ``mimaim pretrain`` does with its parsed flags (``PretrainConfig`` field -> value).
    ``gpus``: with ``dry_run``, the number of GPUs to plan for (default ``WORLD_SIZE``)."""
    from ..engine.build import check_objective

    if gpus is not None and (not dry_run or gpus < 1):
        raise ConfigError(f"--gpus {gpus}: --gpus N (N >= 1) plans a --dry-run for N GPUs; to train on N GPUs "
                          "launch N processes: `torchrun --nproc_per_node=N -m mimaim pretrain ...`")
    cfg, cont = resolve_pretrain(flags, preset, resume)
    check_objective(cfg)  # fail before any work
    if dry_run:
        from ..engine.build import build_run_objective
        from ..engine.estimate import dry_run as estimate
        from ..interop.init import initializer

        if cfg.init:  # the source is loaded as a run would load it (a misfit fails here); nothing is trained
            print("dry run: " + initializer(cfg.init)(build_run_objective(cfg)), flush=True)
        estimate(cfg, world_size=gpus)
        return None
    return pretrain(cfg, resume=cont)


def pretrain(cfg: PretrainConfig, resume: bool = False, picture: bool = True) -> Path:
    """Train (``engine.trainer.pretrain``, with ``--init`` weights for a new run), then draw the picture."""
    from ..engine.trainer import pretrain as train
    from ..interop.init import initializer

    run_dir = train(cfg, resume=resume, init=initializer(cfg.init))
    if picture and int(os.environ.get("RANK", "0")) == 0 and _picture_is_stale(run_dir):
        draw_reconstruction(run_dir, cfg.device)
    return run_dir


def _picture_is_stale(run_dir: Path) -> bool:
    from ..engine.checkpoint import latest_checkpoint

    pic, ckpt = run_dir / "reconstruction.png", latest_checkpoint(run_dir)
    return ckpt is not None and (not pic.exists() or pic.stat().st_mtime < ckpt.stat().st_mtime)


def draw_reconstruction(run_dir: Path, device: str = "auto") -> Path | None:
    from ..engine.distributed import resolve_device
    from ..engine.runs import load_run
    from ..eval.pictures import reconstruction_figure
    from ..objectives import Objective

    try:
        device = str(resolve_device(device))
        cfg, objective, _ = load_run(run_dir, device=device)
        if type(objective).reconstruct is Objective.reconstruct:
            return None  # this objective draws no picture
        path = reconstruction_figure(objective, cfg, run_dir / "reconstruction.png", device=device)
        print(f"wrote {path}", file=sys.stderr)
        return path
    except Exception as err:  # noqa: BLE001 - a picture must never fail a finished run
        warnings.warn(f"could not draw the reconstruction picture: {type(err).__name__}: {err}")
        return None
