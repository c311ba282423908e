"""A config -> the objective it describes; where the objective's part of a config is checked."""

from __future__ import annotations

import torch

from ..config import ConfigError, PretrainConfig, need
from ..models import create_model, model_family
from ..objectives import Objective, ProbeProtocol, build_objective, get_objective_class, parse_options
from ..objectives.base import fit_trunk

#: ``trunk: shared`` (compare's default): one ViT for every objective, so cells differ in objective, masking and
#: target only (AIM paper 2401.08541, Table 5): MAE's ViT (sin-cos positions from step 0, xavier init) without
#: cls token (AIM's raster order has no place for one), relative bias, layer scale or drop path.
SHARED_TRUNK = dict(class_token=False, pos_embed="sincos", qkv_bias="all", bias=True, patch_norm=False,
                    patch_bias=True, rel_pos_bias=False, init_values=None, drop_path_rate=0.0, weight_init="xavier")


def resolved_objective_options(cfg: PretrainConfig) -> dict:
    """The user's options over the objective's quick defaults (``recipe: quick``) or the paper's."""
    cls = get_objective_class(cfg.objective)
    quick = cls.quick_options if cfg.recipe == "quick" else {}
    return {**quick, **cfg.objective_options}


def check_objective(cfg: PretrainConfig) -> tuple[object, dict, ProbeProtocol]:
    """-> the objective's ``Options`` (over its recipe's), its backbone's arguments besides the sizes under
    ``cfg.trunk`` and its probe protocol there, checked before any work (a trunk it cannot use: ConfigError)."""
    try:
        cls = get_objective_class(cfg.objective)
        options, family = parse_options(cls, resolved_objective_options(cfg)), model_family(cfg.model)
        kwargs = cls.family_backbone_kwargs(options, family)
        if cfg.trunk == "shared":
            need(family == "vit", f"trunk shared: {cfg.model} is a {family} backbone and the shared trunk a ViT; "
                                  "pick a vit_* --model, or --trunk paper (SimMIM's Swin is a paper flavour)")
            recipe = parse_options(cls, cls.quick_options if cfg.recipe == "quick" else {})
            need(cls.family_backbone_kwargs(recipe, family) == kwargs,
                 f"trunk shared: objective options {cfg.objective_options} change {cls.name}'s own trunk, which "
                 "the shared trunk replaces; drop them or use --trunk paper")
            kwargs = {**kwargs, **SHARED_TRUNK}
        return options, kwargs, fit_trunk(cls, kwargs)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def build_run_objective(cfg: PretrainConfig) -> Objective:
    """The objective and backbone a config describes, freshly initialised from ``cfg.seed``. On the shared trunk
    the encoder starts from the weights of its random-init row (``runs.build_backbone``): an objective's own
    re-init of its trunk (AIM's q/k/v, SimMIM's patch projection) belongs to its paper flavour."""
    kwargs = check_objective(cfg)[1]
    torch.manual_seed(cfg.seed)
    sizes = dict(img_size=cfg.img_size, patch_size=cfg.patch_size)
    trunk = create_model(cfg.model, **sizes, **kwargs).state_dict() if cfg.trunk == "shared" else None
    torch.manual_seed(cfg.seed)
    objective = build_objective(cfg.objective, cfg.model, cfg.img_size, cfg.patch_size,
                                resolved_objective_options(cfg), **kwargs)
    if trunk is not None:
        objective.encoder.load_state_dict(trunk)
    return objective
