"""The one key mapping between our ViT-family objectives and HuggingFace's (ViTMAE, ViT, BEiT, Swin): a table of
key templates, ours -> HF, ``{}`` a block (or stage) number; a tuple target is our fused ``attn.qkv`` split into
q, k, v (docs/methods.md section 9). ``to_hf`` renames with a table, ``from_hf`` inverts it. transformers 5
renamed the block keys (``attention.attention.query`` -> ``attention.q_proj``, ...): export writes the installed
version's layout (``new_layout()``), import reads either (``layout_of``).
"""

from __future__ import annotations

import functools
import math
import re
import warnings

import torch

NEW, OLD = 0, 1  # transformers >= 5, transformers 4
_NUMBER = re.compile(r"(?<=\.)\d+(?=\.)")  # a block or stage number inside a key
_REBUILT = ("relative_position_index", "attn_mask")  # buffers each side rebuilds itself


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


def installed(new: bool | None) -> int:
    """The layout to write: v5 names if ``new`` (default: those of the installed transformers)."""
    return NEW if (new_layout() if new is None else new) else OLD


def block_names(layout: int, flavour: str = "vit") -> dict[str, str | tuple[str, str, str]]:
    """Names inside one block, ours -> HF. ``flavour``: "vit" (ViT, ViTMAE), "beit" (q/v-only bias,
    layer scale) or "swin" (its own bias table; transformers 4 calls its attention ``self``)."""
    if layout == NEW:
        q, k, v, o = (f"attention.{n}_proj" for n in "qkvo")
        fc1, fc2 = "mlp.fc1", "mlp.fc2"
        bias_table = "attention.relative_position_bias.relative_position_bias_table"
    else:
        inner = "self" if flavour == "swin" else "attention"
        q, k, v = (f"attention.{inner}.{n}" for n in ("query", "key", "value"))
        o, fc1, fc2 = "attention.output.dense", "intermediate.dense", "output.dense"
        bias_table = "attention.self.relative_position_bias_table"
    modules = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": o, "mlp.fc1": fc1,
               "mlp.fc2": fc2}
    names: dict = {f"{ours}.{p}": f"{hf}.{p}" for ours, hf in modules.items() for p in ("weight", "bias")}
    names["attn.qkv.weight"] = (f"{q}.weight", f"{k}.weight", f"{v}.weight")
    if flavour == "beit":  # BEiT's key has no bias
        names.update({"attn.q_bias": f"{q}.bias", "attn.v_bias": f"{v}.bias", "ls1.gamma": "lambda_1",
                      "ls2.gamma": "lambda_2"})
    else:
        names["attn.qkv.bias"] = (f"{q}.bias", f"{k}.bias", f"{v}.bias")
    if flavour == "swin":
        names["attn.relative_position_bias_table"] = bias_table
    return names


def table(top: dict[str, str], blocks: dict[str, str], layout: int, flavour: str = "vit") -> dict:
    """``top`` (exact names) plus every block name under each ``blocks`` prefix (ours -> HF)."""
    out = dict(top)
    for ours, hf in blocks.items():
        for name, theirs in block_names(layout, flavour).items():
            out[ours + name] = tuple(hf + t for t in theirs) if isinstance(theirs, tuple) else hf + theirs
    return out


def vit_names(base: str, layout: int, flavour: str = "vit", norm: str = "") -> dict:
    """Our ViT encoder (``encoder.*``) under an HF ViT-family model whose encoder sits at ``base``
    ("vit.", "beit.", or "" in a base model); ``norm``: its final LayerNorm, if not ``{base}layernorm``."""
    emb, norm = f"{base}embeddings.", norm or f"{base}layernorm"
    top = {"encoder.cls_token": f"{emb}cls_token", "encoder.pos_embed": f"{emb}position_embeddings",
           **{f"encoder.patch_embed.proj.{p}": f"{emb}patch_embeddings.projection.{p}" for p in ("weight", "bias")},
           **{f"encoder.norm.{p}": f"{norm}.{p}" for p in ("weight", "bias")}}
    blocks = f"{base}layers.{{}}." if layout == NEW else f"{base}encoder.layer.{{}}."
    return table(top, {"encoder.blocks.{}.": blocks}, layout, flavour)


