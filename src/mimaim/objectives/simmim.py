"""SimMIM: a Simple Framework for Masked Image Modeling (Xie et al., 2111.09886).

Section 3 of the paper, as ``microsoft/SimMIM`` implements it: random masking of coarse 32-px cells (3.1),
masked patches replaced by a mask token, a 1x1 conv + pixel shuffle head (3.3), L1 on masked pixels (3.2);
the official BEiT-style ViT, HF's plain ViT (``vit_flavour="plain"``) or timm's Swin (docs/methods.md 4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from ..masking import check_simmim_mask_sizes, simmim_mask
from ..models.layers import patch_mask_to_pixels
from .base import (Augmentation, Objective, ObjectiveOutput, ProbeProtocol, check_choice, masked_columns,
                   register_objective)

VIT_FLAVOURS = ("beit", "plain")


@dataclass
class SimMIMOptions:
    mask_ratio: float = 0.6
    mask_patch_size: int = 32  # pixels per side of a mask cell
    vit_flavour: str = "beit"  # beit: official SimMIM ViT | plain: HF ViTForMaskedImageModeling's ViT
    window_size: int = 6  # Swin only: the official Swin-B pre-training window (at 192 px)
    drop_path_rate: float = 0.1  # official ViT-B value (config.py default; the Swin-B preset sets 0.0)
    # the BEiT-style ViT's positions and layer scale, MODEL.VIT.USE_APE (a learned absolute table), USE_SHARED_RPB
    # (a relative bias, zero at init; without it the table is always there) and INIT_VALUES (0 disables it)
    use_ape: bool = False
    rel_pos_bias: bool = True
    layer_scale: float = 0.1

    def validate(self):
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"simmim.mask_ratio must be in (0, 1), got {self.mask_ratio}; the paper uses 0.6")
        if self.mask_patch_size < 1:
            raise ValueError(f"simmim.mask_patch_size must be a positive number of pixels, got {self.mask_patch_size}")
        check_choice("simmim", "vit_flavour", self.vit_flavour, VIT_FLAVOURS)
        if self.window_size < 1:
            raise ValueError(f"simmim.window_size must be at least 1, got {self.window_size}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"simmim.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")


@register_objective
class SimMIM(Objective):
    name = "simmim"
    Options = SimMIMOptions
    backbone_families = ("vit", "swin")
    # data/data_simmim.py: RandomResizedCrop(scale (0.67, 1), ratio (3/4, 4/3)) + flip, no jitter
    augmentation = Augmentation(crop_scale=(0.67, 1.0), crop_ratio=(3 / 4, 4 / 3), hflip=True, color_jitter=0.0,
                                interpolation="bilinear")  # data_simmim.py: torchvision's default interpolation
    #: the cls output never enters SimMIM's loss; SimMIM ships no linear-probe script, so the mean of patch tokens
    probe_protocol = ProbeProtocol(pool="mean", layers=None, norm=True,
                                   source="mean of patch tokens (SimMIM ships no linear-probe script; its cls output "
                                          "gets no gradient from the loss)")
    #: ``recipe: quick``: mask cells that tile the built-in 32-px images, a Swin window that fits them, no
    #: drop path, and fewer epochs (SimMIM runs the trunk over all tokens, MAE over a quarter); BEiT's quick ViT
    #: (one trunk for both): only USE_APE gives positions at step 0, the relative bias starts at zero and layer
    #: scale does not change how a patch shuffle moves the random trunk's features
    quick_options = {"mask_patch_size": 8, "window_size": 4, "drop_path_rate": 0.0, "use_ape": True,
                     "rel_pos_bias": False, "layer_scale": 0.0}
    quick_epochs = 10

    @classmethod
    def family_backbone_kwargs(cls, options, family):
        if family == "swin":
            return dict(window_size=options.window_size, drop_path_rate=options.drop_path_rate)
        if options.vit_flavour == "plain":
            return dict(class_token=True, pos_embed="learned", qkv_bias="all", weight_init="trunc_normal",
                        drop_path_rate=options.drop_path_rate)
        absolute = options.use_ape or not options.rel_pos_bias
        return dict(class_token=True, pos_embed="learned" if absolute else "none", qkv_bias="qv",
                    rel_pos_bias=options.rel_pos_bias, init_values=options.layer_scale or None,
                    weight_init="trunc_normal", drop_path_rate=options.drop_path_rate)

    @classmethod
    def backbone_kwargs(cls, options):
        return cls.family_backbone_kwargs(options, "vit")

    def __init__(self, encoder: nn.Module, options: SimMIMOptions):
        super().__init__(encoder, options)
        self.is_swin = hasattr(encoder, "output_stride")
        # encoder_stride: the pixels per final token (models/simmim.py: 16 for ViT, 32 for Swin)
        self.stride = encoder.output_stride if self.is_swin else encoder.patch_size
        self.out_grid = encoder.final_grid_size if self.is_swin else encoder.grid_size
        check_simmim_mask_sizes(encoder.img_size, options.mask_patch_size, encoder.patch_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.embed_dim))
        if self.is_swin:
            trunc_normal_(self.mask_token, std=0.02)  # SwinTransformerForSimMIM: bounds +-2
        else:
            trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)  # VisionTransformerForSimMIM: +-std
            if options.vit_flavour == "beit":
                # the official ViT's _init_weights also covers the patch conv
                trunc_normal_(encoder.patch_embed.proj.weight, std=0.02, a=-0.02, b=0.02)
                if encoder.patch_embed.proj.bias is not None:
                    nn.init.zeros_(encoder.patch_embed.proj.bias)
        # section 3.3: a linear head; PyTorch's default conv init, as the official decoder
        self.decoder = nn.Sequential(
            nn.Conv2d(encoder.num_features, self.stride ** 2 * encoder.in_chans, kernel_size=1),
            nn.PixelShuffle(self.stride),
        )

    def sample_masking(self, generator):
        e = self.encoder
        return simmim_mask(e.img_size, self.options.mask_patch_size, e.patch_size, self.options.mask_ratio,
                           generator)  # (N,) bool over the model's token grid

    def forward_encoder(self, images, mask):
        """images (B, 3, H, W), mask (B, N) -> feature map (B, C, H/stride, W/stride)."""
        x = self.encoder.embed(images, mask, self.mask_token)  # (B, N, D), masked patches -> mask token
        x = self.encoder.forward_tokens(x)[:, self.encoder.num_prefix_tokens:]  # (B, N', C) without cls
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *self.out_grid)

    def pixel_mask(self, mask):
        """(B, N) token mask -> (B, 1, H, W) pixel mask (1 = masked)."""
        return patch_mask_to_pixels(mask, self.encoder.patch_size, self.encoder.grid_size)

    def forward_loss(self, images, pred, mask):
        """SimMIM's loss (models/simmim.py): L1 over masked pixels, sum / (#masked pixels + 1e-5) / channels."""
        pixel_mask = self.pixel_mask(mask).to(torch.float32)
        per_pixel = F.l1_loss(pred.float(), images.float(), reduction="none")  # (B, 3, H, W)
        return (per_pixel * pixel_mask).sum() / (pixel_mask.sum() + 1e-5) / self.encoder.in_chans

    def forward(self, images, masking=None):
        mask = self.masking_or_draw(images, masking).bool()
        pred = self.decoder(self.forward_encoder(images, mask))  # (B, 3, H, W)
        loss = self.forward_loss(images, pred, mask)
        return ObjectiveOutput(loss=loss, pred=pred, target=images, mask=mask.to(images.dtype))

    def no_weight_decay(self):
        """The official skip lists (models/simmim.py, docs/methods.md section 4): the ViT's excludes only the
        cls token and position table; the Swin's also its relative position bias tables and the mask token."""
        if self.is_swin:
            return super().no_weight_decay() | {"mask_token"}
        return {"encoder.cls_token", "encoder.pos_embed"}

    @torch.no_grad()
    def reconstruct(self, images, masking=None):
        out = self(images, masking)
        return masked_columns(images, out.pred.float(), 1 - self.pixel_mask(out.mask).to(images.dtype))
