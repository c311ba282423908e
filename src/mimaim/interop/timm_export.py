"""A mimaim encoder as a timm model in timm's hub format (``save_for_hf``): ``timm.create_model("local-dir:OUT",
pretrained=True)`` rebuilds it. MAE's and SimMIM's plain ViT become ``VisionTransformer``, BEiT-style ViTs ``Beit``
(shared relative position bias), AIM a ``VisionTransformer`` without cls token and with a patch LayerNorm (its
probe protocol, the last six blocks averaged without the final norm, is no timm ``global_pool``: it stays
available through ``forward_intermediates``), a Swin timm's own. ``num_classes`` 0 and ``global_pool`` from the
objective's probe protocol: ``model(x)`` returns the pooled features."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_resize
from ..engine.runs import open_backbone
from .keymap import load_into

__all__ = ["export_timm", "timm_spec", "to_timm", "to_timm_state_dict"]

# registered timm names whose shape (width, depth, heads) matches ours; others use the base name + args
_VIT_NAMES = {(192, 12, 3): "vit_tiny_patch16_224", (384, 12, 6): "vit_small_patch16_224",
              (768, 12, 12): "vit_base_patch16_224", (1024, 24, 16): "vit_large_patch16_224",
              (1280, 32, 16): "vit_huge_patch14_224"}
_BEIT_NAMES = {(768, 12, 12): "beit_base_patch16_224", (1024, 24, 16): "beit_large_patch16_224"}

def _is_swin(backbone: nn.Module) -> bool:
    return hasattr(backbone, "output_stride")


def _is_beit_style(backbone: nn.Module) -> bool:
    return backbone.rel_pos_bias is not None or backbone.blocks[0].attn.q_bias is not None


def timm_spec(backbone: nn.Module, pool: str = "mean") -> tuple[str, dict[str, Any]]:
    """-> (timm architecture name, constructor kwargs) for our backbone (``pool``: "cls" | "mean"); a ValueError
    names what timm cannot hold."""
    global_pool = {"cls": "token", "mean": "avg"}[pool]
    if _is_swin(backbone):
        first = backbone.layers[0].blocks[0]
        return "swin_tiny_patch4_window7_224", dict(
            img_size=backbone.img_size, patch_size=backbone.patch_size, in_chans=backbone.patch_embed.proj.in_channels,
            embed_dim=backbone.embed_dim, depths=list(backbone.depths),
            num_heads=[s.blocks[0].attn.num_heads for s in backbone.layers], window_size=backbone.window_size,
            mlp_ratio=first.mlp.fc1.out_features / backbone.embed_dim, qkv_bias=first.attn.qkv.bias is not None,
            num_classes=0, global_pool="avg")
    blk = backbone.blocks[0]
    D, depth, heads = backbone.embed_dim, backbone.depth, backbone.num_heads
    common = dict(img_size=backbone.img_size, patch_size=backbone.patch_size, in_chans=backbone.in_chans,
                  embed_dim=D, depth=depth, num_heads=heads, mlp_ratio=blk.mlp.fc1.out_features / D,
                  num_classes=0, global_pool=global_pool)
    has_ls = hasattr(blk.ls1, "gamma")
    if _is_beit_style(backbone):
        problems = []
        if backbone.cls_token is None:
            problems.append("no cls token (timm Beit always has one)")
        if blk.attn.q_bias is None:
            problems.append("q/k/v bias other than q/v-only")
        if not isinstance(backbone.patch_norm, nn.Identity) or blk.attn.proj.bias is None:
            problems.append("patch LayerNorm or bias-free projections")
        if problems:
            raise ValueError("this BEiT-style ViT has no timm Beit equivalent: " + "; ".join(problems))
        name = _BEIT_NAMES.get((D, depth, heads), "beit_base_patch16_224")
        return name, dict(common, qkv_bias=True, use_abs_pos_emb=backbone.pos_embed is not None,
                          use_rel_pos_bias=False, use_shared_rel_pos_bias=backbone.rel_pos_bias is not None,
                          init_values=0.1 if has_ls else 0.0,  # not None: create_model drops it, Beit's 0.1 stays
                          use_fc_norm=False)  # final norm on every token, then pool (as our probes)
    if backbone.pos_embed is None:
        raise ValueError("a ViT without absolute positions and without a relative position bias has no "
                         "timm equivalent")
    name = _VIT_NAMES.get((D, depth, heads), "vit_base_patch16_224")
    return name, dict(common, class_token=backbone.cls_token is not None, no_embed_class=False,
                      qkv_bias=blk.attn.qkv.bias is not None, proj_bias=blk.attn.proj.bias is not None,
                      init_values=0.1 if has_ls else None,
                      embed_norm_layer=None if isinstance(backbone.patch_norm, nn.Identity) else "layernorm",
                      fc_norm=False, weight_init="skip")


def to_timm_state_dict(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """Our backbone's weights under timm's names (the Swin's are timm's already)."""
    out = {}
    beit = not _is_swin(backbone) and _is_beit_style(backbone)
    for key, value in backbone.state_dict().items():
        key = key.replace("patch_norm.", "patch_embed.norm.")
        if beit:
            key = key.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2")
        out[key] = value.detach().clone().contiguous()
    return out


def to_timm(backbone: nn.Module, pool: str = "mean") -> nn.Module:
    """A timm model (eval mode, no classifier) holding ``backbone``'s weights, strictly loaded."""
    import timm

    name, kwargs = timm_spec(backbone, pool)
    model = timm.create_model(name, pretrained=False, **kwargs)
    return load_into(model, to_timm_state_dict(backbone), f"timm {name} does not fit this backbone").eval()


def export_timm(run: str | Path, out: str | Path, checkpoint: str | Path | None = None) -> Path:
    """Write run ``run``'s encoder (newest checkpoint) as a timm hub folder ``out``."""
    from timm.models import save_for_hf

    backbone, record, ckpt = open_backbone(run, checkpoint=checkpoint)
    pool = record.get("probe_protocol", {}).get("pool", "mean")
    model = to_timm(backbone, pool)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # timm's create_transform as data.eval_transform: the shorter side to floor(size / crop_pct) = eval_resize(size)
    # (+ 0.5: whatever the float rounding), bicubic, then the centre crop
    size = record["img_size"]
    data_config = dict(input_size=(3, size, size), mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic",
                       crop_pct=size / (eval_resize(size) + 0.5), crop_mode="center")
    save_for_hf(model, str(out), safe_serialization=True, data_config=data_config)
    # the factory's pretrained_cfg names another checkpoint (its tag, license): describe this one
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    cfg = config["pretrained_cfg"]
    cfg["tag"] = f"mimaim_{record['objective']}"
    for key in ("license", "hf_hub_id", "origin_url", "paper_ids", "notes"):
        cfg.pop(key, None)
    config["mimaim"] = {"objective": record["objective"], "backbone": record["backbone"]["name"],
                        "probe_protocol": record.get("probe_protocol"), "checkpoint": ckpt.name,
                        "mimaim_version": record.get("mimaim_version")}
    config_path.write_text(json.dumps(config, indent=2))
    return out
