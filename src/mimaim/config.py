"""Run configuration: one dataclass, YAML presets, command-line overrides.

Each setting is declared once, as a ``PretrainConfig`` field with its default and help;
the ``mimaim pretrain`` flags are generated from these fields (``options.py``).

Precedence (``resolve_config``, shared by every command): dataclass defaults < ``--config``
preset < command-line flags; for ``--resume`` the run's recorded ``config.yaml`` is kept,
except the settings in ``RESUME_MUTABLE`` (learning rate, clipping, warm-up, epochs, engine
switches), which a resumed run may change. Every field is checked at start; an error
names the field and the allowed values.

``batch_size`` is the *global* optimiser batch: it is split across processes and
accumulation steps, so a recipe means the same thing on 1 CPU or 64 GPUs. The learning
rate is ``blr * batch_size / 256`` (MAE's rule) unless ``lr`` is set.

``recipe: quick`` (the default) lets an objective shrink its heads so that the built-in
run finishes in minutes on a laptop CPU (MAE: a 128-wide, 2-block decoder); ``recipe:
paper`` keeps every option at the paper's value. Presets under ``configs/`` use ``paper``.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .options import OptionError, coerce_field

PRECISIONS = ("auto", "fp32", "bf16")  # auto: bf16 autocast on CUDA, fp32 on CPU
RECIPES = ("quick", "paper")
STRATEGIES = ("ddp", "fsdp")
SCHEDULES = ("cosine", "multistep")


class ConfigError(ValueError):
    """A configuration problem; the message names the field and the fix."""


def opt(default=dataclasses.MISSING, help: str = "", group: str = "", factory=None, **meta):
    """A config field: its default, its ``--help`` text and section, in one place."""
    metadata = {"help": help, "group": group, **meta}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


WHAT, DATA, OPTIM, ENGINE = "what to train", "data", "optimisation", "engine"


@dataclass
class PretrainConfig:
    # what to train
    objective: str = opt("mae", "mae | aim | simmim | beit, an installed plugin (`mimaim list`), "
                                "or module.path:ClassName", WHAT)
    model: str = opt("vit_micro", "backbone: vit_micro|vit_tiny|vit_small|vit_base|vit_large|vit_huge|swin_*|...",
                     WHAT)
    img_size: int = opt(32, "input resolution in pixels", WHAT)
    patch_size: int = opt(4, "ViT patch size in pixels", WHAT)
    recipe: str = opt("quick", "quick: objective heads sized for a CPU demo; paper: the paper's values", WHAT,
                      choices=RECIPES)
    objective_options: dict = opt(help="the objective's own options (--opt KEY=VALUE)", factory=dict, cli=False)
    init: str | None = opt(None, "start a NEW run from these weights: a run dir, a checkpoint folder, a local HF "
                                 "folder or a timm checkpoint file; prints what was loaded", WHAT, metavar="SOURCE")
    # data
    data: str = opt("digits", "training data (see `mimaim pretrain --help` data section)", DATA)
    val_fraction: float = opt(0.2, "share of each class held out for probes (the last files of each class)", DATA)
    cache: str = opt("auto", "decode an image folder into memory once (auto: when it fits in 4 GB)", DATA,
                     choices=("auto", "on", "off"))
    num_workers: int = opt(-1, "DataLoader workers per process (-1: pick from the CPU count)", DATA)
    max_bad_fraction: float = opt(0.01, "stop if more than this share of images cannot be read", DATA)
    data_fraction: float = opt(1.0, "train on this share of the training split (each class alike; nested, seeded)",
                               DATA)
    augmentation: dict = opt(help="overrides of the objective's Augmentation, e.g. {crop_scale: [0.2, 1.0]}",
                             factory=dict, cli=False)
    # optimisation (MAE recipe)
    epochs: int = opt(20, "epochs (may grow on --resume); recipe quick: the objective's quick_epochs when not "
                          "given", OPTIM)
    batch_size: int = opt(64, "global batch per optimiser step (split across processes and --accum-steps)", OPTIM)
    accum_steps: int = opt(1, "gradient accumulation micro-steps", OPTIM)
    blr: float = opt(1e-3, "base learning rate, lr = blr x batch/256 (official MAE code default; the paper's "
                           "ImageNet recipe uses 1.5e-4); may change on --resume", OPTIM)
    lr: float | None = opt(None, "absolute learning rate (overrides --blr); may change on --resume", OPTIM)
    min_lr: float = opt(0.0, "floor of the cosine schedule", OPTIM)
    warmup_epochs: float = opt(2.0, "linear warm-up epochs; may change on --resume", OPTIM)
    schedule: str = opt("cosine", "cosine: warm-up then half-cosine to --min-lr; multistep: warm-up, flat, "
                                  "x --lr-gamma at each of --milestones (SimMIM)", OPTIM, choices=SCHEDULES)
    milestones: tuple = opt((), "epochs at which multistep multiplies the lr by --lr-gamma, e.g. 700,750", OPTIM)
    lr_gamma: float = opt(0.1, "multistep factor at each milestone", OPTIM)
    weight_decay: float = opt(0.05, "AdamW weight decay; may change on --resume", OPTIM)
    betas: tuple = opt((0.9, 0.95), "AdamW betas", OPTIM)
    clip_grad: float | None = opt(None, "clip the gradient norm to this value (default off); may change on --resume",
                                  OPTIM)
    # engine
    precision: str = opt("auto", "auto: bf16 autocast on CUDA, fp32 on CPU; bf16 on a CPU is fast only with "
                                 "AVX512-BF16/AMX (else ~20x slower than fp32, and mimaim warns)", ENGINE,
                         choices=PRECISIONS)
    compile: bool = opt(False, "torch.compile the model", ENGINE)
    strategy: str = opt("ddp", "multi-process strategy under torchrun: ddp (replicas) | fsdp (sharded)", ENGINE,
                        choices=STRATEGIES)
    activation_checkpointing: bool = opt(False, "recompute block activations in the backward pass (less memory)",
                                         ENGINE)
    seed: int = opt(0, "random seed", ENGINE)
    device: str = opt("auto", "auto | cpu | cuda", ENGINE)
    out: str = opt("runs/mae-digits", "run directory (default runs/<objective>-<data>, numbered if taken)", ENGINE)
    save_every: int = opt(0, "checkpoint every N optimiser steps (0: at each epoch's end)", ENGINE)
    keep_last: int = opt(2, "checkpoints to keep", ENGINE)
    log_every: int = opt(10, "log metrics every N optimiser steps", ENGINE)
    max_steps: int | None = opt(None, "stop after N optimiser steps (smoke tests; the schedule still follows "
                                      "--epochs)", ENGINE)
    progress: bool = opt(True, "no progress bars", ENGINE, flag="--no-progress")

    def effective_lr(self) -> float:
        return self.lr if self.lr is not None else self.blr * self.batch_size / 256

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("betas", "milestones"):
            d[key] = list(getattr(self, key))
        return d

    def validate(self) -> "PretrainConfig":
        from .data import parse_data_spec
        from .models import list_models
        from .objectives import get_objective_class, list_objectives

        def need(cond, msg):
            if not cond:
                raise ConfigError(msg)

        try:
            cls = get_objective_class(self.objective)
        except (ValueError, ImportError) as err:
            raise ConfigError(f"objective: unknown value {self.objective!r}; choose one of "
                              f"{', '.join(list_objectives())} or a module.path:ClassName ({err})") from None
        self.objective_options = _typed_options(cls, self.objective_options)
        need(self.model in list_models(), f"model: unknown value {self.model!r}; choose one of {', '.join(list_models())}")
        for name, allowed in (("recipe", RECIPES), ("precision", PRECISIONS), ("strategy", STRATEGIES),
                              ("schedule", SCHEDULES), ("cache", ("auto", "on", "off"))):
            need(getattr(self, name) in allowed,
                 f"{name}: unknown value {getattr(self, name)!r}; choose one of {', '.join(allowed)}")
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
        need(all(isinstance(m, (int, float)) and m > 0 for m in self.milestones) and
             list(self.milestones) == sorted(self.milestones),
             f"milestones must be increasing positive epochs, got {self.milestones}")
        need(self.schedule != "multistep" or self.milestones,
             "schedule multistep needs --milestones, e.g. --milestones 700,750")
        need(self.lr_gamma > 0, f"lr_gamma must be positive, got {self.lr_gamma}")
        need(self.keep_last >= 1, "keep_last must be at least 1")
        need(len(self.betas) == 2, f"betas needs two values, got {self.betas}")
        need(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
             f"device: unknown value {self.device!r}; choose auto, cpu or cuda")
        parse_data_spec(self.data)
        return self


FIELDS = {f.name: f for f in dataclasses.fields(PretrainConfig)}


def _typed_options(cls, options: dict) -> dict:
    """``--opt`` strings as the types of the objective's Options (so config.yaml records 8, not '8');
    unknown names are left for ``parse_options`` to name with the allowed ones."""
    from .objectives.base import coerce_like

    if not options or not dataclasses.is_dataclass(getattr(cls, "Options", None)):
        return dict(options or {})
    defaults = {f.name: f for f in dataclasses.fields(cls.Options)}
    out = {}
    for key, value in options.items():
        f = defaults.get(key)
        if f is not None and f.default is not dataclasses.MISSING:
            try:
                value = coerce_like(f.default, value, f"{cls.name}.{key}")
            except ValueError as err:
                raise ConfigError(str(err)) from None
        out[key] = list(value) if isinstance(value, tuple) else value
    return out

#: settings a resumed run may change: the optimiser's step size and clipping, the schedule's
#: length, and engine switches that do not change what is computed. Everything else is the run's.
RESUME_MUTABLE = frozenset({
    "lr", "blr", "min_lr", "warmup_epochs", "clip_grad", "weight_decay", "epochs", "schedule", "milestones",
    "lr_gamma", "max_steps", "precision", "compile", "device", "num_workers", "cache", "progress", "log_every",
    "save_every", "keep_last", "max_bad_fraction", "strategy", "activation_checkpointing", "out"})
#: settings that only make sense for a new run (``init`` loads weights before step 0)
NEW_RUN_ONLY = frozenset({"init"})
#: settings of one launch, not of the run: a relaunch that does not repeat them gets the default
SESSION_ONLY = frozenset({"max_steps"})


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
    """Defaults < ``base`` (e.g. a YAML preset) < ``overrides``; unknown keys are errors.

    String values (``--set key=value``) are converted to each field's type.
    """
    values: dict[str, Any] = {}
    for source in (base or {}, overrides):
        for key, value in source.items():
            key = key.replace("-", "_")
            if key not in FIELDS:
                raise ConfigError(f"unknown config key {key!r}; allowed keys: {', '.join(sorted(FIELDS))}")
            if value is None and FIELDS[key].default is not None:
                continue
            try:
                value = coerce_field(FIELDS[key], value)
            except OptionError as err:
                raise ConfigError(str(err)) from None
            if key == "objective_options":
                values[key] = {**values.get(key, {}), **(value or {})}
            else:
                values[key] = value
    for key in ("betas", "milestones"):
        if key in values:
            values[key] = tuple(values[key])
    return PretrainConfig(**values).validate()


def resolve_config(preset: dict[str, Any] | None = None, flags: dict[str, Any] | None = None,
                   recorded: dict[str, Any] | None = None) -> PretrainConfig:
    """The one merge of every command: defaults < ``preset`` < ``flags`` < ``recorded`` (a resumed run).

    A new run on ``recipe: quick`` without ``epochs`` takes the objective's ``quick_epochs``.
    For a resumed run the recorded config wins, except ``RESUME_MUTABLE`` settings given in
    the preset or flags; any other given value that differs from the record is an error
    (that would be another run), naming the setting and both values.
    """
    given = {k.replace("-", "_"): v for k, v in {**(preset or {}), **(flags or {})}.items()}
    if recorded is None:
        cfg = make_config(preset, **(flags or {}))
        if cfg.recipe == "quick" and given.get("epochs") is None:
            from .objectives import get_objective_class
            cfg.epochs = get_objective_class(cfg.objective).quick_epochs or cfg.epochs
        return cfg
    old = make_config(recorded)
    new = make_config(recorded, **given)  # validates the given values
    clash = [k for k in given if k not in RESUME_MUTABLE and k not in NEW_RUN_ONLY
             and _norm(getattr(new, k)) != _norm(getattr(old, k))]
    for key in clash:
        flag = "--" + key.replace("_", "-")
        raise ConfigError(f"{flag} {_norm(getattr(new, key))!r} does not match the run being resumed, which used "
                          f"{_norm(getattr(old, key))!r}; drop {flag} or start a new run with --out (a resumed run "
                          f"may change only: {', '.join(sorted(RESUME_MUTABLE - {'out'}))})")
    keep = {k: v for k, v in given.items() if k in RESUME_MUTABLE}
    for key in SESSION_ONLY - set(keep):
        keep[key] = FIELDS[key].default
    return make_config(recorded, **keep)


def _norm(value):
    return list(value) if isinstance(value, tuple) else value


def save_config(cfg: PretrainConfig, path: str | Path) -> None:
    """Write ``config.yaml`` atomically: a reader (or a relaunch after a kill) sees the old file or the new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_run_config(run_dir: str | Path) -> PretrainConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise ConfigError(f"{str(run_dir)!r} is not a mimaim run directory (no config.yaml); "
                          "pass the --out folder of a `mimaim pretrain` run")
    return make_config(load_yaml(path))
