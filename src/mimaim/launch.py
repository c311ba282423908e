"""``mimaim pretrain`` as a library call: resolve the config, train, draw the picture.

The command-line layer (``cli.py``) only parses flags and calls ``pretrain_command``.
Relaunching after a kill: the same command line a scheduler re-issues continues the run.

* ``--resume RUN_DIR`` where RUN_DIR has a ``config.yaml``: the recorded config is used (the
  optimiser settings in ``config.RESUME_MUTABLE`` may change); training continues from the
  newest checkpoint, or starts from step 0 when the kill came before the first one.
* ``--resume RUN_DIR`` where RUN_DIR has no ``config.yaml`` yet (killed before it was
  written, or the very first launch of a scheduled job): a new run starts in RUN_DIR from
  the preset and flags on the same command line. ``--resume auto`` does the same with
  ``--out``: continue it if it holds a run, else start it.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

from .config import ConfigError, PretrainConfig, load_yaml, make_config, resolve_config


def pretrain(cfg: PretrainConfig, resume: bool = False, picture: bool = True) -> Path:
    """Train (``engine.trainer.pretrain``), then draw the objective's reconstruction picture."""
    from .engine.trainer import pretrain as train

    run_dir = train(cfg, resume=resume)
    if picture and int(os.environ.get("RANK", "0")) == 0 and _picture_is_stale(run_dir):
        draw_reconstruction(run_dir, cfg.device)
    return run_dir


def _picture_is_stale(run_dir: Path) -> bool:
    from .engine.checkpoint import latest_checkpoint

    pic, ckpt = run_dir / "reconstruction.png", latest_checkpoint(run_dir)
    return ckpt is not None and (not pic.exists() or pic.stat().st_mtime < ckpt.stat().st_mtime)


def draw_reconstruction(run_dir: Path, device: str = "auto") -> Path | None:
    try:
        from .engine.runs import load_run
        from .eval.pictures import reconstruction_figure
        from .objectives import Objective

        from .engine.distributed import resolve_device
        device = str(resolve_device(device))
        cfg, objective, _ = load_run(run_dir, device=device)
        if getattr(type(objective), "reconstruct") is getattr(Objective, "reconstruct"):
            return None  # this objective draws no picture
        path = reconstruction_figure(objective, cfg, run_dir / "reconstruction.png", device=device)
        print(f"wrote {path}", file=sys.stderr)
        return path
    except Exception as err:  # noqa: BLE001 - a picture must never fail a finished run
        warnings.warn(f"could not draw the reconstruction picture: {type(err).__name__}: {err}")
        return None


def resolve_pretrain(flags: dict, preset: str | None = None, resume: str | None = None) -> tuple[PretrainConfig, bool]:
    """-> (config, whether to continue an existing run). See the module docstring for ``resume``."""
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
            recorded_values = {**load_yaml(recorded), "out": str(resume)}
            if "blr" in flags and "lr" not in flags:  # a new --blr replaces a recorded absolute --lr
                flags["lr"] = None
            return resolve_config(preset_values, flags, recorded_values), True
        if not preset_values and set(flags) <= {"out", "progress", "device", "num_workers"}:
            raise ConfigError(f"{str(resume)!r} is not a mimaim run directory (no config.yaml) and the command "
                              "names no settings to start one; pass the --out folder of a `mimaim pretrain` run, "
                              "or the run's settings (e.g. --config PRESET) so that the same command starts it "
                              "when it does not exist yet")
        print(f"{resume} holds no run yet: starting it from the settings on this command line", file=sys.stderr)
        return resolve_config(preset_values, flags), False
    cfg = resolve_config(preset_values, flags)
    if "out" not in flags and "out" not in preset_values:
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
    from .engine.build import resolved_objective_options
    from .objectives.base import get_objective_class, parse_options

    if gpus is not None and (not dry_run or gpus < 1):
        raise ConfigError(f"--gpus {gpus}: --gpus N (N >= 1) plans a --dry-run for N GPUs; to train on N GPUs "
                          "launch N processes: `torchrun --nproc_per_node=N -m mimaim pretrain ...`")
    cfg, cont = resolve_pretrain(flags, preset, resume)
    parse_options(get_objective_class(cfg.objective), resolved_objective_options(cfg))  # fail before any work
    if dry_run:
        from .engine.estimate import dry_run as estimate
        estimate(cfg, world_size=gpus)
        return None
    return pretrain(cfg, resume=cont)


__all__ = ["pretrain", "pretrain_command", "resolve_pretrain", "default_out", "draw_reconstruction", "make_config"]
