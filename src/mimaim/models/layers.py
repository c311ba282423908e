"""Small layers shared by every backbone and objective: pixel patches and targets, sin-cos tables, relative
position bias, attention and the block. Shapes: B batch, N patches, T tokens (N + prefix), D width, p patch.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import DropPath, LayerScale, Mlp
from torch.nn.attention.flex_attention import BlockMask, flex_attention

_compiled_flex = None


def run_flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
    """``flex_attention`` with a ``BlockMask``: compiled (fused kernel) on CUDA, eager elsewhere (for tests)."""
    global _compiled_flex
    if q.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=block_mask)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return flex_attention(q, k, v, block_mask=block_mask)


# --------------------------------------------------------------------------- pixels (MAE, AIM, k-means)
def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C); raster order, rows of pixels, channels fastest (MAE)."""
    B, C, H, W = images.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} is not divisible by patch size {p}")
    x = images.reshape(B, C, H // p, p, W // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(patches: torch.Tensor, patch_size: int, grid_size: tuple[int, int] | None = None,
               channels: int = 3) -> torch.Tensor:
    """(B, N, p*p*C) -> (B, C, H, W); inverse of :func:`patchify` (a square grid unless ``grid_size``)."""
    B, N, _ = patches.shape
    p = patch_size
    h, w = grid_size or (round(N ** 0.5),) * 2
    if h * w != N:
        raise ValueError(f"{N} patches do not form a square grid; pass grid_size")
    x = torch.einsum("nhwpqc->nchpwq", patches.reshape(B, h, w, p, p, channels))
    return x.reshape(B, channels, h * p, w * p)


