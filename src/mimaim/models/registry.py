"""A registry of backbones in timm's vocabulary: ``create_model('vit_tiny', img_size=32, patch_size=4)``; a
name fixes the shape (width, depth, heads), the rest (sizes, an objective's flavour) is passed in."""

from __future__ import annotations

from typing import Callable

from torch import nn

from .vit import VisionTransformer

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_FAMILY: dict[str, str] = {}


def register_model(name: str, family: str = "vit"):
    """Decorator: ``@register_model('vit_tiny')`` on a function ``(**kwargs) -> nn.Module``."""
    def wrap(fn):
        _MODELS[name] = fn
        _FAMILY[name] = family
        return fn
    return wrap


def list_models(family: str | None = None) -> list[str]:
    return sorted(n for n in _MODELS if family is None or _FAMILY[n] == family)


def model_family(name: str) -> str:
    check_model_name(name)
    return _FAMILY[name]


def check_model_name(name: str) -> None:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")


def create_model(name: str, **kwargs) -> nn.Module:
    check_model_name(name)
    return _MODELS[name](**kwargs)


def _vit(embed_dim: int, depth: int, num_heads: int):
    def build(**kwargs):
        return VisionTransformer(**{"embed_dim": embed_dim, "depth": depth, "num_heads": num_heads, **kwargs})
    return build


# Shapes: width / depth / heads (docs/methods.md section 1). vit_micro is ours: a shape for
# scaling studies on CPU, below DeiT's Tiny.
register_model("vit_micro")(_vit(128, 6, 4))
register_model("vit_tiny")(_vit(192, 12, 3))
register_model("vit_small")(_vit(384, 12, 6))
register_model("vit_base")(_vit(768, 12, 12))
register_model("vit_large")(_vit(1024, 24, 16))
register_model("vit_huge")(_vit(1280, 32, 16))
# AIM-600M (ml-aim aim/v1/torch/models.py): width 1536, depth 24, 12 heads (head dim 128).
register_model("aim_600m")(_vit(1536, 24, 12))
