"""A mimaim run as a HuggingFace ``transformers`` folder (``mimaim export --to hf``'s help says which class each
objective becomes). BEiT's config says ``use_mean_pooling: false``, so that ``AutoModel`` (a ``BeitModel``)
applies the trained final norm to every token, as BEiT's probe reads it; its tokenizer is not needed. SimMIM's
BEiT-style ViT has no HF masked-modeling class with a pixel head: its encoder is written as a ``BeitModel``.
I-JEPA's target encoder becomes an ``IJepaModel`` (``hf_ijepa.py``).
"""

from __future__ import annotations

from pathlib import Path

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_resize
from ..engine.checkpoint import check_weights_fit
from ..engine.runs import open_backbone, read_checkpoint_weights
from ..objectives import build_objective
from . import hf_beit, hf_ijepa, hf_mae, hf_simmim

__all__ = ["export_hf"]


def export_hf(run: str | Path, out: str | Path, checkpoint: str | Path | None = None) -> Path:
    """Write run ``run`` (newest checkpoint) as a ``transformers`` folder ``out``; returns ``out``."""
    backbone, record, ckpt = open_backbone(run, checkpoint=checkpoint)
    objective, options = record["objective"], record["objective_options"]
    if record["backbone"]["kwargs"].get("class_token") is False and objective not in ("aim", "ijepa"):
        raise ValueError(f"{run} was trained on a trunk without a cls token (--trunk shared), which HF's "
                         f"{objective} classes always hold; export it with `mimaim export {run} --to timm`")
    weights = read_checkpoint_weights(ckpt)  # model.safetensors (ddp) or sharded (fsdp); no tokenizer file needed
    if objective == "beit":
        model = hf_beit.hf_model(backbone, weights, vocab_size=weights["lm_head.weight"].shape[0])
        model.config.use_mean_pooling = False  # HF: LayerNorm every token (BeitModel.layernorm), not their mean
    elif objective == "simmim" and not hasattr(backbone, "output_stride") and options.get("vit_flavour") == "beit":
        model = hf_beit.hf_model(backbone, {f"encoder.{k}": v for k, v in backbone.state_dict().items()})
    elif objective == "ijepa":  # the target encoder, as the paper's evaluation and facebook/ijepa_* on the Hub
        model = hf_ijepa.hf_model(backbone)
    elif objective in ("mae", "simmim"):
        built = build_objective(objective, record["backbone"]["name"], record["img_size"], record["patch_size"],
                                options)
        check_weights_fit(built.state_dict(), weights, f"checkpoint {ckpt}")
        built.load_state_dict(weights)
        convert = hf_mae.mae_to_hf_model if objective == "mae" else hf_simmim.simmim_to_hf_model
        model = convert(built.eval())
    else:
        raise ValueError(f"objective {objective!r} has no HuggingFace transformers model class to export to; "
                         f"export it with `mimaim export {run} --to timm --out DIR` instead")
    model.save_pretrained(str(out))
    image_processor(record["img_size"]).save_pretrained(str(out))  # for AutoImageProcessor and pipeline
    return Path(out)


def image_processor(img_size: int):
    """``data.eval_transform`` of an image larger than ``img_size`` (as mimaim's probes see it), in HF's terms:
    the shorter side resized (bicubic) to ``eval_resize(img_size)``, the centre square cropped, ImageNet mean/std."""
    from transformers import CLIPImageProcessor  # shorter-side resize + centre crop (ViT's processor squashes)

    return CLIPImageProcessor(size={"shortest_edge": eval_resize(img_size)}, resample=3, do_center_crop=True,
                              crop_size={"height": img_size, "width": img_size}, do_normalize=True,
                              image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), do_convert_rgb=True)
