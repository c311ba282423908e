"""MAE: Masked Autoencoders Are Scalable Vision Learners (He et al., 2111.06377).

Section 3 of the paper, as ``facebookresearch/mae`` ``models_mae.py`` implements it: the encoder sees
only the visible 25% of patches, a light decoder fills in mask tokens and regresses each removed patch's
normalised pixels, MSE on removed patches only (docs/methods.md section 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..masking import mae_noise, random_masking, unshuffle
from ..models.layers import (Block, init_weights_xavier, patch_mask_to_pixels, pixel_targets, predicted_pixels,
                             sincos_2d)
from .base import Augmentation, Objective, ObjectiveOutput, ProbeProtocol, masked_columns, register_objective


@dataclass
class MAEOptions:
    mask_ratio: float = 0.75
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    norm_pix_loss: bool = True

    def validate(self):
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mae.mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.decoder_embed_dim % self.decoder_num_heads:
            raise ValueError(f"mae.decoder_embed_dim {self.decoder_embed_dim} is not divisible by "
                             f"decoder_num_heads {self.decoder_num_heads}")


@register_objective
class MAE(Objective):
    name = "mae"
    Options = MAEOptions
    augmentation = Augmentation(crop_scale=(0.2, 1.0))
    #: MAE main_linprobe.py (global_pool off): the cls token after the final norm
    probe_protocol = ProbeProtocol(pool="cls", layers=None, norm=True,
                                   source="facebookresearch/mae main_linprobe.py (cls token, final norm)")
    #: ``recipe: quick``: a small decoder so the built-in run takes minutes on a CPU; narrow rather than
    #: shallow, as MAE's Table 1 loses less linear-probe accuracy to width than to depth
    quick_options = {"decoder_embed_dim": 64, "decoder_depth": 2, "decoder_num_heads": 4}

    @classmethod
    def backbone_kwargs(cls, options):
        return dict(class_token=True, pos_embed="sincos", qkv_bias="all", weight_init="xavier")

    def __init__(self, encoder: nn.Module, options: MAEOptions):
        super().__init__(encoder, options)
        D, Dd = encoder.embed_dim, options.decoder_embed_dim
        p = encoder.patch_size
        self.decoder_embed = nn.Linear(D, Dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        table = sincos_2d(Dd, encoder.grid_size, num_prefix_tokens=encoder.num_prefix_tokens)[None]
        self.decoder_pos_embed = nn.Parameter(table, requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(Dd, options.decoder_num_heads, 4.0, qkv_bias="all") for _ in range(options.decoder_depth)
        ])
        self.decoder_norm = nn.LayerNorm(Dd, eps=1e-6)
        self.decoder_pred = nn.Linear(Dd, p * p * encoder.in_chans)
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            module.apply(init_weights_xavier)
        nn.init.normal_(self.mask_token, std=0.02)

    def sample_masking(self, generator):
        return mae_noise(self.encoder.num_patches, generator)  # (N,)

    def forward_encoder(self, images, noise=None):
        """-> latent (B, prefix + K, D) (prefix: the cls token, if the trunk has one), mask, ids_restore (B, N)."""
        x = self.encoder.embed(images)  # (B, N, D) with positions
        x, mask, ids_restore = random_masking(x, self.options.mask_ratio, noise)  # (B, K, D)
        return self.encoder.forward_tokens(x), mask, ids_restore

    def forward_decoder(self, latent, ids_restore):
        """-> per-patch predictions (B, N, p*p*3)."""
        x, p = self.decoder_embed(latent), self.encoder.num_prefix_tokens  # (B, p + K, Dd)
        B, N = ids_restore.shape
        mask_tokens = self.mask_token.expand(B, N + p - x.shape[1], -1)
        patches = unshuffle(torch.cat([x[:, p:], mask_tokens], dim=1), ids_restore)  # (B, N, Dd)
        x = torch.cat([x[:, :p], patches], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, p:]  # drop cls

    def forward_loss(self, images, pred, mask):
        """MAE's loss, as ``models_mae.forward_loss``: the MSE per patch against the pixels (per-patch
        normalised with ``norm_pix_loss``), averaged over the removed patches (mask 1). -> (loss, target)"""
        target = pixel_targets(images, self.encoder.patch_size, self.options.norm_pix_loss)
        loss = ((pred.float() - target.float()) ** 2).mean(dim=-1)  # (B, N), mean loss per patch
        return (loss * mask).sum() / mask.sum().clamp_min(1.0), target  # mean loss on removed patches

    def forward(self, images, masking=None):
        latent, mask, ids_restore = self.forward_encoder(images, masking)
        pred = self.forward_decoder(latent, ids_restore)
        loss, target = self.forward_loss(images, pred, mask)
        return ObjectiveOutput(loss=loss, pred=pred, target=target, mask=mask)

    def no_weight_decay(self):
        """None: ``main_pretrain.py`` uses timm's ``add_weight_decay`` without a skip list, so the cls and
        mask tokens are decayed (docs/methods.md section 2); the sin-cos tables are frozen."""
        return set()

    @torch.no_grad()
    def reconstruct(self, images, masking=None):
        out = self(images, masking)
        reconstruction = predicted_pixels(out.pred.float(), images, self.encoder.patch_size, self.options.norm_pix_loss)
        return masked_columns(images, reconstruction,
                              1 - patch_mask_to_pixels(out.mask, self.encoder.patch_size, self.encoder.grid_size))
