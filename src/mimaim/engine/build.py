"""A config -> the objective it describes (its options resolved against the recipe)."""

from __future__ import annotations

import torch

from ..config import PretrainConfig
from ..objectives import Objective, build_objective, get_objective_class


def resolved_objective_options(cfg: PretrainConfig) -> dict:
    """The user's options over the objective's quick defaults (``recipe: quick``) or the paper's."""
    cls = get_objective_class(cfg.objective)
    quick = cls.quick_options if cfg.recipe == "quick" else {}
    return {**quick, **cfg.objective_options}


def build_run_objective(cfg: PretrainConfig) -> Objective:
    """The objective and backbone a config describes, freshly initialised from ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    return build_objective(cfg.objective, cfg.model, cfg.img_size, cfg.patch_size,
                           resolved_objective_options(cfg))
