"""AIM: Scalable Pre-training of Large Autoregressive Image Models (El-Nouby et al., 2401.08541).

Section 3 of the paper, the trunk as ``apple/ml-aim`` releases it and training as ``apple/ml-l3m``
does: prefix-causal attention (Fig. 3; S ~ U[1, N-1]), the output at position k regressing patch k+1
in per-patch normalised pixels (Eq. 1-2), l3m's ``SimpleDecoder`` head, and the masked variant of
Table 5 (``mode="masked"``). Details and departures: docs/methods.md section 5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from timm.layers import Mlp
from torch.nn.attention.flex_attention import create_block_mask

from ..models.layers import (init_weights_xavier, patch_mask_to_pixels, pixel_targets, predicted_pixels,
                             sincos_2d)
from .base import (Augmentation, Objective, ObjectiveOutput, ProbeProtocol, check_choice, masked_columns,
                   register_objective)


@dataclass
class AIMOptions:
    mode: str = "autoregressive"  # autoregressive (the paper) | masked (Table 5 ablation)
    attention: str = "prefix"  # prefix (the paper) | causal (Table 3d ablation)
    min_prefix: int = 1  # S ~ U[min_prefix, max_prefix]
    max_prefix: int = 0  # 0: N - 1, the paper's upper bound
    head_depth: int = 12
    head_width: int = 2048
    head_mlp_ratio: float = 4.0
    norm_pix_loss: bool = True
    mask_ratio: float = 0.5  # mode=masked only
    attention_kernel: str = "auto"  # auto: flex_attention on CUDA, dense SDPA elsewhere | flex | sdpa

    def validate(self):
        check_choice("aim", "mode", self.mode, ("autoregressive", "masked"))
        check_choice("aim", "attention", self.attention, ("prefix", "causal"))
        check_choice("aim", "attention_kernel", self.attention_kernel, ("auto", "flex", "sdpa"))
        if self.min_prefix < 1:
            raise ValueError(f"aim.min_prefix must be at least 1 (the prefix holds at least one patch), "
                             f"got {self.min_prefix}")
        if self.max_prefix != 0 and self.max_prefix < self.min_prefix:
            raise ValueError(f"aim.max_prefix {self.max_prefix} is below aim.min_prefix {self.min_prefix}; "
                             "pick max_prefix >= min_prefix, or 0 for N - 1")
        if self.head_depth < 0 or self.head_width < 1 or self.head_mlp_ratio <= 0:
            raise ValueError(f"aim head: need head_depth >= 0, head_width >= 1 and head_mlp_ratio > 0; got "
                             f"{self.head_depth}, {self.head_width}, {self.head_mlp_ratio}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"aim.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.mode == "masked" and self.attention != "prefix":
            raise ValueError(f"aim.attention={self.attention!r} has no meaning with mode=masked (its trunk is "
                             "bidirectional); drop --attention or use mode=autoregressive")
        if self.mode == "autoregressive" and self.mask_ratio != 0.5:
            raise ValueError(f"aim.mask_ratio={self.mask_ratio} only applies to the masked variant; "
                             "add --set objective.mode=masked, or drop --mask-ratio")
        if self.attention == "causal" and (self.min_prefix, self.max_prefix) != (1, 0):
            raise ValueError("aim.min_prefix / max_prefix have no effect with attention=causal (no prefix); "
                             "drop them or use --attention prefix")


def prefix_causal_mask(prefix_len: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(B,) prefix lengths -> (B, 1, N, N) bool: query i may attend key j when j <= i or j < S (ml-aim's
    ``PrefixCausalAttention``)."""
    i = torch.arange(num_tokens, device=prefix_len.device)
    causal = i[None, :] <= i[:, None]  # (N, N) [query, key]
    prefix = i[None, None, :] < prefix_len[:, None, None]  # (B, 1, N): key in the prefix
    return (causal[None] | prefix).unsqueeze(1)


def prefix_causal_block_mask(prefix_len: torch.Tensor, num_tokens: int):
    """The same mask as a flex-attention ``BlockMask`` (fully masked tiles are skipped on CUDA)."""
    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) | (kv_idx < prefix_len[b])

    return create_block_mask(mask_mod, prefix_len.shape[0], None, num_tokens, num_tokens,
                             device=prefix_len.device)


