"""The seam between the engine and the objectives: the engine knows an objective only as an ``Objective``
(``Options`` with the paper's defaults, the backbone flavour, ``augmentation``, ``sample_masking`` drawn in
the data pipeline, ``forward -> ObjectiveOutput``, ``reconstruct`` for pictures, ``encoder`` for probes).
A new one is one file (docs/guide.md, "A fifth objective"), found as ``--objective package.module:Class``,
through ``$MIMAIM_PLUGINS`` or the ``mimaim.objectives`` entry-point group (``load_plugins``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import convert
from ..data.transforms import Augmentation  # noqa: F401  (re-exported: objectives declare theirs)


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # scalar
    pred: torch.Tensor | None = None  # objective-specific prediction, e.g. (B, N, p*p*3)
    target: torch.Tensor | None = None
    mask: torch.Tensor | None = None  # (B, N), 1 = position counted in the loss
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ProbeProtocol:
    """How probes read an objective's frozen encoder, as its official evaluation does (``eval/features.py``):
    ``pool`` "cls" or "mean" (of patch tokens), ``layers`` block indices averaged (None: the last block),
    ``norm`` the final LayerNorm applied to each, ``source`` the paper section or official script."""
    pool: str = "mean"
    layers: tuple[int, ...] | None = None
    norm: bool = True
    source: str = ""


def check_choice(objective: str, name: str, value: Any, allowed: tuple) -> None:
    """Raise ValueError naming ``objective.name``'s bad ``value`` and the allowed ones."""
    if value not in allowed:
        raise ValueError(f"{objective}.{name}: unknown value {value!r}; choose one of {', '.join(allowed)}")


def masked_columns(images: torch.Tensor, reconstruction: torch.Tensor, visible: torch.Tensor) -> dict:
    """A masked objective's picture: the image, the masked input, the reconstruction, and it with the
    visible pixels pasted back (``visible`` (B, 1, H, W), 1 = visible)."""
    return {"original": images, "masked": images * visible, "reconstruction": reconstruction,
            "reconstruction + visible": images * visible + reconstruction * (1 - visible)}


