"""Settings declared once (``opt``): ``PretrainConfig`` here, ``FinetuneConfig`` in ``eval/recipes.py``; flags are
generated from the fields (``cli/options.py``), every setting takes the one dotted override ``--set KEY=VALUE``
(``objective.KEY``, ``augmentation.KEY``) and one converter reads every string. Precedence: defaults < preset <
flags < for ``--resume``, the run's record (only ``RESUME_MUTABLE`` may change). Knows no objective: its name
and options are checked where the run is built (``engine/build.py``)."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError, argparse.ArgumentTypeError):
    """A configuration problem; the message names the setting and the fix (argparse prints it for a bad flag)."""


def opt(default=dataclasses.MISSING, help: str = "", group: str = "", factory=None, **meta):
    """A field: default, help, section; ``flag`` (False or its name), ``choices``, ``metavar``, ``must``: ``"> 0"``."""
    metadata = {"help": help, "group": group, **meta}
    return field(default_factory=factory, metadata=metadata) if factory else field(default=default, metadata=metadata)


BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def kind_of(like) -> str:
    """A field's annotation (``'float | None'`` -> float; a string under postponed annotations) or a default's type."""
    if not isinstance(like, dataclasses.Field):
        return "any" if like is None else type(like).__name__
    t = like.type if isinstance(like.type, str) else like.type.__name__
    return next((p.strip() for p in t.split("|") if p.strip() != "None"), "str").split("[")[0]


def _literal(text: str):
    """A string of unknown type: a number if it reads as one (YAML takes ``1e-3`` for a string), else YAML."""
    for read in (int, float, yaml.safe_load):
        try:
            return read(text)
        except (ValueError, yaml.YAMLError):
            pass
    return text


def convert(value: Any, like, name: str) -> Any:
    """``value`` (a string or a YAML value) as the type of ``like``, a dataclass field or a default value."""
    kind = kind_of(like)
    if not isinstance(value, str):  # a YAML or Python value: a list where a tuple is declared, an int for a float
        if kind == "tuple" and isinstance(value, list):
            return tuple(value)
        return float(value) if kind == "float" and type(value) is int else value
    if value.lower() in ("none", "null") and (like is None or getattr(like, "default", 0) is None
                                               or "None" in str(getattr(like, "type", ""))):
        return None
    readers = {"bool": lambda v: BOOLS[v.lower()], "int": int, "float": float, "any": _literal, "dict": dict,
               "tuple": lambda v: tuple(_literal(x.strip()) for x in v.split(",") if x.strip())}  # dict: key by key
    try:
        return readers.get(kind, str)(value)
    except (KeyError, TypeError, ValueError, yaml.YAMLError):
        raise ConfigError(f"{name}: cannot read {value!r} as {kind}") from None


#: ``--set objective.KEY=...`` lands in ``objective_options``; ``augmentation.KEY`` in ``augmentation``
NESTED = {"objective": "objective_options", "augmentation": "augmentation", "finetune": "finetune"}


def parse_overrides(items, flag: str = "--set") -> dict[str, Any]:
    """``["lr=1e-3", "objective.mask_ratio=0.6"]`` -> ``{"lr": "1e-3", "objective_options": {"mask_ratio": 0.6}}``:
    the one KEY=VALUE syntax. A field converts its string; nested options are read as literals (8, not '8')."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = (part.strip() for part in item.partition("="))
        head, dot, sub = key.replace("-", "_").partition(".")
        need(sep and head and (dot or head not in NESTED.values()) and (not dot or head in NESTED and sub),
             f"{flag} {item!r}: expected KEY=VALUE or {'|'.join(NESTED)}.KEY=VALUE, e.g. {flag} warmup_epochs=5 "
             f"or {flag} objective.mask_ratio=0.6")
        if dot:
            out.setdefault(NESTED[head], {})[sub] = _literal(value)
        else:
            out[head] = value
    return out


W, D, O, E = "what to train", "data", "optimisation", "engine"  # the --help sections
DATA_HELP = "digits (built in), imagefolder:PATH, or wds:SHARDS (WebDataset: DIR or DIR/train-{000000..000127}.tar)"