class L3MHeadBlock(nn.Module):
    """l3m's transformer ``Block`` with ``GenericIdentity`` as attention: x + norm_1(x), then x + mlp(norm_2(x))."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, eps: float = 1e-5):
        super().__init__()
        self.norm_1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dim, bias=False)
        self.norm_2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x):
        x = x + self.norm_1(x)
        return x + self.mlp(self.norm_2(x))


class L3MHead(nn.Module):
    """AIM's head as ml-l3m's ``SimpleDecoder`` (``configs/aimv1``): (B, N, D) trunk output -> (B, N, out);
    the sin-cos table is added after the projection, at the head's width (docs/methods.md section 5)."""

    def __init__(self, in_dim: int, out_dim: int, grid_size: tuple[int, int], width: int = 2048, depth: int = 12,
                 mlp_ratio: float = 4.0, eps: float = 1e-5):
        super().__init__()
        if width % 4:
            raise ValueError(f"aim.head_width {width} must be divisible by 4 (the head adds a 2-D sin-cos table "
                             "at its own width); pick e.g. 256 or 2048")
        self.decoder_projection = nn.Linear(in_dim, width, bias=True)
        self.decoder_pos_embed = nn.Parameter(sincos_2d(width, grid_size)[None], requires_grad=False)
        self.decoder_blocks = nn.ModuleList([L3MHeadBlock(width, mlp_ratio, eps) for _ in range(depth)])
        self.decoder_norm = nn.LayerNorm(width, eps=eps)
        self.decoder_pred = nn.Linear(width, out_dim, bias=True)
        self.apply(init_weights_xavier)

    def forward(self, x):
        x = self.decoder_projection(x)  # (B, N, W)
        x = x + self.decoder_pos_embed[:, :x.shape[1]].to(x.dtype)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))  # (B, N, out)