class Objective(nn.Module):
    name: ClassVar[str] = ""
    #: how probes read this objective's encoder by default (``mimaim probe --pool/--layers`` override)
    probe_protocol: ClassVar[ProbeProtocol] = ProbeProtocol()
    Options: ClassVar[type] = None  # a dataclass
    augmentation: ClassVar[Augmentation] = Augmentation()
    #: "vit" if only the ViT backbone works; ("vit", "swin") for objectives with a Swin path
    backbone_families: ClassVar[tuple[str, ...]] = ("vit",)
    #: backbone arguments it cannot train without, e.g. ``{"class_token": False}`` (checked by ``fit_trunk``)
    trunk_needs: ClassVar[dict] = {}
    #: augmented views per image: 1 -> ``images`` is (B, 3, H, W); k > 1 -> (B, k, 3, H, W), k draws of
    #: ``augmentation`` from the same image (two-view objectives such as data2vec/I-JEPA-style targets)
    num_views: ClassVar[int] = 1
    #: ``recipe: quick``: head options (``quick_options``) and epochs (``quick_epochs``, when
    #: ``--epochs`` is not given) sized so the built-in run takes minutes on a laptop CPU
    quick_options: ClassVar[dict] = {}
    quick_epochs: ClassVar[int | None] = None
    #: the lowest value the loss can take (NEPA's -cosine: -1): ``mimaim scale`` fits its power law to loss - floor
    loss_floor: ClassVar[float] = 0.0
    #: the whole run's optimiser steps, set by the trainer before the first step (schedules such as I-JEPA's EMA)
    total_steps: int | None = None

    def __init__(self, encoder: nn.Module, options):
        super().__init__()
        self.encoder = encoder
        self.options = options

    @classmethod
    def backbone_kwargs(cls, options) -> dict:
        return {}

    @classmethod
    def family_backbone_kwargs(cls, options, family: str) -> dict:
        """The flavour for a backbone of ``family`` ("vit", "swin"): ``backbone_kwargs`` unless an objective
        with several families (SimMIM) overrides it, since a ViT flavour means nothing to a Swin."""
        return cls.backbone_kwargs(options)

    def sample_masking(self, generator: torch.Generator) -> torch.Tensor | None:
        return None

    def forward(self, images: torch.Tensor, masking: torch.Tensor | None = None) -> ObjectiveOutput:
        raise NotImplementedError

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, masking: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def after_optimizer_step(self, step: int) -> None:
        """Called by the engine after every optimiser step (``step`` = steps taken so far), e.g. to move
        an EMA target encoder towards the online one (data2vec, I-JEPA). Default: nothing."""

    def draw_masking(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """A batch of ``sample_masking`` draws, (B, ...), for library use outside the loader."""
        draws = [self.sample_masking(generator) for _ in range(batch_size)]
        return None if draws[0] is None else torch.stack(draws)

    def masking_or_draw(self, images: torch.Tensor, masking: torch.Tensor | None) -> torch.Tensor | None:
        """``masking`` as the loader drew it, or fresh draws for ``images`` when called without."""
        return masking if masking is not None else self.draw_masking(images.shape[0]).to(images.device)

    def no_weight_decay(self) -> set[str]:
        """Parameter names kept out of weight decay besides 1-D ones: the encoder's own list by default."""
        return {f"encoder.{n}" for n in getattr(self.encoder, "no_weight_decay", lambda: set())()}


# --------------------------------------------------------------------------- registry
_OBJECTIVES: dict[str, type[Objective]] = {}
ENTRY_POINT_GROUP = "mimaim.objectives"
_plugins_loaded = False


def register_objective(cls: type[Objective]) -> type[Objective]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a name")
    _OBJECTIVES[cls.name] = cls
    return cls


def load_plugins() -> None:
    """Register objectives from other packages, once: the ``mimaim.objectives`` entry-point group
    (``[project.entry-points."mimaim.objectives"] name = "pkg.module:ClassName"``) and the modules
    listed in ``$MIMAIM_PLUGINS`` (comma-separated; importing them registers their objectives)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    import importlib
    import os
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except Exception as err:  # noqa: BLE001 - one broken plugin must not hide the others
            import warnings
            warnings.warn(f"objective plugin {ep.name!r} ({ep.value}) failed to load: {err}")
            continue
        if isinstance(cls, type) and issubclass(cls, Objective):
            if not cls.name:
                cls.name = ep.name
            register_objective(cls)
    for module in filter(None, (m.strip() for m in os.environ.get("MIMAIM_PLUGINS", "").split(","))):
        importlib.import_module(module)


def _import_objective(spec: str) -> type[Objective]:
    """``"package.module:ClassName"`` -> the class, imported and registered under its ``name``."""
    import importlib

    module_name, _, attr = spec.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"objective {spec!r}: cannot import {attr!r} from module {module_name!r} ({err}); "
                         "pass module.path:ClassName of an importable Objective subclass") from None
    if not (isinstance(cls, type) and issubclass(cls, Objective)):
        raise ValueError(f"objective {spec!r} is not a subclass of mimaim.objectives.Objective")
    if not cls.name:
        cls.name = attr.lower()
    return cls


def list_objectives() -> list[str]:
    load_plugins()
    return sorted(_OBJECTIVES)


def get_objective_class(name: str) -> type[Objective]:
    """An objective by registered name, or by ``module.path:ClassName`` (a one-file plugin)."""
    if name in _OBJECTIVES:
        return _OBJECTIVES[name]
    if ":" in name:
        return _import_objective(name)
    load_plugins()
    if name not in _OBJECTIVES:
        raise ValueError(f"objective: unknown value {name!r}; choose one of {', '.join(list_objectives())}, "
                         "or module.path:ClassName")
    return _OBJECTIVES[name]


def describe_objectives() -> str:
    """Every registered objective (plugins included) with its options and paper defaults."""
    lines = ["objectives and their options (paper defaults):"]
    for name in list_objectives():
        cls = get_objective_class(name)
        opts = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls.Options))
        lines.append(f"  {name}: {opts}")
        if cls.quick_options:
            lines.append(f"      recipe 'quick' uses: {cls.quick_options}")
        if cls.quick_epochs:
            lines.append(f"      recipe 'quick' trains {cls.quick_epochs} epochs unless --epochs is given")
    return "\n".join(lines)


def parse_options(cls: type[Objective], values: dict[str, Any] | None):
    """Build ``cls.Options`` from a dict, naming any unknown key and the allowed ones."""
    values = dict(values or {})
    allowed = {f.name: f for f in dataclasses.fields(cls.Options)}
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for objective {cls.name!r}; "
                         f"allowed: {', '.join(sorted(allowed))}")
    converted = {}
    for key, value in values.items():
        converted[key] = convert(value, getattr(cls.Options(), key), f"{cls.name}.{key}")
    options = cls.Options(**converted)
    validate = getattr(options, "validate", None)
    if validate is not None:
        validate()
    return options


def build_objective(name: str, model: str, img_size: int, patch_size: int, options: dict | None = None,
                    **backbone_overrides) -> Objective:
    """Objective + its backbone, e.g. ``build_objective('mae', 'vit_tiny', 32, 4)``."""
    from ..models import create_model, model_family

    cls = get_objective_class(name)
    opts = parse_options(cls, options)
    family = model_family(model)
    if family not in cls.backbone_families:
        raise ValueError(f"objective {name!r} works with {' or '.join(cls.backbone_families)} backbones, "
                         f"not {model!r} ({family}); choose another --model")
    kwargs = dict(img_size=img_size, patch_size=patch_size)
    kwargs.update(cls.family_backbone_kwargs(opts, family))
    kwargs.update(backbone_overrides)
    fit_trunk(cls, kwargs)
    encoder = create_model(model, **kwargs)
    return cls(encoder, opts)


def fit_trunk(cls: type[Objective], kwargs: dict) -> ProbeProtocol:
    """Where an objective meets its trunk (backbone arguments ``kwargs``): ValueError unless they hold its
    ``trunk_needs``; -> its probe protocol there, a cls pool read as the patch mean on a trunk without cls token."""
    for k, v in cls.trunk_needs.items():
        if kwargs.get(k) != v:
            raise ValueError(f"objective {cls.name!r} cannot use a trunk with {k}={kwargs.get(k)!r}: it needs {v!r}")
    proto = cls.probe_protocol
    if proto.pool == "cls" and kwargs.get("class_token") is False:
        proto = dataclasses.replace(proto, pool="mean", source=f"{proto.source}; pool mean: the trunk has no cls token")
    return proto
