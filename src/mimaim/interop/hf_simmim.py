"""SimMIM to and from HuggingFace ``ViTForMaskedImageModeling`` / ``SwinForMaskedImageModeling``: both are
SimMIM (a 1x1 conv to ``encoder_stride^2 x 3`` channels, a pixel shuffle, the masked L1 loss). Mapping as
docs/methods.md section 9: only ``vit_flavour="plain"`` maps for ViT; a Swin's patch merging moves from the start
of stage i (timm) to the end of stage i-1 (HF). ``encoder_stride``: ``patch_size`` for ViT, the total downsampling
for Swin; ``layer_norm_eps``: 1e-6 for ViT (HF's default 1e-12, set on export), 1e-5 for Swin on both sides.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..objectives import build_objective
from ..objectives.simmim import SimMIM
from . import keymap

__all__ = [
    "hf_config_from_simmim", "hf_state_dict_from_simmim", "simmim_from_hf", "simmim_state_dict_from_hf",
    "simmim_to_hf", "simmim_to_hf_model",
]

_SWIN_TOP = {
    "mask_token": "swin.embeddings.mask_token",
    **{f"encoder.patch_embed.{m}.{p}": f"swin.embeddings.{h}.{p}"
       for m, h in (("proj", "patch_embeddings.projection"), ("norm", "norm")) for p in ("weight", "bias")},
    **{f"encoder.norm.{p}": f"swin.layernorm.{p}" for p in ("weight", "bias")},
    **{f"encoder.layers.{{}}.downsample.{p}": f"swin.encoder.layers.{{}}.downsample.{p}"
       for p in ("reduction.weight", "norm.weight", "norm.bias")},  # stage numbers shifted apart
}
_HEAD = {"decoder.{}.weight": "decoder.{}.weight", "decoder.{}.bias": "decoder.{}.bias"}


def _names(swin: bool, layout: int) -> dict:
    if swin:
        blocks = {"encoder.layers.{}.blocks.{}.": "swin.encoder.layers.{}.blocks.{}."}
        return keymap.table({**_SWIN_TOP, **_HEAD}, blocks, layout, "swin")
    return {**keymap.vit_names("vit.", layout), "mask_token": "vit.embeddings.mask_token", **_HEAD}


def _shift_downsample(state: dict, by: int) -> dict:
    """timm's ``layers.i.downsample`` <-> HF's ``layers.{i - 1}.downsample`` (``by`` -1 or +1)."""
    return {re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) + by}.downsample", k): v
            for k, v in state.items()}


def _check_plain_vit(objective: SimMIM) -> None:
    enc = objective.encoder
    first = enc.blocks[0]
    if enc.rel_pos_bias is not None or not isinstance(first.ls1, torch.nn.Identity) or first.attn.q_bias is not None \
            or enc.pos_embed_kind != "learned" or enc.cls_token is None:
        raise ValueError(
            f"this SimMIM ViT has the {objective.options.vit_flavour!r} flavour (layer scale, relative position "
            "bias, q/v-only bias or no absolute positions), which HF ViTForMaskedImageModeling cannot hold; "
            "build it with --set objective.vit_flavour=plain (cls token, learned positions, biased q/k/v) to convert")


# --------------------------------------------------------------------------- ours -> HF
def hf_config_from_simmim(objective: SimMIM, **overrides):
    """The ``ViTConfig`` or ``SwinConfig`` that describes ``objective``."""
    from transformers import SwinConfig, ViTConfig

    enc = objective.encoder
    if enc.grid_size[0] != enc.grid_size[1]:
        raise ValueError(f"HF masked image modeling needs a square image; got grid {enc.grid_size}")
    if not objective.is_swin:
        _check_plain_vit(objective)
        return ViTConfig(**{**keymap.vit_config(enc), "qkv_bias": True, "encoder_stride": objective.stride,
                            **overrides})
    grids = [enc.grid_size[0] // 2 ** i for i in range(len(enc.depths))]
    if min(grids) < enc.window_size:
        raise ValueError(f"this Swin's last stages have {grids} tokens per side, fewer than its window "
                         f"{enc.window_size}: timm shrinks the window there, HF Swin keeps it, so the weights do "
                         f"not fit; train with a window of at most {min(grids)} (--set objective.window_size=...) or a "
                         f"larger --img-size ({enc.window_size * enc.output_stride} px) to convert to HF")
    first = enc.layers[0].blocks[0]
    cfg = dict(image_size=enc.img_size, patch_size=enc.patch_size, num_channels=enc.in_chans,
               embed_dim=enc.embed_dim, depths=list(enc.depths),
               num_heads=[s.blocks[0].attn.num_heads for s in enc.layers], window_size=enc.window_size,
               mlp_ratio=first.mlp.fc1.out_features / first.norm1.normalized_shape[0],
               qkv_bias=first.attn.qkv.bias is not None, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0, drop_path_rate=0.0, hidden_act="gelu",
               use_absolute_embeddings=False, layer_norm_eps=first.norm1.eps, encoder_stride=objective.stride)
    return SwinConfig(**{**cfg, **overrides})


def hf_state_dict_from_simmim(objective: SimMIM, new_layout: bool | None = None) -> dict[str, torch.Tensor]:
    """Our SimMIM state dict under HF's keys (``new_layout``: transformers >= 5 names; default: installed)."""
    if not objective.is_swin:
        _check_plain_vit(objective)
        return keymap.to_hf(objective.state_dict(), _names(False, keymap.installed(new_layout)))
    state = _shift_downsample(objective.state_dict(), -1)
    return keymap.to_hf(state, _names(True, keymap.installed(new_layout)))


