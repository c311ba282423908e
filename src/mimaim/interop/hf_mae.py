"""MAE to and from HuggingFace ``transformers``' ``ViTMAEForPreTraining`` (``mae_to_hf``, ``save_pretrained``;
``mae_from_hf``, ``from_pretrained``), with HF's ``convert_vit_mae_to_pytorch.py`` mapping (docs/methods.md
section 9). Export sets the ``ViTMAEConfig`` values whose defaults differ from MAE's: ``layer_norm_eps`` 1e-6
(HF: 1e-12) and ``norm_pix_loss``; import accepts another eps with a warning (our LayerNorms keep 1e-6).
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import Any

import torch

from ..models import list_models, registry
from ..objectives import build_objective
from ..objectives.mae import MAE
from . import keymap

__all__ = [
    "backbone_spec_from_hf", "from_pretrained", "hf_config_from_mae", "hf_state_dict_from_mae",
    "mae_from_hf", "mae_state_dict_from_hf", "mae_to_hf", "mae_to_hf_model", "save_pretrained",
]

_DECODER = {  # ours -> HF, outside the blocks
    "mask_token": "decoder.mask_token",
    "decoder_pos_embed": "decoder.decoder_pos_embed",
    **{f"decoder_{m}.{p}": f"decoder.decoder_{m}.{p}" for m in ("embed", "norm", "pred") for p in ("weight", "bias")},
}


def _names(layout: int) -> dict:
    decoder = keymap.table(_DECODER, {"decoder_blocks.{}.": "decoder.decoder_layers.{}."}, layout)
    return {**keymap.vit_names("vit.", layout), **decoder}


# --------------------------------------------------------------------------- ours -> HF
def hf_config_from_mae(objective: MAE, **overrides):
    """The ``ViTMAEConfig`` that describes ``objective`` (an MAE built by ``build_objective``)."""
    from transformers import ViTMAEConfig

    enc, opts = objective.encoder, objective.options
    if enc.img_size != enc.grid_size[0] * enc.patch_size or enc.grid_size[0] != enc.grid_size[1]:
        raise ValueError(f"HF ViTMAE needs a square image; got grid {enc.grid_size}")
    if enc.blocks[0].attn.q_bias is not None or enc.blocks[0].attn.qkv.bias is None:
        raise ValueError("HF ViTMAE biases q, k and v alike; this encoder was built with "
                         "qkv_bias other than 'all' (MAE's flavour)")
    decoder = objective.decoder_blocks
    cfg = dict(keymap.vit_config(enc), qkv_bias=True, decoder_hidden_size=opts.decoder_embed_dim,
               decoder_num_hidden_layers=opts.decoder_depth, decoder_num_attention_heads=opts.decoder_num_heads,
               decoder_intermediate_size=(decoder[0].mlp.fc1.out_features if len(decoder)
                                          else 4 * opts.decoder_embed_dim),
               mask_ratio=opts.mask_ratio, norm_pix_loss=opts.norm_pix_loss)
    return ViTMAEConfig(**{**cfg, **overrides})


def hf_state_dict_from_mae(objective: MAE, new_layout: bool | None = None) -> dict[str, torch.Tensor]:
    """Our MAE state dict under ``ViTMAEForPreTraining``'s keys (``new_layout``: transformers >= 5 names; default:
    those of the installed version)."""
    return keymap.to_hf(objective.state_dict(), _names(keymap.installed(new_layout)))


def mae_to_hf(objective: MAE, new_layout: bool | None = None):
    """-> (``ViTMAEConfig``, state dict) ready for ``ViTMAEForPreTraining(config).load_state_dict``."""
    return hf_config_from_mae(objective), hf_state_dict_from_mae(objective, new_layout)


def mae_to_hf_model(objective: MAE, attn_implementation: str | None = None):
    """A ``ViTMAEForPreTraining`` holding ``objective``'s weights, in eval mode."""
    from transformers import ViTMAEForPreTraining

    config, state = mae_to_hf(objective)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    return keymap.load_into(ViTMAEForPreTraining(config), state, "ViTMAEForPreTraining does not fit").eval()


def save_pretrained(objective: MAE, directory: str | Path) -> Path:
    """Write ``objective`` as an HF checkpoint folder (``config.json`` + ``model.safetensors``)."""
    mae_to_hf_model(objective).save_pretrained(str(directory))
    return Path(directory)


# --------------------------------------------------------------------------- HF -> ours
def _square(value: Any, what: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"{what} {tuple(value)} is not square; mimaim's MAE (like HF's patchify "
                             "and sin-cos init) needs a square image and patch")
        value = value[0]
    return int(value)


def _registry_name(embed_dim: int, depth: int, num_heads: int) -> str | None:
    """The registered ViT name with this width/depth/heads (read from its registry builder), if any."""
    for name in list_models("vit"):
        shape = inspect.getclosurevars(registry._MODELS[name]).nonlocals
        if (shape.get("embed_dim"), shape.get("depth"), shape.get("num_heads")) == (embed_dim, depth, num_heads):
            return name
    return None


def backbone_spec_from_hf(config) -> dict[str, Any]:
    """What ``build_objective`` needs to match an HF ``ViTMAEConfig``: dict(model, img_size, patch_size, options,
    overrides), ``model`` a registered shape's name, else ``vit_base`` with the shape as overrides."""
    problems = []
    if not config.qkv_bias:
        problems.append("qkv_bias=False (MAE biases q, k and v)")
    if config.hidden_dropout_prob or config.attention_probs_dropout_prob:
        problems.append("dropout > 0 (MAE pre-training uses none)")
    if config.decoder_intermediate_size != 4 * config.decoder_hidden_size:
        problems.append(f"decoder_intermediate_size={config.decoder_intermediate_size} "
                        f"(ours is 4 x decoder_hidden_size = {4 * config.decoder_hidden_size})")
    keymap.check_config(config, "MAE", 1e-6, problems)
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
    return dict(model=name, img_size=_square(config.image_size, "image_size"),
                patch_size=_square(config.patch_size, "patch_size"), options=options, overrides=overrides)


def mae_state_dict_from_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ``ViTMAEForPreTraining`` keys (either layout) -> our MAE keys (q, k, v fused into qkv)."""
    return keymap.from_hf(state_dict, _names(keymap.layout_of(state_dict)))


def mae_from_hf(model_or_state_dict, config=None) -> MAE:
    """Our MAE holding the weights of an HF ``ViTMAEForPreTraining`` (or of a state dict, given its config)."""
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
    if not torch.any(ours["encoder.pos_embed"]):
        warnings.warn("the HF encoder position table is all zeros (a freshly built ViTMAEForPreTraining has "
                      "no sin-cos table until weights are loaded); keeping it as given", stacklevel=2)
    return keymap.load_into(objective, ours, "HF weights do not fit the MAE their config describes")


def from_pretrained(path: str | Path) -> MAE:
    """Our MAE from a local HF checkpoint folder (``config.json`` + weights); no network."""
    from transformers import ViTMAEForPreTraining

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not an HF checkpoint folder (no config.json); "
                                "pass a directory written by save_pretrained / huggingface-cli download")
    model = ViTMAEForPreTraining.from_pretrained(str(path), local_files_only=True)
    return mae_from_hf(model)
