"""SimMIM to and from HuggingFace ``transformers``' ``ViTForMaskedImageModeling`` and
``SwinForMaskedImageModeling``.

Both HF classes are SimMIM (same head: 1x1 conv to ``encoder_stride^2 x 3`` channels and a
pixel shuffle; same masked L1 loss with the mask upsampled from token resolution,
``sum / (#masked px + 1e-5) / channels``). Public functions, both ways:

* ``simmim_to_hf(objective) -> (config, state_dict)`` and ``simmim_to_hf_model(objective)``;
* ``hf_config_from_simmim(objective)``, ``hf_state_dict_from_simmim(objective)``;
* ``simmim_from_hf(model_or_state_dict, config, options=None) -> SimMIM`` objective.

Mapping (docs/methods.md section 9):

* ViT: our fused ``attn.qkv`` is split into thirds (q, k, v); ``norm1``/``norm2`` are
  ``layernorm_before``/``layernorm_after``; the mask token is ``vit.embeddings.mask_token``;
  our ``decoder.0`` is theirs. Only ``vit_flavour="plain"`` maps: HF's ViT has learned
  absolute positions and biased q/k/v, but no layer scale or relative position bias, so
  the official (BEiT-style) SimMIM ViT has no HF counterpart.
* Swin: timm's names to HF's; timm puts each patch merging at the *start* of stage i
  (``layers.i.downsample``), HF at the *end* of stage i-1 (``layers.{i-1}.downsample``).

HF renamed its keys in transformers 5 (``attention.attention.query`` became
``attention.q_proj``, ``intermediate.dense`` became ``mlp.fc1``, ...); export writes the
layout of the installed version, import reads either.

``layer_norm_eps``: HF's ViT default is 1e-12, ours (and SimMIM's) 1e-6; export sets it.
Swin uses 1e-5 on both sides. HF requires ``encoder_stride == patch_size`` for ViT when a
mask is given; for Swin the stride is ``patch_size x 2^(stages - 1)``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..objectives import build_objective
from ..objectives.simmim import SimMIM
from . import hf_vit_names as names

__all__ = [
    "hf_config_from_simmim", "hf_state_dict_from_simmim", "simmim_from_hf", "simmim_state_dict_from_hf",
    "simmim_to_hf", "simmim_to_hf_model",
]

_VIT_TOP = {
    "encoder.cls_token": "vit.embeddings.cls_token",
    "mask_token": "vit.embeddings.mask_token",
    "encoder.pos_embed": "vit.embeddings.position_embeddings",
    "encoder.patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
    "encoder.patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
    "encoder.norm.weight": "vit.layernorm.weight",
    "encoder.norm.bias": "vit.layernorm.bias",
    "decoder.0.weight": "decoder.0.weight",
    "decoder.0.bias": "decoder.0.bias",
}

_SWIN_BLOCK = {  # ours -> HF (transformers >= 5, transformers 4): ViT's names plus the bias table
    **names.BLOCK,
    "attn.relative_position_bias_table": ("attention.relative_position_bias.relative_position_bias_table",
                                          "attention.self.relative_position_bias_table"),
}
_SWIN_QKV = (("attention.q_proj", "attention.k_proj", "attention.v_proj"),
             ("attention.self.query", "attention.self.key", "attention.self.value"))
_SWIN_TOP = {
    "mask_token": "swin.embeddings.mask_token",
    "encoder.patch_embed.proj.weight": "swin.embeddings.patch_embeddings.projection.weight",
    "encoder.patch_embed.proj.bias": "swin.embeddings.patch_embeddings.projection.bias",
    "encoder.patch_embed.norm.weight": "swin.embeddings.norm.weight",
    "encoder.patch_embed.norm.bias": "swin.embeddings.norm.bias",
    "encoder.norm.weight": "swin.layernorm.weight",
    "encoder.norm.bias": "swin.layernorm.bias",
    "decoder.0.weight": "decoder.0.weight",
    "decoder.0.bias": "decoder.0.bias",
}


def _is_swin(objective: SimMIM) -> bool:
    return objective.is_swin


def _check_plain_vit(objective: SimMIM) -> None:
    enc = objective.encoder
    first = enc.blocks[0]
    if enc.rel_pos_bias is not None or not isinstance(first.ls1, torch.nn.Identity) or first.attn.q_bias is not None \
            or enc.pos_embed_kind != "learned" or enc.cls_token is None:
        raise ValueError(
            f"this SimMIM ViT has the {objective.options.vit_flavour!r} flavour (layer scale, relative position "
            "bias, q/v-only bias or no absolute positions), which HF ViTForMaskedImageModeling cannot hold; "
            "build it with --opt vit_flavour=plain (cls token, learned positions, biased q/k/v) to convert")


# --------------------------------------------------------------------------- ours -> HF
def hf_config_from_simmim(objective: SimMIM, **overrides):
    """The ``ViTConfig`` or ``SwinConfig`` that describes ``objective``."""
    enc = objective.encoder
    if enc.grid_size[0] != enc.grid_size[1]:
        raise ValueError(f"HF masked image modeling needs a square image; got grid {enc.grid_size}")
    if _is_swin(objective):
        from transformers import SwinConfig

        grids = [enc.grid_size[0] // 2 ** i for i in range(len(enc.depths))]
        if min(grids) < enc.window_size:
            raise ValueError(f"this Swin's last stages have {grids} tokens per side, fewer than its window "
                             f"{enc.window_size}: timm shrinks the window there, HF Swin keeps it, so the weights do "
                             f"not fit; train with a window of at most {min(grids)} (--opt window_size=...) or a "
                             f"larger --img-size ({enc.window_size * enc.output_stride} px) to convert to HF")
        first = enc.layers[0].blocks[0]
        cfg = dict(image_size=enc.img_size, patch_size=enc.patch_size, num_channels=enc.in_chans,
                   embed_dim=enc.embed_dim, depths=list(enc.depths),
                   num_heads=[s.blocks[0].attn.num_heads for s in enc.layers], window_size=enc.window_size,
                   mlp_ratio=first.mlp.fc1.out_features / first.norm1.normalized_shape[0],
                   qkv_bias=first.attn.qkv.bias is not None, hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0, drop_path_rate=0.0, hidden_act="gelu",
                   use_absolute_embeddings=False, layer_norm_eps=first.norm1.eps, encoder_stride=objective.stride)
        cfg.update(overrides)
        return SwinConfig(**cfg)
    from transformers import ViTConfig

    _check_plain_vit(objective)
    first = enc.blocks[0]
    cfg = dict(hidden_size=enc.embed_dim, num_hidden_layers=enc.depth, num_attention_heads=enc.num_heads,
               intermediate_size=first.mlp.fc1.out_features, hidden_act="gelu", hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0, layer_norm_eps=first.norm1.eps, image_size=enc.img_size,
               patch_size=enc.patch_size, num_channels=enc.in_chans, qkv_bias=True, encoder_stride=objective.stride)
    cfg.update(overrides)
    return ViTConfig(**cfg)


def hf_state_dict_from_simmim(objective: SimMIM, new_layout: bool | None = None) -> dict[str, torch.Tensor]:
    """Our SimMIM state dict under HF's keys (``new_layout``: transformers >= 5 names; default: installed)."""
    if new_layout is None:
        new_layout = names.new_layout()
    v = 0 if new_layout else 1
    swin = _is_swin(objective)
    if not swin:
        _check_plain_vit(objective)
    top, block, qkv = (_SWIN_TOP, _SWIN_BLOCK, _SWIN_QKV[v]) if swin else (_VIT_TOP, names.BLOCK, names.QKV[v])
    out: dict[str, torch.Tensor] = {}
    for key, value in objective.state_dict().items():
        value = value.detach().clone()
        if key in top:
            out[top[key]] = value
            continue
        parts = key.split(".")
        if swin and parts[1] == "layers" and parts[3] == "downsample":  # encoder.layers.i.downsample.*
            out[f"swin.encoder.layers.{int(parts[2]) - 1}.downsample.{'.'.join(parts[4:])}"] = value
            continue
        if swin and parts[1] == "layers" and parts[3] == "blocks":  # encoder.layers.i.blocks.j.*
            prefix = f"swin.encoder.layers.{parts[2]}.blocks.{parts[4]}."
            rest = ".".join(parts[5:])
        elif not swin and parts[1] == "blocks":  # encoder.blocks.n.*
            prefix = f"{names.LAYERS[v]}{parts[2]}."
            rest = ".".join(parts[3:])
        else:
            raise KeyError(f"no HF name for {key!r}")
        name, suffix = rest.rsplit(".", 1)
        if name == "attn.qkv":
            names.split_qkv(value, qkv, prefix, suffix, out)
        elif name in block:
            out[f"{prefix}{block[name][v]}.{suffix}"] = value
        elif rest in block:  # a parameter without a weight/bias suffix (the bias table)
            out[f"{prefix}{block[rest][v]}"] = value
        else:
            raise KeyError(f"no HF name for {key!r}")
    return out


