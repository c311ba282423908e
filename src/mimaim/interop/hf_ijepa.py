"""An I-JEPA run's target encoder as HuggingFace ``IJepaModel`` (the class of ``facebook/ijepa_vith14_1k``), and
back (``--init`` from such a folder: both of our encoders start from it).

``IJepaModel`` is a ViT without a cls token: learned-table positions (ours: the frozen sin-cos table, written as
its values), q/k/v and every Linear with bias, pre-norm blocks, a final LayerNorm on every token. Its
``last_hidden_state`` is our ``forward_features``; the mean over tokens is the I-JEPA probe's feature (and
``IJepaForImageClassification``'s pooling). Names: ``interop/keymap.py``.
"""

from __future__ import annotations

from . import keymap


def check_plain(encoder) -> list[str]:
    """What an ``IJepaModel`` cannot hold of our ViT ``encoder`` (empty: it fits)."""
    keys = encoder.state_dict().keys()
    found = {"a cls token": "cls_token" in keys,
             "layer scale": any(".gamma" in k for k in keys),
             "a relative position bias": any("relative_position" in k for k in keys),
             "a LayerNorm after the patch projection": any(k.startswith("patch_norm.") for k in keys),
             "no absolute position table": "pos_embed" not in keys,
             "Linears without bias": "blocks.0.attn.qkv.bias" not in keys or "blocks.0.mlp.fc1.bias" not in keys}
    return [what for what, present in found.items() if present]


def hf_model(encoder):
    """An ``IJepaModel`` (no pooling layer) in eval mode holding ``encoder``'s weights."""
    from transformers import IJepaConfig, IJepaModel

    problems = check_plain(encoder)
    if problems:
        raise ValueError(f"HF's IJepaModel has no place for this encoder's {', '.join(problems)}")
    model = IJepaModel(IJepaConfig(**keymap.vit_config(encoder), qkv_bias=True), add_pooling_layer=False)
    state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    weights = keymap.to_hf(state, keymap.vit_names("", keymap.installed(None)))
    return keymap.load_into(model, weights, "IJepaModel does not fit").eval()


def from_hf_state_dict(state: dict) -> dict:
    """An ``IJepaForImageClassification``-style state dict (base model under ``ijepa.``) -> our ``encoder.*``."""
    return keymap.from_hf(state, keymap.vit_names("ijepa.", keymap.layout_of(state)))
