"""The names HuggingFace ViT-family models (ViT, ViTMAE) give a transformer block, both layouts.

transformers 5 renamed the keys (``vit.encoder.layer.N.attention.attention.query`` became
``vit.layers.N.attention.q_proj``, ``intermediate.dense`` became ``mlp.fc1``, ...); export
writes the layout of the installed version (``new_layout()``), import reads either
(``layout_of(keys)``). Our fused ``attn.qkv`` is HF's q, k and v, split into thirds in that
order (docs/methods.md section 9).
"""

from __future__ import annotations

import functools

import torch

NEW, OLD = 0, 1  # index into the (transformers >= 5, transformers 4) pairs below

#: per-block names, ours -> HF (new, old)
BLOCK = {
    "norm1": ("layernorm_before", "layernorm_before"),
    "norm2": ("layernorm_after", "layernorm_after"),
    "attn.proj": ("attention.o_proj", "attention.output.dense"),
    "mlp.fc1": ("mlp.fc1", "intermediate.dense"),
    "mlp.fc2": ("mlp.fc2", "output.dense"),
}
#: q, k, v projections (new, old)
QKV = (("attention.q_proj", "attention.k_proj", "attention.v_proj"),
       ("attention.attention.query", "attention.attention.key", "attention.attention.value"))
#: where the encoder's blocks live under a ``vit.`` prefix (new, old)
LAYERS = ("vit.layers.", "vit.encoder.layer.")


@functools.lru_cache(maxsize=None)
def new_layout() -> bool:
    """True when the installed transformers writes the v5 key names (``attention.q_proj``)."""
    from transformers import ViTConfig, ViTModel

    tiny = ViTConfig(hidden_size=4, num_hidden_layers=1, num_attention_heads=1, intermediate_size=4,
                     image_size=2, patch_size=1, num_channels=1)
    return any(".q_proj." in k for k in ViTModel(tiny, add_pooling_layer=False).state_dict())


def layout_of(keys) -> int:
    """``NEW`` if the HF state-dict ``keys`` use the v5 names, else ``OLD``."""
    return NEW if any(".q_proj." in k for k in keys) else OLD


def block_names(layout: int) -> dict[str, str]:
    return {ours: pair[layout] for ours, pair in BLOCK.items()}


def split_qkv(value: torch.Tensor, qkv_names: tuple[str, str, str], prefix: str, suffix: str, out: dict) -> None:
    """Our fused ``qkv`` (3D, ...) -> HF's ``{prefix}{q,k,v name}.{suffix}`` entries of ``out``."""
    for name, part in zip(qkv_names, value.chunk(3, dim=0)):
        out[f"{prefix}{name}.{suffix}"] = part.clone()


def fuse_qkv(parts: dict[str, torch.Tensor], qkv_names: tuple[str, str, str], where: str) -> torch.Tensor:
    """HF's q, k, v tensors (keyed by their names) -> our fused (3D, ...) ``qkv``."""
    missing = [n for n in qkv_names if n not in parts]
    if missing:
        raise KeyError(f"{where}: HF state dict lacks {', '.join(missing)}")
    return torch.cat([parts[n] for n in qkv_names], dim=0)
