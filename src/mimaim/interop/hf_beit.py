"""Our BEiT objective <-> HuggingFace ``BeitForMaskedImageModeling``, both ways.

The two hold the same weights under other names (``interop/keymap.py``, docs/methods.md section 9):
``q_bias``/``v_bias`` are the query and value biases (the key has none), the layer-scale gammas
``lambda_1``/``lambda_2``, the shared relative-bias table ``beit.shared_position_bias`` (4.x:
``beit.encoder.relative_position_bias``), the final norm the top-level ``layernorm``.

Quirks: set ``layer_norm_eps=1e-6`` (HF's default is 1e-12); HF's ``labels`` are the ids at
the masked positions only (a 1-D tensor), and its ``logits`` cover every patch.
The tokenizer (e.g. the k-means codebook) has no HF counterpart and is not converted.
"""

from __future__ import annotations

import torch

from . import keymap


def hf_beit_config(encoder, vocab_size: int):
    """A ``BeitConfig`` with our BEiT-style ``encoder``'s shape and flavour."""
    from transformers import BeitConfig

    # HF builds lambda_1/2 only for a positive init value; their values are loaded afterwards
    layer_scale = 0.1 if hasattr(encoder.blocks[0].ls1, "gamma") else 0.0
    return BeitConfig(**keymap.vit_config(encoder), vocab_size=vocab_size, use_mask_token=True,
                      use_absolute_position_embeddings=encoder.pos_embed is not None, use_relative_position_bias=False,
                      use_shared_relative_position_bias=encoder.rel_pos_bias is not None,
                      layer_scale_init_value=layer_scale, drop_path_rate=0.0)


def beit_names(layout: int, base: str = "beit.") -> dict:
    """Ours -> HF for ``BeitForMaskedImageModeling`` (``base`` "": a ``BeitModel`` without mean pooling)."""
    shared = "shared_position_bias" if layout == keymap.NEW else "encoder.relative_position_bias"
    return {**keymap.vit_names(base, layout, "beit", norm="layernorm"), "mask_token": f"{base}embeddings.mask_token",
            "encoder.rel_pos_bias.relative_position_bias_table": f"{base}{shared}.relative_position_bias_table",
            "lm_head.weight": "lm_head.weight", "lm_head.bias": "lm_head.bias"}


def to_hf_state_dict(objective, new_layout: bool | None = None) -> dict[str, torch.Tensor]:
    """Our objective's weights (without the tokenizer) under ``BeitForMaskedImageModeling`` keymap."""
    state = {k: v for k, v in objective.state_dict().items() if not k.startswith("tokenizer.")}
    return keymap.to_hf(state, beit_names(keymap.installed(new_layout)))


def from_hf_state_dict(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``BeitForMaskedImageModeling`` weights (either layout) -> our objective's names (without the tokenizer)."""
    return keymap.from_hf(hf_state, beit_names(keymap.layout_of(hf_state)))


def hf_model(encoder, state: dict[str, torch.Tensor], vocab_size: int | None = None):
    """An HF BEiT in eval mode holding ``state`` (our names): a ``BeitForMaskedImageModeling`` with an
    ``lm_head`` of ``vocab_size`` ids, or without ``vocab_size`` a ``BeitModel`` (the encoder alone, no
    pooling layer, the final norm on every token)."""
    from transformers import BeitForMaskedImageModeling, BeitModel

    config = hf_beit_config(encoder, vocab_size or 1)
    if vocab_size:
        model, base = BeitForMaskedImageModeling(config), "beit."
    else:
        config.use_mask_token, config.use_mean_pooling = False, False
        model, base = BeitModel(config, add_pooling_layer=False), ""
    state = {k: v for k, v in state.items() if not k.startswith("tokenizer.")}
    weights = keymap.to_hf(state, beit_names(keymap.installed(None), base))
    return keymap.load_into(model, weights, f"{type(model).__name__} does not fit").eval()


def to_hf(objective):
    """A ``BeitForMaskedImageModeling`` in eval mode holding our objective's weights."""
    return hf_model(objective.encoder, objective.state_dict(), objective.vocab_size)


def load_from_hf(objective, hf_model) -> None:
    """Copy a ``BeitForMaskedImageModeling``'s weights into our objective (tokenizer untouched)."""
    weights = from_hf_state_dict(hf_model.state_dict())
    missing, unexpected = objective.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.startswith("tokenizer.")]
    if missing or unexpected:
        raise ValueError(f"HF -> BEiT conversion: missing {missing[:4]}, unexpected {unexpected[:4]}")
