"""Tiny runs written through the real checkpoint format, without training (for load/export/init tests)."""

from __future__ import annotations

from pathlib import Path

import torch

from mimaim.config import make_config
from mimaim.engine.runs import save_config
from mimaim.engine.checkpoint import save_checkpoint
from mimaim.engine.runs import run_record
from mimaim.engine.build import build_run_objective


def randomize(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Add noise to every trainable parameter, so zero biases and constant layer scales are tested too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return module


def make_run(root: Path, objective: str = "mae", step: int = 1, **overrides):
    """-> (run dir, objective with random weights), saved as the trainer saves a checkpoint."""
    values = dict(objective=objective, model="vit_micro", img_size=32, patch_size=4, progress=False,
                  out=str(root))
    values.update(overrides)
    cfg = make_config(**values)
    obj = randomize(build_run_objective(cfg)).eval()
    root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, root / "config.yaml")
    save_checkpoint(root / "checkpoints", step, obj, {"step": step}, record=run_record(cfg))
    return root, obj


def images(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
