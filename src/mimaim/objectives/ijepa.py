"""I-JEPA: Self-Supervised Learning from Images with a Joint-Embedding Predictive Architecture (Assran et al.,
2301.08243).

Section 3 of the paper, as ``facebookresearch/ijepa`` trains it: a context encoder sees one large context block
(targets removed), a narrow ViT predictor fills in mask tokens at the positions of 4 target blocks, and regresses
the layer-normed patch embeddings that an EMA copy of the encoder (the target encoder) gives the whole image.
``encoder`` IS the target encoder (frozen, moved only by the EMA), so probes, ``load_backbone`` and ``export``
read it as the official evaluation does; ``context_encoder`` is the trained copy. Whatever the encoder is loaded
with (the shared trunk, ``--init``) the context encoder copies, as the official ``target = deepcopy(encoder)``.

Departures from the official code (docs/methods.md section 11):
- masks are drawn per image in the data loader (``sample_masking``, reproducible from seed, epoch and index),
  not per batch: the target and context block SIZES are drawn per image (official: one size per batch, seeded
  by the iteration). A batch's blocks are cut to its smallest, first patches in raster order kept, as the
  official collator cuts the context: a target block larger than the batch's smallest loses its last patches.
  Sizing them costs one host sync per step (the official collator does it on the CPU).
- the loss (smooth L1, beta 1, as the official code; the paper writes L2) is computed in fp32.
- the engine's schedules: lr warms up from 0 (official: from ``start_lr``), weight decay is constant (official:
  cosine 0.04 -> 0.4); ``configs/ijepa_vit_huge.yaml`` has the rest of the official optimiser.
- not offered: ``allow_overlap`` and more than one context block (the official configs: false and 1).
- on the shared trunk (``--trunk shared``) both encoders start from the shared trunk's weights, not from
  the official truncated-normal init that the paper flavour re-draws here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from ..masking import first_members, ijepa_block_size, ijepa_multiblock
from ..models.layers import Block, patch_mask_to_pixels, sincos_2d
from .base import Augmentation, Objective, ObjectiveOutput, ProbeProtocol, register_objective


@dataclass
class IJEPAOptions:
    num_targets: int = 4
    target_scale: tuple = (0.15, 0.2)
    target_aspect: tuple = (0.75, 1.5)
    context_scale: tuple = (0.85, 1.0)
    min_keep: int = 10  # a block must keep more than this many patches
    predictor_embed_dim: int = 384
    predictor_depth: int = 12
    predictor_num_heads: int = 0  # 0: the encoder's (official init_model)
    ema_start: float = 0.996
    ema_end: float = 1.0

    def validate(self):
        if not 1 <= self.num_targets <= 30:
            raise ValueError(f"ijepa.num_targets must be in 1..30, got {self.num_targets}")
        for name in ("target_scale", "target_aspect", "context_scale"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi or (name != "target_aspect" and hi > 1):
                raise ValueError(f"ijepa.{name} must be (low, high) with 0 < low <= high"
                                 f"{'' if name == 'target_aspect' else ' <= 1'}, got {getattr(self, name)}")
        if not 0 <= self.ema_start <= self.ema_end <= 1:
            raise ValueError(f"ijepa: need 0 <= ema_start <= ema_end <= 1, got {self.ema_start}, {self.ema_end}")
        if self.predictor_depth < 1 or self.predictor_embed_dim % 4 or self.min_keep < 0:
            raise ValueError("ijepa: need predictor_depth >= 1, predictor_embed_dim divisible by 4 (2-D sin-cos) "
                             f"and min_keep >= 0; got {self.predictor_depth}, {self.predictor_embed_dim}, "
                             f"{self.min_keep}")


def init_official(module: nn.Module) -> None:
    """The init the official ``init_model`` leaves: Linears and the patch conv truncated normal (std 0.02, zero
    bias), LayerNorms (1, 0); its re-init of the Linears undoes the 1/sqrt(2 layer) rescale of ``fix_init_weight``."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(R, N, D) tokens, (R, K) indices -> (R, K, D) (official ``apply_masks`` for one mask)."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class Predictor(nn.Module):
    """The official ``VisionTransformerPredictor``: context tokens projected to the predictor's width plus their
    sin-cos positions, one mask token (+ position) per target patch, each target block a separate sequence."""

    def __init__(self, embed_dim: int, grid_size: tuple[int, int], width: int, depth: int, num_heads: int):
        super().__init__()
        self.predictor_embed = nn.Linear(embed_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.predictor_pos_embed = nn.Parameter(sincos_2d(width, grid_size)[None], requires_grad=False)
        self.predictor_blocks = nn.ModuleList([Block(width, num_heads, 4.0, qkv_bias="all") for _ in range(depth)])
        self.predictor_norm = nn.LayerNorm(width, eps=1e-6)
        self.predictor_proj = nn.Linear(width, embed_dim)
        self.apply(init_official)
        trunc_normal_(self.mask_token, std=0.02)

    def forward(self, context: torch.Tensor, context_idx: torch.Tensor, target_idx: torch.Tensor) -> torch.Tensor:
        """context (B, Kc, D) at ``context_idx`` (B, Kc); ``target_idx`` (T*B, K), block t of image b at row
        t*B + b -> predictions (T*B, K, D)."""
        B, Kc = context_idx.shape
        repeat = target_idx.shape[0] // B
        pos = self.predictor_pos_embed.to(context.dtype)
        x = self.predictor_embed(context) + gather_tokens(pos.expand(B, -1, -1), context_idx)
        queries = self.mask_token + gather_tokens(pos.expand(target_idx.shape[0], -1, -1), target_idx)
        x = torch.cat([x.repeat(repeat, 1, 1), queries.to(x.dtype)], dim=1)
        for blk in self.predictor_blocks:
            x = blk(x)
        return self.predictor_proj(self.predictor_norm(x)[:, Kc:])


@register_objective
class IJEPA(Objective):
    name = "ijepa"
    Options = IJEPAOptions
    #: official configs: RandomResizedCrop(scale (0.3, 1), torchvision's bilinear default), no flip, no colour
    augmentation = Augmentation(crop_scale=(0.3, 1.0), hflip=False, interpolation="bilinear")
    probe_protocol = ProbeProtocol(pool="mean", layers=None, norm=True,
                                   source="I-JEPA paper sec. 3 and 5: the target encoder's output (final norm), "
                                          "average-pooled")
    #: the official ViT has no cls token; its blocks are cut out of the patch grid
    trunk_needs = {"class_token": False}
    #: ``recipe: quick``: a narrow, shallow predictor; min_keep 4 (the collator's default) since a 3x3 target
    #: block on the 8x8 digits grid cannot keep more than the official 10
    quick_options = {"predictor_embed_dim": 64, "predictor_depth": 3, "predictor_num_heads": 4, "min_keep": 4}
    #: a step costs about twice MAE's (the target encoder sees every patch, the predictor 4 sequences an image)
    quick_epochs = 12

    @classmethod
    def backbone_kwargs(cls, options):
        # official vit_*: Conv2d patches with bias, fixed sin-cos positions, q/k/v biases, LayerNorm eps 1e-6
        return dict(class_token=False, pos_embed="sincos", qkv_bias="all", bias=True, weight_init="trunc_normal")

    def __init__(self, encoder: nn.Module, options: IJEPAOptions):
        super().__init__(encoder, options)
        self.grid_size = tuple(encoder.grid_size)
        self._check_blocks()
        encoder.apply(init_official)
        self.context_encoder = copy.deepcopy(encoder)
        encoder.requires_grad_(False)  # the target encoder: EMA only
        encoder.register_load_state_dict_post_hook(self._copy_loaded_encoder)
        heads = options.predictor_num_heads or encoder.num_heads
        self.predictor = Predictor(encoder.embed_dim, self.grid_size, options.predictor_embed_dim,
                                   options.predictor_depth, heads)

    def _check_blocks(self):
        """Every block size the sampler can draw must keep more than ``min_keep`` patches (else it loops)."""
        o = self.options
        for what, scale, aspect in (("target", o.target_scale, o.target_aspect), ("context", o.context_scale, (1, 1))):
            sizes = {ijepa_block_size(i / 1000, self.grid_size, scale, aspect) for i in range(1001)}
            h, w = min(sizes, key=lambda s: s[0] * s[1])
            if h * w <= o.min_keep:
                raise ValueError(f"ijepa: a {what} block can be {h}x{w} = {h * w} patches on the "
                                 f"{self.grid_size[0]}x{self.grid_size[1]} grid, not more than min_keep="
                                 f"{o.min_keep}; lower it (--set objective.min_keep={max(h * w - 1, 0)}) "
                                 f"or raise ijepa.{what}_scale")

    @torch.no_grad()
    def _copy_loaded_encoder(self, module, incompatible_keys):
        """After ``encoder.load_state_dict`` (alone or inside the objective's, where the context encoder's own
        entries load next): the context encoder starts as a copy of what the encoder was given."""
        for ctx, tgt in zip(self.context_encoder.parameters(), self.encoder.parameters()):
            ctx.copy_(tgt)

    def sample_masking(self, generator):
        o = self.options
        return ijepa_multiblock(self.grid_size, o.num_targets, o.target_scale, o.target_aspect, o.context_scale,
                                o.min_keep, generator)

    def block_indices(self, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N) codes -> context (B, Kc) and targets (T*B, K), block t of image b at row t*B + b, each cut
        to the batch's smallest block (docstring)."""
        T = self.options.num_targets
        bits = torch.arange(T + 1, device=code.device)
        member = ((code.long().unsqueeze(0) >> bits.view(-1, 1, 1)) & 1).bool()  # (T + 1, B, N)
        return first_members(member[T]), first_members(member[:T].flatten(0, 1))

    def forward(self, images, masking=None):
        context_idx, target_idx = self.block_indices(self.masking_or_draw(images, masking))
        repeat = target_idx.shape[0] // images.shape[0]
        with torch.no_grad():  # forward_target: all patches, layer norm over features, then the blocks
            h = self.encoder.forward_features(images)
            h = gather_tokens(F.layer_norm(h, (h.shape[-1],)).repeat(repeat, 1, 1), target_idx)
        z = gather_tokens(self.context_encoder.embed(images), context_idx)
        z = self.predictor(self.context_encoder.forward_tokens(z), context_idx, target_idx)
        loss = F.smooth_l1_loss(z.float(), h.float())
        return ObjectiveOutput(loss=loss, pred=z, target=h, extras={"context_idx": context_idx,
                                                                    "target_idx": target_idx})

    def momentum(self, step: int) -> float:
        """The EMA momentum of the update after optimiser step ``step`` (1-based): linear from ``ema_start``
        at the first step to ``ema_end`` after the run's last, as the official ``momentum_scheduler``."""
        if not self.total_steps:
            raise ValueError("ijepa: total_steps (the run's optimiser steps) is unset; the trainer sets it, "
                             "library use sets objective.total_steps before training")
        o = self.options
        return min(o.ema_start + (step - 1) * (o.ema_end - o.ema_start) / self.total_steps, o.ema_end)

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        """target <- m target + (1 - m) context, every parameter (official ``train.py``)."""
        m = self.momentum(step)
        targets, contexts = list(self.encoder.parameters()), list(self.context_encoder.parameters())
        torch._foreach_mul_(targets, m)
        torch._foreach_add_(targets, torch._foreach_mul([c.detach() for c in contexts], 1.0 - m))

    def no_weight_decay(self):
        """None: the official groups decay every weight that is neither a bias nor 1-D (the mask token too)."""
        return set()

    @torch.no_grad()
    def reconstruct(self, images, masking=None):
        """A latent objective predicts no pixels: the image, the context the encoder saw, the target blocks
        whose embeddings were predicted, and both (targets dimmed), as cut for this batch."""
        out = self(images, masking)
        B, N = images.shape[0], self.encoder.num_patches
        context_idx, target_idx = out.extras["context_idx"], out.extras["target_idx"]
        seen = torch.zeros(B, N, device=images.device).scatter_(1, context_idx, 1.0)
        target = torch.zeros(target_idx.shape[0], N, device=images.device).scatter_(1, target_idx, 1.0)
        target = target.view(-1, B, N).amax(dim=0)  # (B, N): in any target block
        p = self.encoder.patch_size
        seen, target = (patch_mask_to_pixels(m, p, self.grid_size) for m in (seen, target))
        return {"original": images, "context (encoder input)": images * seen,
                "target blocks (predicted as embeddings)": images * target,
                "context + targets (dimmed)": images * seen + 0.4 * images * target}