def simmim_to_hf(objective: SimMIM) -> tuple[Any, dict[str, torch.Tensor]]:
    """-> (HF config, HF state dict) for ``ViTForMaskedImageModeling`` or ``SwinForMaskedImageModeling``."""
    return hf_config_from_simmim(objective), hf_state_dict_from_simmim(objective)


def simmim_to_hf_model(objective: SimMIM):
    """An HF ``*ForMaskedImageModeling`` holding ``objective``'s weights (strictly loaded), in eval mode."""
    from transformers import SwinForMaskedImageModeling, ViTForMaskedImageModeling

    config, state = simmim_to_hf(objective)
    cls = SwinForMaskedImageModeling if _is_swin(objective) else ViTForMaskedImageModeling
    model = cls(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


# --------------------------------------------------------------------------- HF -> ours
def _invert(state: dict[str, torch.Tensor], swin: bool, num_stages: int = 0) -> dict[str, torch.Tensor]:
    v = names.layout_of(state)
    top, block, qkv = (_SWIN_TOP, _SWIN_BLOCK, _SWIN_QKV[v]) if swin else (_VIT_TOP, names.BLOCK, names.QKV[v])
    top_inv = {h: o for o, h in top.items()}
    block_inv = {h[v]: o for o, h in block.items()}
    out: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key in top_inv:
            out[top_inv[key]] = value
            continue
        if swin:
            parts = key.split(".")
            if parts[:3] != ["swin", "encoder", "layers"]:
                raise KeyError(f"unexpected HF key {key!r}")
            stage = int(parts[3])
            if parts[4] == "downsample":
                out[f"encoder.layers.{stage + 1}.downsample.{'.'.join(parts[5:])}"] = value
                continue
            ours_prefix, rest = f"encoder.layers.{stage}.blocks.{parts[5]}.", ".".join(parts[6:])
        else:
            prefix = names.LAYERS[v]
            if not key.startswith(prefix):
                raise KeyError(f"unexpected HF key {key!r}")
            n, rest = key[len(prefix):].split(".", 1)
            ours_prefix = f"encoder.blocks.{n}."
        if rest in block_inv:  # the bias table
            out[ours_prefix + block_inv[rest]] = value
            continue
        name, suffix = rest.rsplit(".", 1)
        if name in qkv:
            pending.setdefault(f"{ours_prefix}attn.qkv.{suffix}", {})[name] = value
        elif name in block_inv:
            out[f"{ours_prefix}{block_inv[name]}.{suffix}"] = value
        else:
            raise KeyError(f"unexpected HF key {key!r}")
    for key, parts in pending.items():
        out[key] = names.fuse_qkv(parts, qkv, key)
    return out


def simmim_state_dict_from_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An HF ``ViTForMaskedImageModeling`` / ``SwinForMaskedImageModeling`` state dict under our keys."""
    state = {k: v for k, v in state.items() if not k.endswith(("relative_position_index", "attn_mask"))}
    swin = any(k.startswith("swin.") for k in state)
    return _invert(state, swin)


def simmim_from_hf(model_or_state_dict, config, options: dict | None = None) -> SimMIM:
    """A SimMIM objective holding an HF model's weights.

    ``config``: the HF ``ViTConfig`` / ``SwinConfig``. ``options``: SimMIM options to use
    (the mask is not part of an HF model); ``mask_patch_size`` defaults to 32 when it
    divides the image, else the model's output stride.
    """
    state = model_or_state_dict if isinstance(model_or_state_dict, dict) else model_or_state_dict.state_dict()
    swin = config.model_type == "swin"
    opts = dict(options or {})
    if config.hidden_act != "gelu":
        raise ValueError(f"HF config uses hidden_act {config.hidden_act!r}; mimaim's blocks use exact GELU")
    if swin:
        stride = config.patch_size * 2 ** (len(config.depths) - 1)
        if config.encoder_stride != stride:
            raise ValueError(f"SwinConfig.encoder_stride is {config.encoder_stride}, but SimMIM's head on this Swin "
                             f"needs the total downsampling {stride}")
        if config.use_absolute_embeddings:
            raise ValueError("SwinConfig.use_absolute_embeddings=True has no counterpart in timm's Swin; "
                             "only configs without absolute embeddings convert")
        if abs(config.layer_norm_eps - 1e-5) > 1e-12:
            warnings.warn(f"HF Swin layer_norm_eps {config.layer_norm_eps} differs from timm's 1e-5; "
                          "outputs will differ slightly")
        opts.setdefault("window_size", config.window_size)
        backbone = dict(embed_dim=config.embed_dim, depths=tuple(config.depths), num_heads=tuple(config.num_heads),
                        mlp_ratio=config.mlp_ratio, qkv_bias=config.qkv_bias)
        model = "swin_tiny"
    else:
        stride = config.patch_size
        if config.encoder_stride != stride:
            raise ValueError(f"ViTConfig.encoder_stride is {config.encoder_stride}, but SimMIM on ViT needs it equal "
                             f"to patch_size {config.patch_size} (HF requires the same when a mask is given)")
        if not config.qkv_bias:
            raise ValueError("ViTConfig.qkv_bias=False has no counterpart in the plain SimMIM ViT (biased q, k, v)")
        if abs(config.layer_norm_eps - 1e-6) > 1e-12:
            warnings.warn(f"HF ViT layer_norm_eps {config.layer_norm_eps} differs from SimMIM's 1e-6, which "
                          "mimaim's LayerNorms keep; outputs will differ slightly")
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
