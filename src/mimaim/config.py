"""Run configuration: one dataclass, YAML presets, command-line overrides.

Precedence: dataclass defaults < ``--config`` preset < command-line flags. Every field is
checked at start; an error names the field and the allowed values.

``batch_size`` is the *global* optimiser batch: it is split across processes and
accumulation steps, so a recipe means the same thing on 1 CPU or 64 GPUs. The learning
rate is ``blr * batch_size / 256`` (MAE's rule) unless ``lr`` is set.

``recipe: quick`` (the default) lets an objective shrink its heads so that the built-in
run finishes in minutes on a laptop CPU (MAE: a 128-wide, 2-block decoder); ``recipe:
paper`` keeps every option at the paper's value. Presets under ``configs/`` use ``paper``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

PRECISIONS = ("auto", "fp32", "bf16")  # auto: bf16 autocast on CUDA, fp32 on CPU
RECIPES = ("quick", "paper")


class ConfigError(ValueError):
    """A configuration problem; the message names the field and the fix."""


@dataclass
class PretrainConfig:
    # what to train
    objective: str = "mae"
    model: str = "vit_micro"  # the quick default; the presets use the papers' sizes
    img_size: int = 32
    patch_size: int = 4
    recipe: str = "quick"
    objective_options: dict = field(default_factory=dict)
    # data
    data: str = "digits"
    val_fraction: float = 0.2
    cache: str = "auto"
    num_workers: int = -1  # -1: pick from the CPU count
    max_bad_fraction: float = 0.01
    data_fraction: float = 1.0  # train on this share of the training split (each class alike; nested, seeded)
    augmentation: dict = field(default_factory=dict)  # overrides of the objective's Augmentation, e.g. crop_scale
    # optimisation (MAE recipe)
    epochs: int = 20
    batch_size: int = 64
    accum_steps: int = 1
    blr: float = 1e-3  # the official MAE code's default; the paper's ImageNet recipe uses 1.5e-4
    lr: float | None = None
    min_lr: float = 0.0
    warmup_epochs: float = 2.0
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.95)
    clip_grad: float | None = None
    # engine
    precision: str = "auto"
    compile: bool = False
    seed: int = 0
    device: str = "auto"
    out: str = "runs/mae-digits"
    save_every: int = 0  # steps; 0 = once per epoch
    keep_last: int = 2
    log_every: int = 10
    max_steps: int | None = None  # stop early (for tests and dry runs); the schedule still follows epochs
    progress: bool = True

    def effective_lr(self) -> float:
        return self.lr if self.lr is not None else self.blr * self.batch_size / 256

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    def validate(self) -> "PretrainConfig":
        from .data import parse_data_spec
        from .models import list_models
        from .objectives import list_objectives

        def need(cond, msg):
            if not cond:
                raise ConfigError(msg)

        need(self.objective in list_objectives(),
             f"objective: unknown value {self.objective!r}; choose one of {', '.join(list_objectives())}")
        need(self.model in list_models(), f"model: unknown value {self.model!r}; choose one of {', '.join(list_models())}")
        need(self.recipe in RECIPES, f"recipe: unknown value {self.recipe!r}; choose one of {', '.join(RECIPES)}")
        need(self.precision in PRECISIONS, f"precision: unknown value {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        need(self.cache in ("auto", "on", "off"), f"cache: unknown value {self.cache!r}; choose auto, on or off")
        need(self.img_size > 0 and self.patch_size > 0, "img_size and patch_size must be positive")
        need(self.img_size % self.patch_size == 0,
             f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}; pick sizes that divide")
        need(self.epochs > 0, f"epochs must be positive, got {self.epochs}")
        need(self.batch_size > 0 and self.accum_steps > 0, "batch_size and accum_steps must be positive")
        need(self.batch_size % self.accum_steps == 0,
             f"batch_size {self.batch_size} must be divisible by accum_steps {self.accum_steps}")
        need(0 < self.val_fraction < 1, f"val_fraction must be in (0, 1), got {self.val_fraction}")
        need(0 < self.data_fraction <= 1,
             f"data_fraction must be in (0, 1], got {self.data_fraction}; 1.0 trains on the whole training split")
        from .objectives.base import Augmentation
        aug_fields = {f.name for f in dataclasses.fields(Augmentation)}
        need(isinstance(self.augmentation, dict) and set(self.augmentation) <= aug_fields,
             f"augmentation: unknown key(s) {sorted(set(self.augmentation or {}) - aug_fields)}; "
             f"allowed: {', '.join(sorted(aug_fields))}")
        need(0 <= self.max_bad_fraction <= 1, f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        need(self.warmup_epochs >= 0, "warmup_epochs must be >= 0")
        need(self.keep_last >= 1, "keep_last must be at least 1")
        need(len(self.betas) == 2, f"betas needs two values, got {self.betas}")
        need(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
             f"device: unknown value {self.device!r}; choose auto, cpu or cuda")
        parse_data_spec(self.data)
        return self


FIELDS = {f.name: f for f in dataclasses.fields(PretrainConfig)}


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist; see configs/ for presets")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of field: value")
    return data


def make_config(base: dict[str, Any] | None = None, **overrides) -> PretrainConfig:
    """Defaults < ``base`` (e.g. a YAML preset) < ``overrides``; unknown keys are errors."""
    values: dict[str, Any] = {}
    for source in (base or {}, overrides):
        for key, value in source.items():
            key = key.replace("-", "_")
            if key not in FIELDS:
                raise ConfigError(f"unknown config key {key!r}; allowed keys: {', '.join(sorted(FIELDS))}")
            if value is None and key not in ("lr", "clip_grad", "max_steps"):
                continue
            if key == "objective_options":
                values.setdefault(key, {})
                values[key] = {**values[key], **(value or {})}
            else:
                values[key] = value
    if "betas" in values:
        values["betas"] = tuple(values["betas"])
    return PretrainConfig(**values).validate()


def save_config(cfg: PretrainConfig, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)


def load_run_config(run_dir: str | Path) -> PretrainConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise ConfigError(f"{str(run_dir)!r} is not a mimaim run directory (no config.yaml); "
                          "pass the --out folder of a `mimaim pretrain` run")
    return make_config(load_yaml(path))