def simmim_to_hf(objective: SimMIM) -> tuple[Any, dict[str, torch.Tensor]]:
    """-> (HF config, HF state dict) for ``ViTForMaskedImageModeling`` or ``SwinForMaskedImageModeling``."""
    return hf_config_from_simmim(objective), hf_state_dict_from_simmim(objective)


def simmim_to_hf_model(objective: SimMIM):
    """An HF ``*ForMaskedImageModeling`` holding ``objective``'s weights (strictly loaded), in eval mode."""
    from transformers import SwinForMaskedImageModeling, ViTForMaskedImageModeling

    config, state = simmim_to_hf(objective)
    cls = SwinForMaskedImageModeling if objective.is_swin else ViTForMaskedImageModeling
    return keymap.load_into(cls(config), state, f"{cls.__name__} does not fit").eval()


# --------------------------------------------------------------------------- HF -> ours
def simmim_state_dict_from_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An HF ``ViTForMaskedImageModeling`` / ``SwinForMaskedImageModeling`` state dict under our keys."""
    if not any(k.startswith("swin.") for k in state):
        return keymap.from_hf(state, _names(False, keymap.layout_of(state)))
    return _shift_downsample(keymap.from_hf(state, _names(True, keymap.layout_of(state))), +1)


def simmim_from_hf(model_or_state_dict, config, options: dict | None = None) -> SimMIM:
    """A SimMIM holding an HF model's weights (``config``: its ``ViTConfig`` / ``SwinConfig``); ``options``: SimMIM's
    (no HF model holds the mask); ``mask_patch_size`` defaults to 32 where it divides the image, else the stride."""
    state = model_or_state_dict if isinstance(model_or_state_dict, dict) else model_or_state_dict.state_dict()
    opts = dict(options or {})
    if config.model_type == "swin":
        stride = config.patch_size * 2 ** (len(config.depths) - 1)
        problems = []
        if config.encoder_stride != stride:
            problems.append(f"encoder_stride={config.encoder_stride} (SimMIM's head on this Swin needs the total "
                            f"downsampling {stride})")
        if config.use_absolute_embeddings:
            problems.append("use_absolute_embeddings=True (timm's Swin has none)")
        keymap.check_config(config, "SimMIM Swin", 1e-5, problems)
        opts.setdefault("window_size", config.window_size)
        backbone = dict(embed_dim=config.embed_dim, depths=tuple(config.depths), num_heads=tuple(config.num_heads),
                        mlp_ratio=config.mlp_ratio, qkv_bias=config.qkv_bias)
        model = "swin_tiny"
    else:
        stride = config.patch_size
        problems = []
        if config.encoder_stride != stride:
            problems.append(f"encoder_stride={config.encoder_stride} (SimMIM on ViT needs it equal to patch_size "
                            f"{stride}; HF requires the same when a mask is given)")
        if not config.qkv_bias:
            problems.append("qkv_bias=False (the plain SimMIM ViT biases q, k and v)")
        keymap.check_config(config, "SimMIM ViT", 1e-6, problems)
        opts["vit_flavour"] = "plain"
        backbone = dict(embed_dim=config.hidden_size, depth=config.num_hidden_layers,
                        num_heads=config.num_attention_heads,
                        mlp_ratio=config.intermediate_size / config.hidden_size)
        model = "vit_base"
    if "mask_patch_size" not in opts:
        opts["mask_patch_size"] = 32 if config.image_size % 32 == 0 and 32 % stride == 0 else stride
    objective = build_objective("simmim", model, config.image_size, config.patch_size, opts, **backbone)
    objective.load_state_dict(simmim_state_dict_from_hf(state), strict=True)
    return objective
