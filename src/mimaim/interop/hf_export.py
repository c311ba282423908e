"""A mimaim run as a HuggingFace ``transformers`` folder (``from_pretrained`` loads it).

* MAE -> ``ViTMAEForPreTraining`` (encoder and decoder; ``interop/hf_mae.py``).
* BEiT -> ``BeitForMaskedImageModeling`` (encoder, mask token, ``lm_head``; ``interop/hf_beit.py``).
  The visual tokenizer has no HF counterpart and is not needed: nothing opens its file.
* SimMIM, plain ViT or Swin -> ``ViTForMaskedImageModeling`` / ``SwinForMaskedImageModeling``
  (``interop/hf_simmim.py``); SimMIM's BEiT-style ViT has no HF masked-modeling class with a
  pixel head, so its encoder is written as a ``BeitModel`` (the backbone alone).
* AIM: ``transformers`` has no AIM model; use ``--to timm``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["export_hf"]


def _beit_holder(backbone: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """What ``hf_beit`` reads of a BEiT objective (encoder, mask token, lm_head), without its tokenizer."""
    holder = nn.Module()
    holder.encoder = backbone
    holder.mask_token = nn.Parameter(weights["mask_token"].clone())
    vocab, width = weights["lm_head.weight"].shape
    holder.lm_head = nn.Linear(width, vocab)
    holder.lm_head.load_state_dict({"weight": weights["lm_head.weight"], "bias": weights["lm_head.bias"]})
    holder.vocab_size = vocab
    return holder


def _beit_backbone_model(backbone: nn.Module):
    """A ``BeitModel`` (no pooling layer, final norm on every token) holding a BEiT-style encoder."""
    from transformers import BeitModel

    from . import hf_beit

    dummy = nn.Module()
    dummy.encoder, dummy.mask_token, dummy.lm_head = backbone, nn.Parameter(torch.zeros(1, 1, backbone.embed_dim)), \
        nn.Linear(backbone.embed_dim, 1)
    dummy.vocab_size = 1
    config = hf_beit.hf_beit_config(dummy)
    config.use_mask_token = False
    config.use_mean_pooling = False  # BeitModel then applies its final LayerNorm to every token
    model = BeitModel(config, add_pooling_layer=False)
    expected = model.state_dict()
    weights = {}
    for key, value in hf_beit.to_hf_state_dict(dummy, hf_beit.hf_layout(["beit." + k for k in expected])).items():
        if key.startswith("beit."):
            key = key[len("beit."):]
        if key in expected:
            weights[key] = value
    missing = [k for k in expected if k not in weights and "relative_position_index" not in k]
    if missing:
        raise ValueError(f"BEiT-style encoder -> HF BeitModel: missing {missing[:4]}")
    model.load_state_dict(weights, strict=False)
    return model.eval()


def _objective(record: dict, ckpt: Path) -> nn.Module:
    """The run's objective (heads included) from its record and checkpoint; for objectives without files."""
    from ..engine.checkpoint import load_weights
    from ..objectives import build_objective

    objective = build_objective(record["objective"], record["backbone"]["name"], record["img_size"],
                                record["patch_size"], record["objective_options"])
    load_weights(objective, ckpt, what="checkpoint")
    return objective.eval()


def export_hf(run: str | Path, out: str | Path, checkpoint: str | Path | None = None) -> Path:
    """Write run ``run`` (newest checkpoint) as a ``transformers`` folder ``out``; returns ``out``."""
    from ..engine.runs import open_backbone, read_checkpoint_weights

    backbone, record, ckpt = open_backbone(run, checkpoint=checkpoint)
    objective = record["objective"]
    out = Path(out)
    if objective == "mae":
        from .hf_mae import mae_to_hf_model

        model = mae_to_hf_model(_objective(record, ckpt))
    elif objective == "beit":
        from . import hf_beit

        model = hf_beit.to_hf(_beit_holder(backbone, read_checkpoint_weights(ckpt)))
    elif objective == "simmim":
        if not hasattr(backbone, "output_stride") and record["objective_options"].get("vit_flavour") == "beit":
            model = _beit_backbone_model(backbone)
        else:
            from .hf_simmim import simmim_to_hf_model

            model = simmim_to_hf_model(_objective(record, ckpt))
    else:
        raise ValueError(f"objective {objective!r} has no HuggingFace transformers model class to export to; "
                         f"export it with `mimaim export {run} --to timm --out DIR` instead")
    model.save_pretrained(str(out))
    return out