@dataclass
class PretrainConfig:
    objective: str = opt("mae", "mae | aim | simmim | beit | ijepa | nepa, a plugin (`mimaim list`), or "
                                "module.path:ClassName", W)
    model: str = opt("vit_micro", "backbone: vit_micro|vit_tiny|vit_small|vit_base|vit_large|swin_*|... ", W)
    img_size: int = opt(32, "input resolution in pixels", W, must="> 0")
    patch_size: int = opt(4, "ViT patch size in pixels", W, must="> 0")
    recipe: str = opt("quick", "quick: heads, epochs sized for a CPU demo | paper", W, choices=("quick", "paper"))
    trunk: str = opt("paper", "paper: each objective's own ViT | shared: one for all", W, choices=("paper", "shared"))
    objective_options: dict = opt(help="the objective's options: objective.KEY=VALUE", factory=dict, flag=False)
    init: str | None = opt(None, "start a NEW run from these weights: a run dir, a checkpoint folder, a local HF "
                                 "folder or a timm checkpoint file", W, metavar="SOURCE")
    data: str = opt("digits", f"training data: {DATA_HELP}", D)
    val_fraction: float = opt(0.2, "share of each class held out for probes (its last files)", D, must="in (0, 1)")
    cache: str = opt("auto", "decode images into memory once (auto: when under 4 GB)", D, choices=("auto", "on", "off"))
    num_workers: int = opt(-1, "DataLoader workers per process (-1: from the CPU count)", D)
    max_bad_fraction: float = opt(0.01, "stop if a larger share of images is unreadable", D, must="in [0, 1]")
    data_fraction: float = opt(1.0, "train on this nested, seeded, per-class share", D, must="in (0, 1]")
    augmentation: dict = opt(help="the objective's augmentation: augmentation.KEY=VALUE", factory=dict, flag=False)
    epochs: int = opt(20, "epochs (may grow on --resume); recipe quick: the objective's own if unset", O, must="> 0")
    batch_size: int = opt(64, "global batch per step (split over processes and --accum-steps)", O, must="> 0")
    accum_steps: int = opt(1, "gradient accumulation micro-steps", O, must="> 0")
    blr: float = opt(1e-3, "base learning rate, lr = blr x batch/256 (official MAE code default)", O)
    lr: float | None = opt(None, "absolute learning rate (overrides --blr)", O)
    min_lr: float = opt(0.0, "floor of the cosine schedule", O)
    warmup_epochs: float = opt(2.0, "linear warm-up epochs", O, must=">= 0")
    schedule: str = opt("cosine", "cosine | multistep (x lr_gamma at milestones)", O, choices=("cosine", "multistep"))
    milestones: tuple = opt((), "multistep's epochs, e.g. 700,750", O)
    lr_gamma: float = opt(0.1, "multistep factor at each milestone", O, must="> 0")
    weight_decay: float = opt(0.05, "AdamW weight decay", O)
    betas: tuple = opt((0.9, 0.95), "AdamW betas", O)
    clip_grad: float | None = opt(None, "clip the gradient norm to this value (default off)", O)
    precision: str = opt("auto", "auto: bf16 on CUDA, fp32 on CPU", E, choices=("auto", "fp32", "bf16"))
    compile: bool = opt(False, "torch.compile the model", E)
    strategy: str = opt("ddp", "under torchrun: ddp (replicas) | fsdp (sharded)", E, choices=("ddp", "fsdp"))
    activation_checkpointing: bool = opt(False, "recompute block activations in the backward pass (less memory)", E)
    seed: int = opt(0, "random seed", E)
    device: str = opt("auto", "auto | cpu | cuda", E)
    out: str = opt("runs/mae-digits", "run directory (default runs/<objective>-<data>, numbered if taken)", E)
    save_every: int = opt(0, "checkpoint every N optimiser steps (0: at each epoch's end)", E)
    keep_last: int = opt(2, "checkpoints to keep", E, must=">= 1")
    log_every: int = opt(10, "log metrics every N optimiser steps", E)
    max_steps: int | None = opt(None, "stop after N optimiser steps (the schedule still follows epochs)", E)
    progress: bool = opt(True, "no progress bars", E, flag="--no-progress")
    online_probe: tuple = opt((), "probe the unmasked trunk while training: linear,knn (default off; needs labels)",
                              E, metavar="PROBES")
    online_probe_every: int = opt(0, "online probe every N steps (0: within 3 percent of step time, 2.5 of FLOPs)",
                                  E, must=">= 0")
    online_probe_images: int = opt(4096, "online probe slice: images of the train and of the held-out split", E,
                                   must="> 0")

    def effective_lr(self) -> float:
        return self.lr if self.lr is not None else self.blr * self.batch_size / 256

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def validate(self) -> "PretrainConfig":
        from .data import parse_data_spec
        from .data.transforms import Augmentation
        from .models import list_models

        check_fields(self)
        need(self.model in list_models(),
             f"model: unknown value {self.model!r}; choose one of {', '.join(list_models())}")
        need(self.img_size % self.patch_size == 0,
             f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}; pick sizes that divide")
        need(self.batch_size % self.accum_steps == 0,
             f"batch_size {self.batch_size} must be divisible by accum_steps {self.accum_steps}")
        self.augmentation = typed(Augmentation, self.augmentation, "augmentation.")
        need(all(isinstance(m, (int, float)) and m > 0 for m in self.milestones) and list(self.milestones) ==
             sorted(self.milestones), f"milestones must be increasing positive epochs, got {self.milestones}")
        need(self.schedule != "multistep" or self.milestones,
             "schedule multistep needs milestones, e.g. --milestones 700,750")
        need(len(self.betas) == 2, f"betas needs two values, got {self.betas}")
        need(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
             f"device: unknown value {self.device!r}; choose auto, cpu or cuda")
        need(set(self.online_probe) <= {"linear", "knn"},
             f"online_probe: unknown probe(s) in {','.join(map(str, self.online_probe))}; choose from linear, knn")
        parse_data_spec(self.data)
        return self


