"""MAE to and from HuggingFace ``transformers``' ``ViTMAEForPreTraining``.

Users start from HF MAE checkpoints (``facebook/vit-mae-*``) and publish their own, so
the converter is public and works both ways:

* ``mae_to_hf(objective) -> (ViTMAEConfig, state_dict)`` and ``mae_to_hf_model``;
* ``mae_from_hf(model_or_state_dict, config) -> MAE`` objective;
* ``from_pretrained(local_dir)`` / ``save_pretrained(objective, dir)`` for checkpoint
  folders (``config.json`` + weights), read with HF's own loader.

The mapping is the one of HF's ``convert_vit_mae_to_pytorch.py`` (docs/methods.md section 9):
our fused ``attn.qkv`` is split into thirds in q, k, v order; ``norm1``/``norm2`` are
``layernorm_before``/``layernorm_after``; both frozen sin-cos tables travel with the
weights. HF renamed its keys in transformers 5 (``interop/hf_vit_names.py``); export writes the
layout of the installed version and import reads either.

Two settings of ``ViTMAEConfig`` differ from the MAE code and are set explicitly on
export: ``layer_norm_eps`` (HF default 1e-12, MAE 1e-6) and ``norm_pix_loss`` (HF default
False, MAE's released pre-training checkpoints True). On import a config with another
``layer_norm_eps`` is accepted with a warning: our LayerNorms keep MAE's 1e-6.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from ..objectives import build_objective
from ..objectives.mae import MAE
from . import hf_vit_names as names

__all__ = [
    "backbone_spec_from_hf", "from_pretrained", "hf_config_from_mae", "hf_state_dict_from_mae",
    "mae_from_hf", "mae_state_dict_from_hf", "mae_to_hf", "mae_to_hf_model", "save_pretrained",
]

_TOP = {  # ours -> HF, outside the blocks (same in both layouts)
    "encoder.cls_token": "vit.embeddings.cls_token",
    "encoder.pos_embed": "vit.embeddings.position_embeddings",
    "encoder.patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
    "encoder.patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
    "encoder.norm.weight": "vit.layernorm.weight",
    "encoder.norm.bias": "vit.layernorm.bias",
    "decoder_embed.weight": "decoder.decoder_embed.weight",
    "decoder_embed.bias": "decoder.decoder_embed.bias",
    "mask_token": "decoder.mask_token",
    "decoder_pos_embed": "decoder.decoder_pos_embed",
    "decoder_norm.weight": "decoder.decoder_norm.weight",
    "decoder_norm.bias": "decoder.decoder_norm.bias",
    "decoder_pred.weight": "decoder.decoder_pred.weight",
    "decoder_pred.bias": "decoder.decoder_pred.bias",
}


def _block_prefixes(layout: int) -> tuple[str, str]:
    return names.LAYERS[layout], "decoder.decoder_layers."


# --------------------------------------------------------------------------- ours -> HF
def hf_config_from_mae(objective: MAE, **overrides):
    """The ``ViTMAEConfig`` that describes ``objective`` (an MAE built by ``build_objective``)."""
    from transformers import ViTMAEConfig

    enc, opts = objective.encoder, objective.options
    first = enc.blocks[0]
    dec_first = objective.decoder_blocks[0] if len(objective.decoder_blocks) else None
    if enc.img_size != enc.grid_size[0] * enc.patch_size or enc.grid_size[0] != enc.grid_size[1]:
        raise ValueError(f"HF ViTMAE needs a square image; got grid {enc.grid_size}")
    if first.attn.q_bias is not None or first.attn.qkv.bias is None:
        raise ValueError("HF ViTMAE biases q, k and v alike; this encoder was built with "
                         "qkv_bias other than 'all' (MAE's flavour)")
    cfg = dict(
        hidden_size=enc.embed_dim,
        num_hidden_layers=enc.depth,
        num_attention_heads=enc.num_heads,
        intermediate_size=first.mlp.fc1.out_features,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=first.norm1.eps,
        image_size=enc.img_size,
        patch_size=enc.patch_size,
        num_channels=enc.in_chans,
        qkv_bias=True,
        decoder_hidden_size=opts.decoder_embed_dim,
        decoder_num_hidden_layers=opts.decoder_depth,
        decoder_num_attention_heads=opts.decoder_num_heads,
        decoder_intermediate_size=(dec_first.mlp.fc1.out_features if dec_first is not None
                                   else 4 * opts.decoder_embed_dim),
        mask_ratio=opts.mask_ratio,
        norm_pix_loss=opts.norm_pix_loss,
    )
    cfg.update(overrides)
    return ViTMAEConfig(**cfg)


def hf_state_dict_from_mae(objective: MAE, new_layout: bool | None = None) -> dict[str, torch.Tensor]:
    """Our MAE state dict renamed to ``ViTMAEForPreTraining``'s keys (qkv split into q, k, v).

    ``new_layout``: the transformers >= 5 key names; by default those of the installed version.
    """
    if new_layout is None:
        new_layout = names.new_layout()
    layout = names.NEW if new_layout else names.OLD
    block = names.block_names(layout)
    enc_prefix, dec_prefix = _block_prefixes(layout)
    out = {}
    for key, value in objective.state_dict().items():
        value = value.detach().clone()
        if key in _TOP:
            out[_TOP[key]] = value
            continue
        m = re.fullmatch(r"(encoder\.blocks|decoder_blocks)\.(\d+)\.(.+)\.(weight|bias)", key)
        if m is None:
            raise KeyError(f"no HF ViTMAE name for {key!r}")
        where, layer, name, kind = m.groups()
        prefix = (enc_prefix if where == "encoder.blocks" else dec_prefix) + f"{layer}."
        if name == "attn.qkv":
            names.split_qkv(value, names.QKV[layout], prefix, kind, out)
        elif name in block:
            out[f"{prefix}{block[name]}.{kind}"] = value
        else:
            raise KeyError(f"no HF ViTMAE name for {key!r}")
    return out


def mae_to_hf(objective: MAE, new_layout: bool | None = None):
    """-> (``ViTMAEConfig``, state dict) ready for ``ViTMAEForPreTraining(config).load_state_dict``."""
    return hf_config_from_mae(objective), hf_state_dict_from_mae(objective, new_layout)


def mae_to_hf_model(objective: MAE, attn_implementation: str | None = None):
    """A ``ViTMAEForPreTraining`` holding ``objective``'s weights, in eval mode."""
    from transformers import ViTMAEForPreTraining

    config, state = mae_to_hf(objective)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    model = ViTMAEForPreTraining(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def save_pretrained(objective: MAE, directory: str | Path) -> Path:
    """Write ``objective`` as an HF checkpoint folder (``config.json`` + ``model.safetensors``)."""
    model = mae_to_hf_model(objective)
    model.save_pretrained(str(directory))
    return Path(directory)


# --------------------------------------------------------------------------- HF -> ours
def _square(value: Any, what: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"{what} {tuple(value)} is not square; mimaim's MAE (like HF's patchify "
                             "and sin-cos init) needs a square image and patch")
        value = value[0]
    return int(value)


def _registered_shape(name: str) -> tuple[int, int, int] | None:
    """(width, depth, heads) a registered ViT name fixes, read from its registry builder."""
    import inspect

    from ..models import registry

    shape = inspect.getclosurevars(registry._MODELS[name]).nonlocals
    return (shape["embed_dim"], shape["depth"], shape["num_heads"]) if "embed_dim" in shape else None


def _registry_name(embed_dim: int, depth: int, num_heads: int) -> str | None:
    """The registered ViT name with this width/depth/heads, if any."""
    from ..models import list_models

    for name in list_models("vit"):
        if _registered_shape(name) == (embed_dim, depth, num_heads):
            return name
    return None


def backbone_spec_from_hf(config) -> dict[str, Any]:
    """What ``build_objective`` needs to match an HF ``ViTMAEConfig``.

    -> dict(model, img_size, patch_size, options, overrides): ``model`` is a registry
    name when the shape is a registered one (overrides then hold only what differs,
    e.g. ``in_chans``), else ``vit_base`` with ``embed_dim``/``depth``/``num_heads``/
    ``mlp_ratio`` overrides.
    """
    problems = []
    if config.hidden_act != "gelu":
        problems.append(f"hidden_act={config.hidden_act!r} (ours is exact GELU, 'gelu')")
    if not config.qkv_bias:
        problems.append("qkv_bias=False (MAE biases q, k and v)")
    if config.hidden_dropout_prob or config.attention_probs_dropout_prob:
        problems.append("dropout > 0 (MAE pre-training uses none)")
    if config.decoder_intermediate_size != 4 * config.decoder_hidden_size:
        problems.append(f"decoder_intermediate_size={config.decoder_intermediate_size} "
                        f"(ours is 4 x decoder_hidden_size = {4 * config.decoder_hidden_size})")
    if problems:
        raise ValueError("this ViTMAEConfig has no mimaim MAE equivalent: " + "; ".join(problems))
    if not math.isclose(config.layer_norm_eps, 1e-6):
        warnings.warn(f"ViTMAEConfig.layer_norm_eps is {config.layer_norm_eps:g}; mimaim keeps MAE's 1e-6 "
                      "(what the original weights were trained with), so outputs differ slightly from "
                      "HF's with this config", stacklevel=3)
    img_size = _square(config.image_size, "image_size")
    patch_size = _square(config.patch_size, "patch_size")
    D, depth, heads = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
    mlp_ratio = config.intermediate_size / D
    name = _registry_name(D, depth, heads) if mlp_ratio == 4.0 else None
    overrides: dict[str, Any] = {}
    if name is None:
        name = "vit_base"
        overrides.update(embed_dim=D, depth=depth, num_heads=heads, mlp_ratio=mlp_ratio)
    if config.num_channels != 3:
        overrides["in_chans"] = config.num_channels
    options = dict(mask_ratio=float(config.mask_ratio), decoder_embed_dim=config.decoder_hidden_size,
                   decoder_depth=config.decoder_num_hidden_layers,
                   decoder_num_heads=config.decoder_num_attention_heads,
                   norm_pix_loss=bool(config.norm_pix_loss))
    return dict(model=name, img_size=img_size, patch_size=patch_size, options=options, overrides=overrides)


def mae_state_dict_from_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ``ViTMAEForPreTraining`` keys (either layout) -> our MAE keys (q, k, v fused into qkv)."""
    inverse_top = {v: k for k, v in _TOP.items()}
    out: dict[str, torch.Tensor] = {}
    layout = names.layout_of(state_dict)
    qkv_names = names.QKV[layout]
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    block_inv = {hf: ours for ours, hf in names.block_names(layout).items()}
    for key, value in state_dict.items():
        if key in inverse_top:
            out[inverse_top[key]] = value
            continue
        m = re.fullmatch(r"(vit\.layers|vit\.encoder\.layer|decoder\.decoder_layers)\.(\d+)\.(.+)\.(weight|bias)",
                         key)
        if m is None:
            raise KeyError(f"unexpected key {key!r} in a ViTMAEForPreTraining state dict")
        where, layer, name, kind = m.groups()
        prefix = ("decoder_blocks." if where.startswith("decoder") else "encoder.blocks.") + f"{layer}."
        if name in qkv_names:
            qkv.setdefault((prefix, kind), {})[name] = value
        elif name in block_inv:
            out[f"{prefix}{block_inv[name]}.{kind}"] = value
        else:
            raise KeyError(f"unexpected key {key!r} in a ViTMAEForPreTraining state dict")
    for (prefix, kind), parts in qkv.items():
        out[f"{prefix}attn.qkv.{kind}"] = names.fuse_qkv(parts, qkv_names, f"{prefix}attn.qkv.{kind}")  # (3D, ...)
    return out


def mae_from_hf(model_or_state_dict, config=None) -> MAE:
    """Our MAE objective holding the weights of an HF ``ViTMAEForPreTraining``.

    Pass the HF model (its config is used), or a state dict plus its ``ViTMAEConfig``.
    """
    if isinstance(model_or_state_dict, dict):
        state_dict = model_or_state_dict
        if config is None:
            raise ValueError("mae_from_hf(state_dict) needs the ViTMAEConfig too: mae_from_hf(state_dict, config)")
    else:
        state_dict = model_or_state_dict.state_dict()
        config = config or model_or_state_dict.config
    spec = backbone_spec_from_hf(config)
    objective = build_objective("mae", spec["model"], spec["img_size"], spec["patch_size"], spec["options"],
                                **spec["overrides"])
    ours = mae_state_dict_from_hf(state_dict)
    expected = objective.state_dict()
    missing, unexpected = sorted(set(expected) - set(ours)), sorted(set(ours) - set(expected))
    wrong = sorted(k for k in set(expected) & set(ours) if expected[k].shape != ours[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(f"HF weights do not fit the MAE their config describes: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, other shape {wrong[:3]}")
    if not torch.any(ours["encoder.pos_embed"]):
        warnings.warn("the HF encoder position table is all zeros (a freshly built ViTMAEForPreTraining has "
                      "no sin-cos table until weights are loaded); keeping it as given", stacklevel=2)
    objective.load_state_dict({k: v.detach().to(expected[k].dtype) for k, v in ours.items()}, strict=True)
    return objective


def from_pretrained(path: str | Path) -> MAE:
    """Our MAE from a local HF checkpoint folder (``config.json`` + weights); no network."""
    from transformers import ViTMAEForPreTraining

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not an HF checkpoint folder (no config.json); "
                                "pass a directory written by save_pretrained / huggingface-cli download")
    model = ViTMAEForPreTraining.from_pretrained(str(path), local_files_only=True)
    return mae_from_hf(model)
