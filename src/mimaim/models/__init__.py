"""Backbones: the shared ViT, the timm Swin adapter, and a registry.

Every backbone honours one contract so that objectives and probes never care which
one they hold: attributes ``embed_dim``, ``num_patches``, ``grid_size``, ``patch_size``,
``num_prefix_tokens``, ``depth``, ``num_heads``; methods ``embed``, ``forward_tokens``,
``forward_features``, ``block_outputs`` (token maps of chosen blocks, for probes) and
``forward_intermediates`` (timm's contract; see ``vit.py``).
"""

from .layers import Attention, Block, normalized_pixel_targets, patchify, sincos_2d, unpatchify
from .registry import create_model, list_models, model_family, register_model
from .vit import VisionTransformer
from . import swin  # noqa: F401,E402  (registers swin_tiny, swin_base; timm Swin adapter)

__all__ = [
    "Attention", "Block", "VisionTransformer", "create_model", "list_models", "model_family",
    "normalized_pixel_targets", "patchify", "register_model", "sincos_2d", "unpatchify",
]
