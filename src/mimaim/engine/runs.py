"""Open a finished (or running) run directory: its config and its trained objective."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import PretrainConfig, load_run_config
from .checkpoint import latest_checkpoint, list_checkpoints, load_weights


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None, device: str | torch.device = "cpu"):
    """-> (config, objective in eval mode, checkpoint path). The newest checkpoint by default."""
    from .trainer import build_run_objective

    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise FileNotFoundError(f"run directory {str(run_dir)!r} does not exist; pass the --out folder of a "
                                "`mimaim pretrain` run")
    cfg: PretrainConfig = load_run_config(run_dir)
    ckpt = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir} has no finished checkpoint yet (looked in {run_dir / 'checkpoints'})")
    objective = build_run_objective(cfg)
    load_weights(objective, ckpt, what=f"checkpoint of run {run_dir}")
    return cfg, objective.to(device).eval(), ckpt


def available_checkpoints(run_dir: str | Path) -> list[Path]:
    return list_checkpoints(Path(run_dir) / "checkpoints")
