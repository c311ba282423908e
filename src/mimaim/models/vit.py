"""The Vision Transformer every ViT-based objective and probe shares; constructor arguments choose the
flavour of MAE, BEiT / SimMIM or AIM (docs/methods.md sections 1-5).

The backbone contract (shared with the Swin adapter): attributes ``embed_dim``, ``num_patches``,
``grid_size``, ``patch_size``, ``num_prefix_tokens``, ``depth``, ``num_heads``; ``embed`` (patch tokens
plus positions, masked ones replaced first), ``forward_tokens`` (prefix tokens, blocks, final norm; MAE
passes only its visible tokens), ``forward_features`` and timm's ``forward_intermediates`` (probes).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from timm.layers import PatchEmbed, trunc_normal_
from timm.models._features import feature_take_indices

from .layers import Block, RelativePositionBias, fill_masked, init_weights_xavier, sincos_2d


class VisionTransformer(nn.Module):
    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, class_token: bool = True,
                 pos_embed: str = "sincos",  # sincos | learned | none
                 qkv_bias: str = "all",  # all | qv | none
                 bias: bool = True,  # bias in attn.proj and the MLP
                 patch_norm: bool = False,  # LayerNorm right after the patch projection (AIM)
                 patch_bias: bool | None = None,  # the patch projection's; None: ``bias``, none before patch_norm
                 rel_pos_bias: bool | str = False,  # False/"none" | True/"shared" (BEiT) | "per_block" (fine-tuning)
                 init_values: float | None = None, drop_path_rate: float = 0.0,  # layer scale, stochastic depth
                 weight_init: str = "xavier"):  # xavier (MAE) | trunc_normal (BEiT)
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} is not divisible by patch size {patch_size}; "
                             f"choose --img-size as a multiple of --patch-size")
        if pos_embed not in ("sincos", "learned", "none"):
            raise ValueError(f"pos_embed must be one of sincos, learned, none; got {pos_embed!r}")
        mode = {False: "none", None: "none", True: "shared"}.get(rel_pos_bias, rel_pos_bias)
        if mode not in ("none", "shared", "per_block"):
            raise ValueError(f"rel_pos_bias must be one of none, shared, per_block (or a bool); got {rel_pos_bias!r}")
        self.rel_pos_bias_mode = mode
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = self.num_features = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.num_prefix_tokens = 1 if class_token else 0

        if patch_bias is None:
            patch_bias = bias or not patch_norm
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, bias=patch_bias)
        self.grid_size = tuple(self.patch_embed.grid_size)
        self.num_patches = self.patch_embed.num_patches
        self.patch_norm = nn.LayerNorm(embed_dim, eps=1e-6) if patch_norm else nn.Identity()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None

        self.pos_embed_kind = pos_embed
        if pos_embed == "sincos":
            table = sincos_2d(embed_dim, self.grid_size, self.num_prefix_tokens)[None]
            self.pos_embed = nn.Parameter(table, requires_grad=False)  # frozen, in the state dict (as MAE)
        elif pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + self.num_patches, embed_dim))
        else:
            self.pos_embed = None
        self.rel_pos_bias = RelativePositionBias(self.grid_size, num_heads) if mode == "shared" else None
        per_block = self.grid_size if mode == "per_block" else None

        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, bias=bias, drop_path=dpr[i],
                  init_values=init_values, rel_pos_grid=per_block)
            for i in range(depth)
        ])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.init_weights(weight_init)

    def init_weights(self, mode: str = "xavier") -> None:
        if mode == "xavier":
            self.apply(init_weights_xavier)
            w = self.patch_embed.proj.weight.data
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # the conv viewed as a Linear
            if self.patch_embed.proj.bias is not None:
                nn.init.zeros_(self.patch_embed.proj.bias)
            if self.cls_token is not None:
                nn.init.normal_(self.cls_token, std=0.02)
        elif mode == "trunc_normal":
            # BEiT ``_init_weights``: truncated normal clipped at +-std for Linears and the patch
            # Conv2d (zero biases), then block outputs rescaled by 1/sqrt(2l) (``fix_init_weight``)
            def _init(m):
                if isinstance(m, (nn.Linear, nn.Conv2d)):
                    trunc_normal_(m.weight, std=0.02, a=-0.02, b=0.02)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
            self.apply(_init)
            for layer_id, blk in enumerate(self.blocks, start=1):
                blk.attn.proj.weight.data.div_((2.0 * layer_id) ** 0.5)
                blk.mlp.fc2.weight.data.div_((2.0 * layer_id) ** 0.5)
            if self.cls_token is not None:
                trunc_normal_(self.cls_token, std=0.02, a=-0.02, b=0.02)
        else:
            raise ValueError(f"weight_init must be xavier or trunc_normal; got {mode!r}")
        if self.pos_embed_kind == "learned":  # BEiT / SimMIM (USE_APE): clipped at +-std as the rest of their init
            clip = dict(a=-0.02, b=0.02) if mode == "trunc_normal" else {}
            trunc_normal_(self.pos_embed, std=0.02, **clip)

    def no_weight_decay(self) -> set[str]:
        """Parameter names kept out of weight decay besides 1-D ones (biases, norms)."""
        names = {"pos_embed", "cls_token"}
        if self.rel_pos_bias is not None:
            names.add("rel_pos_bias.relative_position_bias_table")
        return names

    def embed(self, images: torch.Tensor, mask: torch.Tensor | None = None,
              mask_token: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, D) patch tokens plus absolute positions (no prefix tokens); ``mask`` (B, N)
        True patches are replaced by ``mask_token`` (1, 1, D) before the positions, as BEiT and SimMIM do."""
        x = fill_masked(self.patch_norm(self.patch_embed(images)), mask, mask_token)  # (B, N, D)
        if self.pos_embed is not None:
            x = x + self.pos_embed[:, self.num_prefix_tokens:]
        return x

    def add_prefix_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N', D) -> (B, prefix + N', D): cls (with its own position row) in front."""
        if self.cls_token is None:
            return x
        cls = self.cls_token
        if self.pos_embed is not None:
            cls = cls + self.pos_embed[:, :1]
        return torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)

    def _rel_bias(self, num_tokens: int) -> torch.Tensor | None:
        if self.rel_pos_bias is None:
            return None
        bias = self.rel_pos_bias()  # (heads, N+1, N+1)
        if num_tokens != bias.shape[-1]:
            raise ValueError("the relative position bias needs the full token grid plus cls; "
                             f"got {num_tokens} tokens for a table over {bias.shape[-1]}")
        return bias

    def forward_tokens(self, x: torch.Tensor, attn_mask=None, norm: bool = True) -> torch.Tensor:
        """Embedded tokens (B, N', D) -> (B, prefix + N', D): prefix tokens, the blocks, the final norm."""
        x = self.add_prefix_tokens(x)
        bias = self._rel_bias(x.shape[1])
        for blk in self.blocks:
            x = blk(x, attn_mask=attn_mask, rel_pos_bias=bias)
        return self.norm(x) if norm else x

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, prefix + N, D) after the final norm; no masking."""
        return self.forward_tokens(self.embed(images))

    def _take(self, indices) -> list[int]:
        """Block indices as timm's ``feature_take_indices`` (None = all, int n = the last n), range-checked."""
        if isinstance(indices, int) and not 0 < indices <= self.depth:
            raise ValueError(f"last-n block count {indices} is out of range (1 to {self.depth})")
        if not isinstance(indices, int) and indices is not None:
            bad = [i for i in indices if not -self.depth <= i < self.depth]
            if bad:
                raise ValueError(f"block indices {bad} are out of range for a {self.depth}-block ViT "
                                 f"(0 to {self.depth - 1}, or negative from the end)")
        return feature_take_indices(self.depth, indices)[0]

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's ``VisionTransformer.forward_intermediates`` contract (timm 1.0): the outputs of the blocks
        ``indices`` names (None all, n the last n), prefix tokens split off (paired with them when
        ``return_prefix_tokens``), after the final norm when ``norm``; ``(final, intermediates)``."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be NCHW or NLC, got {output_fmt!r}")
        take = self._take(indices)
        last = max(take) if stop_early else self.depth - 1
        tokens = self.add_prefix_tokens(self.embed(x))
        bias = self._rel_bias(tokens.shape[1])
        inter = []
        for i, blk in enumerate(self.blocks[:last + 1]):
            tokens = blk(tokens, rel_pos_bias=bias)
            if i in take:
                inter.append(self.norm(tokens) if norm else tokens)
        p = self.num_prefix_tokens
        spatial = [t[:, p:] for t in inter]
        if output_fmt == "NCHW":
            h, w = self.grid_size
            spatial = [t.reshape(t.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous() for t in spatial]
        out = list(zip(spatial, [t[:, :p] for t in inter])) if return_prefix_tokens and p else spatial
        return out if intermediates_only else (self.norm(tokens), out)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_features(images)