@register_objective
class AIM(Objective):
    name = "aim"
    Options = AIMOptions
    #: ml-l3m configs/aimv1/001_aim_v1_600M.yaml: RandomResizedCrop(scale (0.4, 1), bicubic) (Table 3c's best),
    #: flip, then RandomApply([ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8)
    augmentation = Augmentation(crop_scale=(0.4, 1.0), color_jitter=(0.4, 0.4, 0.2, 0.1), jitter_prob=0.8,
                                jitter_first=False, interpolation="bicubic")
    #: ml-aim AverageLayers: mean of the last 6 blocks, no final norm
    probe_protocol = ProbeProtocol(pool="mean", layers=(-6, -5, -4, -3, -2, -1), norm=False,
                                   source="AIM paper sec. 4 / apple/ml-aim AverageLayers "
                                          "(last 6 blocks, no final norm)")
    #: the raster-order (prefix-)causal mask covers the patches only: no place for a cls token
    trunk_needs = {"class_token": False}
    #: ``recipe: quick``: a small head and fewer epochs, so the built-in run takes minutes on a CPU
    #: (AIM runs the trunk over all tokens, MAE over a quarter; benchmarks/bench_quick_options.py)
    quick_options = {"head_depth": 2, "head_width": 128}
    quick_epochs = 8

    @classmethod
    def backbone_kwargs(cls, options):
        # ml-aim: Conv2d patch projection (with bias) -> LayerNorm -> + sin-cos; bias-free Linears
        return dict(class_token=False, pos_embed="sincos", patch_norm=True, patch_bias=True, bias=False,
                    qkv_bias="none", weight_init="xavier")

    def __init__(self, encoder: nn.Module, options: AIMOptions):
        super().__init__(encoder, options)
        N = encoder.num_patches
        if N < 2:
            raise ValueError(f"AIM needs at least 2 patches to predict a next one; got {N} (img_size "
                             f"{encoder.img_size}, patch_size {encoder.patch_size}); use a smaller --patch-size")
        self.max_prefix = options.max_prefix or N - 1
        if self.max_prefix > N - 1:
            raise ValueError(f"aim.max_prefix {options.max_prefix} leaves nothing to predict: the image has "
                             f"{N} patches, so the prefix can hold at most {N - 1}; lower it or use 0 (= {N - 1})")
        if options.min_prefix > self.max_prefix:
            raise ValueError(f"aim.min_prefix {options.min_prefix} exceeds the largest prefix {self.max_prefix} "
                             f"for {N} patches; lower it")
        out_dim = encoder.patch_size ** 2 * encoder.in_chans
        self.head = L3MHead(encoder.embed_dim, out_dim, encoder.grid_size, options.head_width, options.head_depth,
                            options.head_mlp_ratio)
        self._init_trunk_as_l3m()
        self.mask_token = None
        if options.mode == "masked":
            self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.embed_dim))
            nn.init.normal_(self.mask_token, std=0.02)

    @torch.no_grad()
    def _init_trunk_as_l3m(self):
        """Where l3m's trunk init differs from the shared xavier init: separate q, k, v Linears, each
        xavier over (D, D) (drawn here a third of the fused qkv at a time), and the patch conv's bias
        left at PyTorch's default U(+-1/sqrt(fan_in)) (l3m re-draws only its weight)."""
        for blk in self.encoder.blocks:
            for part in blk.attn.qkv.weight.chunk(3, dim=0):
                nn.init.xavier_uniform_(part)
        conv = self.encoder.patch_embed.proj
        if conv.bias is not None:
            bound = 1.0 / math.sqrt(conv.weight[0].numel())
            nn.init.uniform_(conv.bias, -bound, bound)

    def sample_masking(self, generator):
        """Autoregressive: the prefix length S, a scalar long tensor. Masked: a (N,) bool mask."""
        N = self.encoder.num_patches
        if self.options.mode == "masked":
            num_masked = int(N * self.options.mask_ratio)
            mask = torch.zeros(N, dtype=torch.bool)
            mask[torch.randperm(N, generator=generator)[:num_masked]] = True
            return mask
        if self.options.attention == "causal":
            return torch.tensor(1)  # prefix of one patch == plain causal attention
        return torch.randint(self.options.min_prefix, self.max_prefix + 1, (), generator=generator)

    def attention_mask(self, prefix_len: torch.Tensor):
        """(B,) prefix lengths -> the trunk's mask: a flex ``BlockMask`` (``attention_kernel``) or dense bool."""
        N, kernel = self.encoder.num_patches, self.options.attention_kernel
        if kernel == "flex" or (kernel == "auto" and prefix_len.device.type == "cuda"):
            if prefix_len.device.type != "cuda" and torch.is_grad_enabled():
                raise ValueError("aim.attention_kernel=flex trains only on CUDA (torch's flex_attention has no "
                                 "CPU backward); use attention_kernel=auto or sdpa on this device")
            return prefix_causal_block_mask(prefix_len, N)
        return prefix_causal_mask(prefix_len, N)  # (B, 1, N, N)

    def forward_trunk(self, images, prefix_len=None, mask=None):
        """-> (B, N, D) after the final norm: prefix-causal with ``prefix_len`` (B,), masked with ``mask``."""
        x = self.encoder.embed(images, mask=mask, mask_token=self.mask_token)  # (B, N, D)
        attn_mask = self.attention_mask(prefix_len) if prefix_len is not None else None
        return self.encoder.forward_tokens(x, attn_mask=attn_mask)

    def forward_loss(self, images, pred, mask, shift: int = 1):
        """AIM's loss (Eq. 2), as ml-l3m's ``RasterPixelLoss.compute_loss``: output k of pred (B, N, P)
        regresses patch k + ``shift`` (0: the masked variant's own patch) of the per-patch normalised pixels;
        the MSE per patch is averaged over the target patches counted in mask (B, N) (non-prefix, or masked).
        -> (loss, target (B, N, P))"""
        target = pixel_targets(images, self.encoder.patch_size, self.options.norm_pix_loss)
        out, tgt = (pred[:, :-shift], target[:, shift:]) if shift else (pred, target)
        loss = ((out.float() - tgt.float()) ** 2).mean(dim=-1)  # (B, N - shift), per patch
        counted = mask[:, shift:]
        return (loss * counted).sum() / counted.sum().clamp_min(1.0), target

    def forward(self, images, masking=None):
        masking = self.masking_or_draw(images, masking)
        if self.options.mode == "masked":
            mask = masking.bool()  # (B, N)
            pred = self.head(self.forward_trunk(images, mask=mask))  # (B, N, P): each patch itself
            counted, shift = mask.to(pred.dtype), 0
        else:
            prefix_len = masking.long().reshape(-1)  # (B,)
            pred = self.head(self.forward_trunk(images, prefix_len))  # pred[:, k] regresses patch k + 1
            counted = (torch.arange(pred.shape[1], device=pred.device)[None] >= prefix_len[:, None]).to(pred.dtype)
            shift = 1
        loss, target = self.forward_loss(images, pred, counted, shift)
        return ObjectiveOutput(loss=loss, pred=pred, target=target, mask=counted)

    def no_weight_decay(self):
        """None: l3m's ``wd_exclude`` patterns (``*bias*``, ``*pos_embed*``, ``*norm*``, ``*gamma*``) select
        here only 1-D parameters, undecayed anyway; the mask token is decayed (docs/methods.md section 5)."""
        return set()

    @torch.no_grad()
    def reconstruct(self, images, masking=None):
        """Columns: the image, what the trunk was given, the predictions, predictions pasted in; each
        non-prefix patch predicted from the true patches before it (teacher forcing, as in training)."""
        out = self(images, masking)
        pred = out.pred
        if self.options.mode != "masked":  # put the prediction for patch t at t (nothing predicts patch 0)
            pred = torch.cat([torch.zeros_like(pred[:, :1]), pred[:, :-1]], dim=1)
        pred = predicted_pixels(pred.float(), images, self.encoder.patch_size, self.options.norm_pix_loss)
        predicted = patch_mask_to_pixels(out.mask, self.encoder.patch_size, self.encoder.grid_size)  # 1 = predicted
        if self.options.mode == "masked":
            return masked_columns(images, pred, 1 - predicted)
        seen = 1 - predicted
        return {"original": images, "prefix seen": images * seen, "next-patch predictions": pred * predicted,
                "predictions + prefix": images * seen + pred * predicted}
