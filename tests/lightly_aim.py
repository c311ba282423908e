"""An AIM laid out as ``lightly``'s, for the peer test tests/test_aim_lightly.py (lightly 1.6:
``MaskedCausalVisionTransformer`` + ``AIMPredictionHead``, both built on timm).

mimaim's AIM trains ml-l3m's head (``L3MHead``); lightly's head has another layout, so
``lightly_style_aim`` swaps in ``LightlyStyleHead``, laid out block for block as lightly's.
The trunks differ only in names, so the conversion is a renaming:

==============================  ==================================================
mimaim ``AIM``                  lightly
==============================  ==================================================
``encoder.patch_embed.proj``    ``backbone.patch_embed.proj``
``encoder.patch_norm``          ``backbone.patch_embed.norm`` (timm ``embed_norm_layer``)
``encoder.pos_embed``           ``backbone.pos_embed`` (a learned table in lightly)
``encoder.blocks.i.*``          ``backbone.blocks.i.*`` (same timm names)
``encoder.norm``                ``backbone.norm``
``head.embed``                  ``head.blocks.0`` (Linear D -> width)
``head.blocks.j.{norm,mlp}``    ``head.blocks.{j+1}.{norm,mlp}``
``head.norm``                   ``head.blocks.{depth+1}``
``head.pred``                   ``head.blocks.{depth+2}`` (Linear width -> p*p*3)
==============================  ==================================================

Semantics to keep in mind when comparing the two:

* lightly's prefix mask is a (B, N) bool with True = *non-prefix* token (as ml-aim's
  ``PrefixCausalAttention``); ours is the prefix length S per sample: mask = arange(N) >= S.
* lightly's example adds ``backbone._pos_embed`` to the trunk output before the head, as
  ``LightlyStyleHead`` does, but regresses each output onto *its own* patch over all positions; AIM (and mimaim)
  regress output k onto patch k+1 over non-prefix patches only. ``aim_loss_from_lightly``
  computes AIM's loss from lightly's predictions with lightly's own helpers.
* ``build_lightly_aim`` passes LayerNorm eps 1e-6 to lightly's head (its default is 1e-5).
"""

from __future__ import annotations

import re
from functools import partial

import torch
from timm.layers import Mlp
from torch import nn

from mimaim.models.layers import init_weights_xavier
from mimaim.objectives import build_objective


