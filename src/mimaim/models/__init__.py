"""Backbones: the shared ViT, the timm Swin adapter, and a registry; both honour the contract in ``vit.py``,
so objectives and probes never care which one they hold."""

from .layers import Attention, Block, patchify, pixel_targets, sincos_2d, unpatchify
from .registry import create_model, list_models, model_family, register_model
from .vit import VisionTransformer
from . import swin  # noqa: F401,E402  (registers swin_tiny, swin_base)

__all__ = [
    "Attention", "Block", "VisionTransformer", "create_model", "list_models", "model_family",
    "patchify", "pixel_targets", "register_model", "sincos_2d", "unpatchify",
]