def normalized_pixel_targets(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch normalised pixels (B, N, P): mean and *unbiased* variance over each patch, as MAE's ``var(dim=-1)``."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps) ** 0.5


def pixel_targets(images: torch.Tensor, patch_size: int, norm_pix: bool = True) -> torch.Tensor:
    """MAE's and AIM's regression target: (B, C, H, W) -> patches (B, N, p*p*C), normalised when ``norm_pix``."""
    patches = patchify(images, patch_size)
    return normalized_pixel_targets(patches) if norm_pix else patches


def predicted_pixels(pred: torch.Tensor, images: torch.Tensor, patch_size: int, norm_pix: bool = True) -> torch.Tensor:
    """Predicted patches (B, N, p*p*C) -> pixels (B, C, H, W) laid out as ``images``; normalised
    predictions (``norm_pix``) get each true patch's mean and spread back, as the MAE demo draws them."""
    if norm_pix:
        patches = patchify(images, patch_size).float()
        pred = pred * (patches.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + patches.mean(dim=-1, keepdim=True)
    B, C, H, W = images.shape
    return unpatchify(pred, patch_size, (H // patch_size, W // patch_size), C)


def fill_masked(tokens: torch.Tensor, mask: torch.Tensor | None, mask_token: torch.Tensor | None) -> torch.Tensor:
    """(B, N, D) tokens with those where ``mask`` (B, N) is True replaced by ``mask_token`` (1, 1, D)."""
    if mask is None:
        return tokens
    w = mask.unsqueeze(-1).to(tokens.dtype)
    return tokens * (1 - w) + mask_token.to(tokens.dtype) * w


def patch_mask_to_pixels(mask: torch.Tensor, patch_size: int, grid_size: tuple[int, int]) -> torch.Tensor:
    """(B, N) per-patch mask -> (B, 1, H, W), each patch's value repeated over its pixels."""
    h, w = grid_size
    x = mask.reshape(-1, 1, h, w)
    return x.repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)


# --------------------------------------------------------------------------- sin-cos
def sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, embed_dim) as [sin(pos*omega), cos(pos*omega)], not interleaved."""
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0))
    out = positions.reshape(-1).to(torch.float64)[:, None] * omega[None, :]  # (M, D/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(embed_dim: int, grid_size: int | tuple[int, int], num_prefix_tokens: int = 0) -> torch.Tensor:
    """Fixed 2-D sin-cos table (num_prefix_tokens + h*w, embed_dim), float32, as MAE's ``get_2d_sincos_pos_embed``:
    the first D/2 channels carry the *column* index (``meshgrid(w, h)``), the second the row; prefix rows are 0."""
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {embed_dim}")
    h, w = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    cols, rows = torch.meshgrid(torch.arange(w, dtype=torch.float64), torch.arange(h, dtype=torch.float64),
                                indexing="xy")  # each (h, w)
    emb = torch.cat([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], dim=1)
    return torch.cat([torch.zeros(num_prefix_tokens, embed_dim, dtype=torch.float64), emb]).float()


# --------------------------------------------------------------------------- attention
def num_relative_distance(grid_size: tuple[int, int]) -> int:
    """Rows of a relative position bias table over ``grid_size`` plus cls: (2h-1)(2w-1) + 3."""
    h, w = grid_size
    return (2 * h - 1) * (2 * w - 1) + 3


def relative_position_index(grid_size: tuple[int, int]) -> torch.Tensor:
    """BEiT's (N+1, N+1) index into a bias table over a (h, w) grid plus cls: one row per relative
    offset, then cls->token, token->cls and cls->cls."""
    h, w = grid_size
    rows = num_relative_distance(grid_size)
    coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).flatten(1)  # (2, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 2)
    rel[:, :, 0] += h - 1
    rel[:, :, 1] += w - 1
    rel[:, :, 0] *= 2 * w - 1
    index = torch.zeros(h * w + 1, h * w + 1, dtype=torch.long)
    index[1:, 1:] = rel.sum(-1)
    index[0, 0:] = rows - 3
    index[0:, 0] = rows - 2
    index[0, 0] = rows - 1
    return index


def gather_relative_bias(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(rows, heads) table, (T, T) index -> (heads, T, T) additive attention bias."""
    T = index.shape[0]
    return table[index.view(-1)].view(T, T, -1).permute(2, 0, 1).contiguous()


class RelativePositionBias(nn.Module):
    """BEiT's relative position bias over a (h, w) patch grid plus cls, shared by all blocks (fine-tuning
    copies it into one table per block, ``Attention(rel_pos_grid=...)``)."""

    def __init__(self, grid_size: tuple[int, int], num_heads: int):
        super().__init__()
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_relative_distance(grid_size), num_heads))
        self.register_buffer("relative_position_index", relative_position_index(grid_size), persistent=False)

    def forward(self) -> torch.Tensor:
        """-> (heads, N+1, N+1) additive attention bias."""
        return gather_relative_bias(self.relative_position_bias_table, self.relative_position_index)


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``: ``qkv_bias`` "all" (MAE),
    "qv" (BEiT: no k bias) or "none" (AIM); ``attn_mask`` boolean (True = may attend), additive or a flex
    ``BlockMask``; an additive ``rel_pos_bias``, plus the block's own table when ``rel_pos_grid`` is given."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: str = "all", proj_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, rel_pos_grid: tuple[int, int] | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        if qkv_bias not in ("all", "qv", "none"):
            raise ValueError(f"qkv_bias must be one of all, qv, none; got {qkv_bias!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias == "all")
        qv = qkv_bias == "qv"
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qv else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qv else None
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        self.relative_position_bias_table = None
        if rel_pos_grid is not None:
            rel_pos_grid = tuple(rel_pos_grid)
            self.relative_position_bias_table = nn.Parameter(
                torch.zeros(num_relative_distance(rel_pos_grid), num_heads))
            self.register_buffer("relative_position_index", relative_position_index(rel_pos_grid), persistent=False)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | BlockMask | None = None,
                rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        B, T, D = x.shape
        if self.relative_position_bias_table is not None:
            if T != self.relative_position_index.shape[0]:
                raise ValueError("the relative position bias needs the full token grid plus cls; got "
                                 f"{T} tokens for a table over {self.relative_position_index.shape[0]}")
            own = gather_relative_bias(self.relative_position_bias_table, self.relative_position_index)
            rel_pos_bias = own if rel_pos_bias is None else rel_pos_bias + own
        bias = None if self.q_bias is None else torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias if bias is not None else self.qkv.bias)
        q, k, v = qkv.reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if isinstance(attn_mask, BlockMask):
            if rel_pos_bias is not None or (self.attn_drop and self.training):
                raise ValueError("a flex-attention BlockMask cannot be combined with a relative position bias "
                                 "or attention dropout; pass a dense boolean mask instead")
            x = run_flex_attention(q, k, v, attn_mask)
            return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, T, D)))
        mask, dtype, precision = attn_mask, q.dtype, contextlib.nullcontext()
        if q.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
            # on CPU reduced-precision SDPA runs several times slower than fp32 at ViT sizes, while bf16
            # matmuls run faster: under autocast only the Linears use bf16 (autocast paused for SDPA)
            q, k, v = q.float(), k.float(), v.float()
            if mask is not None and mask.dtype != torch.bool:
                mask = mask.float()
            precision = torch.autocast("cpu", enabled=False)
        if rel_pos_bias is not None:
            rel = rel_pos_bias.to(q.dtype).unsqueeze(0)  # (1, heads, T, T)
            if mask is None:
                mask = rel
            else:
                mask = rel.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else mask + rel
        with precision:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                               dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.to(dtype).transpose(1, 2).reshape(B, T, D)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), x + mlp(norm(x)), optional layer scale."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: str = "all",
                 bias: bool = True, drop_path: float = 0.0, init_values: float | None = None,
                 rel_pos_grid: tuple[int, int] | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=bias, rel_pos_grid=rel_pos_grid)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, bias=bias)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | BlockMask | None = None,
                rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, rel_pos_bias=rel_pos_bias)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def init_weights_xavier(module: nn.Module) -> None:
    """MAE's init: xavier_uniform Linears with zero bias, LayerNorm to (1, 0)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
