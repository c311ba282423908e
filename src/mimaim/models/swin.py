"""Swin Transformer behind the backbone contract: an adapter over timm's ``SwinTransformer``.

Swin (Liu et al., 2103.14030) is SimMIM's second backbone (SimMIM section 4.1; official
``SwinTransformerForSimMIM``). The network is timm's; this file only adds the contract
that objectives and probes use (see ``models/__init__.py`` and ``vit.py``):

* ``embed(images, mask, mask_token) -> (B, N, C0)``: patch conv **and its LayerNorm**
  (timm's ``patch_embed``, like the official Swin ``PatchEmbed`` with ``patch_norm``), then
  masked patches replaced by the mask token. SimMIM puts the token *after* the patch norm,
  and so does HF's ``SwinEmbeddings``.
* ``forward_tokens(tokens) -> (B, N_final, C)``: the four stages and the final norm;
  tokens come out flattened in raster order over the final (H/32, W/32) grid.
* ``forward_features``: the unmasked path for probes, with ``num_prefix_tokens = 0`` so
  probes pool by the mean of tokens.
* ``block_outputs(images, indices, norm)``: outputs of single blocks, indices running over
  all blocks of all stages in order (``depth = sum(depths)``); blocks averaged together
  must come from one stage, since each stage has its own width and grid.
* ``forward_intermediates``: timm's own (stage outputs, ``indices`` over the 4 stages), plus
  ``output_fmt="NLC"`` (tokens flattened in raster order) so it fits the ViT's contract.

Attribute names follow timm: ``embed_dim`` is the first stage's width (the width of the
mask token), ``num_features`` the last stage's (the width SimMIM's head reads).

Window sizes must fit the image the way the official Swin requires (it has no padding):
at every stage the token grid (``img_size / patch_size`` halved per stage) is either no
larger than the window (then the window shrinks to the grid and is not shifted, in timm,
HF and the official code alike) or a multiple of it. timm and HF would pad instead; we
stop at construction with a message naming the value and the fix.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
from timm.models.swin_transformer import SwinTransformer

from .registry import register_model


def swin_stage_grids(img_size: int, patch_size: int, num_stages: int) -> list[int]:
    """Token-grid side of each stage: img_size / patch_size, halved by each patch merging."""
    return [img_size // patch_size // 2 ** i for i in range(num_stages)]


def check_swin_sizes(img_size: int, patch_size: int, window_size: int, num_stages: int, name: str = "swin") -> None:
    """Raise ValueError unless the image tiles into whole stages and every stage fits the window."""
    stride = patch_size * 2 ** (num_stages - 1)
    if img_size % stride:
        raise ValueError(f"{name}: image size {img_size} is not a multiple of {stride} (patch {patch_size} x 2^"
                         f"{num_stages - 1} patch mergings), so the last stage's grid would not be whole; choose "
                         f"--img-size as a multiple of {stride}, e.g. {stride}, {2 * stride} or {7 * stride}")
    if window_size < 1:
        raise ValueError(f"{name}: window_size must be at least 1, got {window_size}")
    grids = swin_stage_grids(img_size, patch_size, num_stages)
    bad = [g for g in grids if g > window_size and g % window_size]
    if bad:
        fits = [w for w in range(1, grids[0] + 1) if all(g <= w or g % w == 0 for g in grids)]
        suggestion = max((w for w in fits if w <= window_size), default=fits[0])
        raise ValueError(
            f"{name}: window_size {window_size} does not fit image size {img_size}: the stage grids are "
            f"{', '.join(map(str, grids))} tokens per side and each must be a multiple of the window or no larger "
            f"than it, but {bad[0]} is neither. Choose a window size from {', '.join(map(str, fits))} "
            f"(e.g. --opt window_size={suggestion}), or an image size whose stage grids are multiples of "
            f"{window_size} (e.g. {window_size * stride})")


class Swin(SwinTransformer):
    """timm's ``SwinTransformer`` (no classifier head) honouring mimaim's backbone contract.

    The state dict keeps timm's names (``patch_embed.*``, ``layers.{i}.blocks.{j}.*``,
    ``layers.{i}.downsample.*``, ``norm.*``), so timm Swin checkpoints load directly.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96,
                 depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int = 7, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path_rate: float = 0.0):
        if img_size % patch_size:
            raise ValueError(f"swin: image size {img_size} is not divisible by patch size {patch_size}; "
                             f"choose --img-size as a multiple of --patch-size")
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
        x = self.patch_embed(images).flatten(1, 2)  # (B, N, C0), conv then LayerNorm
        if mask is not None:
            w = mask.unsqueeze(-1).to(x.dtype)
            x = x * (1 - w) + mask_token.to(x.dtype) * w
        return x

    def forward_tokens(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                       indices: Sequence[int] | None = None, norm: bool = True):
        """(B, N, C0) patch tokens -> (B, N_final, C) after the stages and the final norm.

        With ``indices`` (block numbers over all stages), also return those blocks' outputs,
        each flattened to (B, N_stage, C_stage): a tuple (final, [intermediates...]).
        """
        if attn_mask is not None:
            raise ValueError("Swin attends within shifted windows and takes no attention mask; "
                             "use a ViT backbone for objectives that need one")
        B, N, C = x.shape
        h, w = self.grid_size
        x = x.reshape(B, h, w, C)  # timm's stages work on NHWC
        wanted = set(indices) if indices is not None else set()
        intermediates, block_id = [], 0
        for stage in self.layers:
            x = stage.downsample(x)
            for blk in stage.blocks:
                x = blk(x)
                if block_id in wanted:
                    intermediates.append(x.flatten(1, 2))
                block_id += 1
        if norm:
            x = self.norm(x)
        x = x.flatten(1, 2)  # (B, N_final, C)
        return (x, intermediates) if indices is not None else x

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N_final, C) after the final norm; no masking."""
        return self.forward_tokens(self.embed(images))

    def stage_of_block(self, index: int) -> int:
        end = 0
        for stage, d in enumerate(self.depths):
            end += d
            if index < end:
                return stage
        raise IndexError(f"block {index} out of range for a Swin with {self.depth} blocks")

    def block_outputs(self, images: torch.Tensor, indices: Sequence[int] | int | None = None,
                      norm: bool = False) -> list[torch.Tensor]:
        """Outputs of the chosen blocks (numbered over all stages), each (B, N_stage, C_stage).

        ``indices``: None = the last block, int n = the last n blocks, negatives from the end.
        ``norm=True`` applies the final norm to blocks of the last stage (timm's convention:
        the other stages have another width and no norm of their own).
        """
        if indices is None:
            indices = [self.depth - 1]
        elif isinstance(indices, int):
            indices = list(range(self.depth - indices, self.depth))
        indices = [i % self.depth for i in indices]
        stages = {self.stage_of_block(i) for i in indices}
        if len(stages) > 1:
            bounds = []
            start = 0
            for s, d in enumerate(self.depths):
                bounds.append(f"stage {s}: blocks {start}-{start + d - 1}")
                start += d
            raise ValueError(f"Swin blocks {sorted(set(indices))} span stages {sorted(stages)}, whose tokens have "
                             f"different widths and grids, so they cannot be averaged; choose blocks of one stage "
                             f"({'; '.join(bounds)})")
        _, inter = self.forward_tokens(self.embed(images), indices=indices, norm=False)
        by_index = dict(zip(sorted(set(indices)), inter))
        out = [by_index[i] for i in indices]
        if norm and stages == {len(self.depths) - 1}:
            out = [self.norm(t) for t in out]
        return out

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """timm's ``SwinTransformer.forward_intermediates`` (stage outputs, NCHW), plus ``output_fmt="NLC"``.

        ``indices`` count stages (None = all, int n = the last n). NLC flattens each (B, C, h, w)
        stage map to (B, h*w, C) in raster order, the layout of ``forward_features``.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be NCHW or NLC, got {output_fmt!r}")
        out = super().forward_intermediates(x, indices=indices, norm=norm, stop_early=stop_early,
                                            output_fmt="NCHW", intermediates_only=intermediates_only)
        final, inter = (None, out) if intermediates_only else out
        if output_fmt == "NLC":
            inter = [t.flatten(2).transpose(1, 2) for t in inter]
        if intermediates_only:
            return inter
        return final.flatten(1, 2), inter

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_features(images)


# Swin-T and Swin-B (Swin paper Table 1; SimMIM's swin_base configs): width, depths, heads.
register_model("swin_tiny", family="swin")(partial(Swin, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)))
register_model("swin_base", family="swin")(partial(Swin, embed_dim=128, depths=(2, 2, 18, 2),
                                                    num_heads=(4, 8, 16, 32)))
