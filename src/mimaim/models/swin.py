"""Swin Transformer (Liu et al., 2103.14030), SimMIM's second backbone: timm's ``SwinTransformer`` behind
the backbone contract of ``vit.py``. The mask token goes in after the patch norm (as SimMIM and HF);
``indices`` count stages; ``embed_dim`` is the first stage's width, ``num_features`` the last's.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
from timm.models.swin_transformer import SwinTransformer

from .layers import fill_masked
from .registry import register_model


def check_swin_sizes(img_size: int, patch_size: int, window_size: int, num_stages: int, name: str = "swin") -> None:
    """Raise ValueError unless the image tiles into whole stages and every stage fits the window."""
    stride = patch_size * 2 ** (num_stages - 1)
    if img_size % stride:
        raise ValueError(f"{name}: image size {img_size} is not a multiple of {stride} (patch {patch_size} x 2^"
                         f"{num_stages - 1} patch mergings), so the last stage's grid would not be whole; choose "
                         f"--img-size as a multiple of {stride}, e.g. {stride}, {2 * stride} or {7 * stride}")
    if window_size < 1:
        raise ValueError(f"{name}: window_size must be at least 1, got {window_size}")
    grids = [img_size // patch_size // 2 ** i for i in range(num_stages)]  # halved by each patch merging
    bad = [g for g in grids if g > window_size and g % window_size]
    if bad:
        fits = [w for w in range(1, grids[0] + 1) if all(g <= w or g % w == 0 for g in grids)]
        suggestion = max((w for w in fits if w <= window_size), default=fits[0])
        raise ValueError(
            f"{name}: window_size {window_size} does not fit image size {img_size}: the stage grids are "
            f"{', '.join(map(str, grids))} tokens per side and each must be a multiple of the window or no larger "
            f"than it, but {bad[0]} is neither. Choose a window size from {', '.join(map(str, fits))} "
            f"(e.g. --set objective.window_size={suggestion}), or an image size whose stage grids are multiples of "
            f"{window_size} (e.g. {window_size * stride})")


class Swin(SwinTransformer):
    """timm's ``SwinTransformer`` without a classifier; timm's parameter names, so its checkpoints load."""

    def __init__(self, img_size: int = 224, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96,
                 depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int = 7, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path_rate: float = 0.0):
        check_swin_sizes(img_size, patch_size, window_size, len(depths))
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=0,
                         embed_dim=embed_dim, depths=tuple(depths), num_heads=tuple(num_heads),
                         window_size=window_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                         drop_path_rate=drop_path_rate)
        self.img_size = img_size
        self.patch_size = patch_size
        self.window_size = window_size
        self.depths = tuple(depths)
        self.depth = sum(depths)
        self.num_heads = num_heads[-1]  # of the last stage, whose tokens probes read
        self.num_prefix_tokens = 0
        self.grid_size = tuple(self.patch_embed.grid_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.output_stride = patch_size * 2 ** (len(depths) - 1)  # SimMIM's encoder_stride (32 for Swin/4)
        self.final_grid_size = (self.grid_size[0] // 2 ** (len(depths) - 1),
                                self.grid_size[1] // 2 ** (len(depths) - 1))

    # ------------------------------------------------------------------ contract
    def embed(self, images: torch.Tensor, mask: torch.Tensor | None = None,
              mask_token: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, C0) normed patch tokens; ``mask`` (B, N) True -> ``mask_token`` (1, 1, C0)."""
        return fill_masked(self.patch_embed(images).flatten(1, 2), mask, mask_token)

    def forward_tokens(self, x: torch.Tensor, attn_mask=None, norm: bool = True) -> torch.Tensor:
        """(B, N, C0) patch tokens -> (B, N_final, C) after the stages (and the final norm)."""
        if attn_mask is not None:
            raise ValueError("Swin attends within shifted windows and takes no attention mask; "
                             "use a ViT backbone for objectives that need one")
        x = self.layers(x.reshape(x.shape[0], *self.grid_size, x.shape[-1]))  # timm's stages work on NHWC
        return (self.norm(x) if norm else x).flatten(1, 2)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N_final, C) after the final norm; no masking."""
        return self.forward_tokens(self.embed(images))

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's stage outputs with the ViT's signature (``norm`` on the last stage only; a Swin has no
        prefix tokens, so ``return_prefix_tokens`` changes nothing)."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be NCHW or NLC, got {output_fmt!r}")
        out = super().forward_intermediates(x, indices=indices, norm=norm, stop_early=stop_early,
                                            intermediates_only=intermediates_only)
        final, inter = (None, out) if intermediates_only else out
        if output_fmt == "NLC":
            inter = [t.flatten(2).transpose(1, 2) for t in inter]
        return inter if intermediates_only else (final.flatten(1, 2), inter)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_features(images)


# Swin-T and Swin-B (Swin paper Table 1; SimMIM's swin_base configs): width, depths, heads.
register_model("swin_tiny", family="swin")(partial(Swin, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)))
register_model("swin_base", family="swin")(partial(Swin, embed_dim=128, depths=(2, 2, 18, 2),
                                                    num_heads=(4, 8, 16, 32)))