class MLPHeadBlock(nn.Module):
    """One block of lightly's ``AIMPredictionHead``: x + MLP(LN(x)), no biases."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dim, bias=False)

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class LightlyStyleHead(nn.Module):
    """Laid out as lightly's ``AIMPredictionHead``: the trunk's sin-cos table added to the features
    (a non-persistent buffer, as lightly's example adds ``backbone._pos_embed``), a bias-free Linear
    (D -> width), ``depth`` ``MLPHeadBlock``s, a LayerNorm (eps 1e-6) and a bias-free Linear (width -> out).
    """

    def __init__(self, pos_embed: torch.Tensor, out_dim: int, width: int, depth: int, mlp_ratio: float):
        super().__init__()
        self.register_buffer("trunk_pos_embed", pos_embed.detach().clone(), persistent=False)
        self.embed = nn.Linear(pos_embed.shape[-1], width, bias=False)
        self.blocks = nn.ModuleList([MLPHeadBlock(width, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.pred = nn.Linear(width, out_dim, bias=False)
        self.apply(init_weights_xavier)

    def forward(self, x):
        x = self.embed(x + self.trunk_pos_embed.to(x.dtype))  # (B, N, W)
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))  # (B, N, out)


def lightly_style_aim(img_size: int = 16, patch_size: int = 4, options: dict | None = None, **backbone):
    """``build_objective("aim", "vit_micro", ...)`` with ``LightlyStyleHead`` in place of l3m's head."""
    aim = build_objective("aim", "vit_micro", img_size, patch_size, options, **backbone)
    enc, opts = aim.encoder, aim.options
    aim.head = LightlyStyleHead(enc.pos_embed, patch_size ** 2 * enc.in_chans, opts.head_width, opts.head_depth,
                                opts.head_mlp_ratio)
    return aim


def _head_depth(head_state: dict[str, torch.Tensor], prefix: str) -> int:
    ids = {int(m.group(1)) for k in head_state if (m := re.match(re.escape(prefix) + r"blocks\.(\d+)\.", k))}
    return len(ids)


def aim_to_lightly(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Our ``AIM.state_dict()`` -> {"backbone": ..., "head": ...} for lightly's two modules."""
    backbone, head = {}, {}
    if any(k.startswith("head.") and k.split(".")[1] not in ("embed", "blocks", "norm", "pred") for k in state):
        raise ValueError("this AIM has the l3m head, which lightly's AIMPredictionHead cannot hold; "
                         "build it with lightly_style_aim")
    depth = _head_depth(state, "head.")
    for key, value in state.items():
        if key.startswith("encoder."):
            k = key[len("encoder."):]
            k = re.sub(r"^patch_norm\.", "patch_embed.norm.", k)
            backbone[k] = value
        elif key.startswith("head."):
            part, rest = key[len("head."):].split(".", 1)
            if part == "blocks":
                i, rest = rest.split(".", 1)
                index = int(i) + 1
            else:
                index = {"embed": 0, "norm": depth + 1, "pred": depth + 2}[part]
            head[f"blocks.{index}.{rest}"] = value
        elif key == "mask_token":
            raise ValueError("the masked AIM variant (mode=masked) has no lightly counterpart; convert an "
                             "autoregressive AIM")
        else:
            raise ValueError(f"unexpected key {key!r} in an AIM state dict")
    return {"backbone": backbone, "head": head}


def lightly_to_aim(backbone: dict[str, torch.Tensor], head: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """lightly's backbone and head state dicts -> our ``AIM`` state dict (load with ``load_state_dict``)."""
    out = {}
    for key, value in backbone.items():
        if key.startswith(("cls_token", "reg_token", "head.", "fc_norm.", "norm_pre.")):
            raise ValueError(f"lightly backbone key {key!r} has no mimaim AIM counterpart; build lightly's "
                             "MaskedCausalVisionTransformer with class_token=False, no_embed_class=True, "
                             "num_classes=0, global_pool='' (see build_lightly_aim)")
        out["encoder." + re.sub(r"^patch_embed\.norm\.", "patch_norm.", key)] = value
    n = len({int(m.group(1)) for k in head if (m := re.match(r"blocks\.(\d+)\.", k))})
    depth = n - 3
    if depth < 0:
        raise ValueError(f"lightly head has {n} entries in .blocks; expected Linear, blocks..., norm, Linear")
    for key, value in head.items():
        i, rest = re.match(r"blocks\.(\d+)\.(.*)", key).groups()
        i = int(i)
        if i == 0:
            out[f"head.embed.{rest}"] = value
        elif i <= depth:
            out[f"head.blocks.{i - 1}.{rest}"] = value
        elif i == depth + 1:
            out[f"head.norm.{rest}"] = value
        else:
            out[f"head.pred.{rest}"] = value
    return out


def build_lightly_aim(objective, load_weights: bool = True) -> tuple[nn.Module, nn.Module]:
    """lightly's ``(MaskedCausalVisionTransformer, AIMPredictionHead)`` shaped like ``objective``.

    With ``load_weights`` they carry the objective's weights (through ``aim_to_lightly``).
    """
    from lightly.models.modules import AIMPredictionHead, MaskedCausalVisionTransformer

    enc = objective.encoder
    opts = objective.options
    mlp_ratio = enc.blocks[0].mlp.fc1.out_features / enc.embed_dim
    ln = partial(nn.LayerNorm, eps=1e-6)
    backbone = MaskedCausalVisionTransformer(
        img_size=enc.img_size, patch_size=enc.patch_size, in_chans=enc.in_chans, embed_dim=enc.embed_dim,
        depth=enc.depth, num_heads=enc.num_heads, mlp_ratio=mlp_ratio, qkv_bias=False, proj_bias=False,
        class_token=False, no_embed_class=True, embed_norm_layer=ln, norm_layer=ln, num_classes=0,
        global_pool="")
    p = enc.patch_size
    head = AIMPredictionHead(input_dim=enc.embed_dim, output_dim=p * p * enc.in_chans, hidden_dim=opts.head_width,
                             num_blocks=opts.head_depth, mlp_ratio=opts.head_mlp_ratio, norm_layer=ln)
    if load_weights:
        converted = aim_to_lightly(objective.state_dict())
        backbone.load_state_dict(converted["backbone"])
        head.load_state_dict(converted["head"])
    return backbone, head


def lightly_prefix_mask(prefix_len: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Our (B,) prefix lengths -> lightly's (B, N) mask, True = non-prefix (causal) token."""
    return torch.arange(num_patches, device=prefix_len.device)[None] >= prefix_len[:, None]


def lightly_forward(backbone: nn.Module, head: nn.Module, images: torch.Tensor, mask: torch.Tensor | None):
    """lightly's AIM forward, as its example runs it: -> (trunk features (B, N, D), predictions (B, N, P))."""
    features = backbone.forward_features(images, mask=mask)
    return features, head(backbone._pos_embed(features))


def aim_loss_from_lightly(predictions: torch.Tensor, images: torch.Tensor, mask: torch.Tensor,
                          patch_size: int) -> torch.Tensor:
    """AIM's loss from lightly's outputs, with lightly's ``patchify`` and ``normalize_mean_var``:
    output k regresses patch k+1, averaged over non-prefix target patches (mask True)."""
    from lightly.models import utils

    target = utils.normalize_mean_var(utils.patchify(images, patch_size), dim=-1)  # (B, N, P)
    per_patch = ((predictions[:, :-1] - target[:, 1:]) ** 2).mean(dim=-1)  # (B, N-1)
    counted = mask[:, 1:].to(per_patch.dtype)
    return (per_patch * counted).sum() / counted.sum()