def to_hf(state: dict[str, torch.Tensor], names: dict) -> dict[str, torch.Tensor]:
    """Our state dict under HF's keys (``names``: a ``table``)."""
    out = {}
    for key, value in state.items():
        if key.endswith(_REBUILT):
            continue
        target = names.get(_NUMBER.sub("{}", key))
        if target is None:
            raise KeyError(f"no HF name for {key!r}")
        numbers = _NUMBER.findall(key)
        if isinstance(target, tuple):  # (3D, ...) -> q, k, v
            for name, part in zip(target, value.chunk(3)):
                out[name.format(*numbers)] = part.detach().clone()
        else:
            out[target.format(*numbers)] = value.detach().clone()
    return out


def from_hf(state: dict[str, torch.Tensor], names: dict) -> dict[str, torch.Tensor]:
    """An HF state dict under our keys (``names``: the ``table`` of its layout); q, k, v fused."""
    inverse = {}
    for ours, theirs in names.items():
        for i, name in enumerate(theirs if isinstance(theirs, tuple) else (theirs,)):
            inverse[name] = (ours, i)
    out, thirds = {}, {}
    for key, value in state.items():
        if key.endswith(_REBUILT):
            continue
        template = _NUMBER.sub("{}", key)
        if template not in inverse:
            raise KeyError(f"unexpected HF key {key!r}")
        ours, i = inverse[template]
        if isinstance(names[ours], tuple):
            thirds.setdefault(ours.format(*_NUMBER.findall(key)), {})[i] = value
        else:
            out[ours.format(*_NUMBER.findall(key))] = value
    for key, parts in thirds.items():
        if len(parts) != 3:
            raise KeyError(f"{key}: the HF state dict lacks one of its q, k and v")
        out[key] = torch.cat([parts[0], parts[1], parts[2]], dim=0)  # (3D, ...)
    return out


def load_into(model, state: dict[str, torch.Tensor], what: str):
    """Load ``state`` into ``model``: every tensor, none left over (index buffers aside), shapes alike."""
    buffers = {k for k, _ in model.named_buffers()}
    theirs = model.state_dict()
    missing = sorted(k for k in set(theirs) - set(state) if k not in buffers)
    unexpected = sorted(set(state) - set(theirs))
    wrong = sorted(k for k in set(state) & set(theirs) if state[k].shape != theirs[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(f"{what}: missing {missing[:3]}, unexpected {unexpected[:3]}, other shape {wrong[:3]}")
    model.load_state_dict(state, strict=False)
    return model


def vit_config(enc) -> dict:
    """The fields every HF ViT-family config shares, for our ViT ``enc`` (exact GELU, no dropout)."""
    first = enc.blocks[0]
    return dict(hidden_size=enc.embed_dim, num_hidden_layers=enc.depth, num_attention_heads=enc.num_heads,
                intermediate_size=first.mlp.fc1.out_features, hidden_act="gelu", hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0, layer_norm_eps=first.norm1.eps, image_size=enc.img_size,
                patch_size=enc.patch_size, num_channels=enc.in_chans)


def check_config(config, what: str, eps: float, problems: list[str] = ()) -> None:
    """Refuse an HF ``config`` with settings we have no counterpart for; warn on another LayerNorm eps."""
    problems = list(problems)
    if config.hidden_act != "gelu":
        problems.insert(0, f"hidden_act={config.hidden_act!r} (ours is exact GELU, 'gelu')")
    if problems:
        raise ValueError(f"this {type(config).__name__} has no mimaim {what} equivalent: " + "; ".join(problems))
    if not math.isclose(config.layer_norm_eps, eps):
        warnings.warn(f"{type(config).__name__}.layer_norm_eps is {config.layer_norm_eps:g}; mimaim keeps {eps:g} "
                      "(what the original weights were trained with), so outputs differ slightly from HF's",
                      stacklevel=3)