def need(cond, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def holds(value, rule: str) -> bool:
    """``"> 0"``, ``">= 1"`` or an interval ``"in (0, 1]"``."""
    if rule.startswith("in "):
        lo, hi = (float(x) for x in rule[4:-1].split(","))
        return (lo < value if rule[3] == "(" else lo <= value) and (value < hi if rule[-1] == ")" else value <= hi)
    op, bound = rule.split()
    return value > float(bound) if op == ">" else value >= float(bound)


def check_fields(settings) -> None:
    """Every field's ``choices`` and ``must`` rule (None: not set)."""
    for f in dataclasses.fields(settings):
        value, allowed, rule = getattr(settings, f.name), f.metadata.get("choices"), f.metadata.get("must")
        if value is not None:
            need(allowed is None or value in allowed,
                 f"{f.name}: unknown value {value!r}; choose one of {', '.join(allowed or ())}")
            need(rule is None or holds(value, rule), f"{f.name} must be {rule}, got {value}")


#: settings of the engine, not of what is computed (a re-run of a finished comparison cell may differ in them)
ENGINE_ONLY = frozenset({"out", "progress", "num_workers", "device", "cache", "log_every", "save_every", "keep_last",
                         "compile", "precision", "max_bad_fraction", "strategy", "activation_checkpointing",
                         "max_steps", "online_probe", "online_probe_every", "online_probe_images"})
#: the one resume allow-list: engine settings, the step size and the schedule's length (``init`` acts before step 0)
RESUME_MUTABLE = ENGINE_ONLY | {"lr", "blr", "min_lr", "warmup_epochs", "clip_grad", "weight_decay", "epochs",
                                "schedule", "milestones", "lr_gamma"}


def typed(cls, values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``values`` as the types of ``cls``'s fields (None: not given); an unknown key is an error."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for key, value in values.items():
        key = key.replace("-", "_")
        need(key in fields, f"unknown config key {prefix + key!r}; allowed keys: {', '.join(sorted(fields))}"
                            + ("" if prefix else " (an objective's options: objective.KEY)"))
        if value is not None or fields[key].default is None:
            out[key] = convert(value, fields[key], prefix + key)
    return out


def make_config(base: dict[str, Any] | None = None, **overrides) -> PretrainConfig:
    """Defaults < ``base`` (e.g. a YAML preset) < ``overrides``, converted and checked."""
    values: dict[str, Any] = {}
    for source in (base or {}, overrides):
        for key, value in typed(PretrainConfig, source).items():
            values[key] = {**values.get(key, {}), **value} if isinstance(value, dict) else value
    return PretrainConfig(**values).validate()


def resolve_config(preset: dict[str, Any] | None = None, flags: dict[str, Any] | None = None,
                   recorded: dict[str, Any] | None = None) -> PretrainConfig:
    """Defaults < ``preset`` < ``flags``; with ``recorded`` (a resumed run) the record wins, except the
    ``RESUME_MUTABLE`` settings given; any other given value that differs from the record is an error."""
    if recorded is None:
        return make_config(preset, **(flags or {}))
    given = {k.replace("-", "_"): v for k, v in {**(preset or {}), **(flags or {})}.items() if k != "init"}
    old, new = make_config(recorded), make_config(recorded, **given)  # the second checks the given values
    for key, flag in ((k, "--" + k.replace("_", "-")) for k in given):
        need(key in RESUME_MUTABLE or getattr(new, key) == getattr(old, key),
             f"{flag} {getattr(new, key)!r} does not match the run being resumed, which used {getattr(old, key)!r}; "
             f"drop {flag} or start a new run with --out (a resumed run may change only: "
             f"{', '.join(sorted(RESUME_MUTABLE - {'out'}))})")
    keep = {"max_steps": None, **{k: v for k, v in given.items() if k in RESUME_MUTABLE}}
    return make_config(recorded, **keep)


def load_yaml(path: str | Path) -> dict[str, Any]:
    need(Path(path).exists(), f"config file {str(path)!r} does not exist; see configs/ for presets")
    data = yaml.safe_load(Path(path).read_text()) or {}
    need(isinstance(data, dict), f"config file {path} must hold a mapping of setting: value")
    return data
