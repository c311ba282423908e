"""Small layers shared by every backbone and objective.

Pure functions first (patchify, sin-cos tables, normalised-pixel targets), then the
attention and block modules. Shapes use B = batch, N = patches, T = tokens (patches plus
prefix tokens such as cls), D = width, p = patch size.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import DropPath, LayerScale, Mlp

try:  # fused masked attention (torch >= 2.5); dense SDPA is the fallback everywhere
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover - older torch
    BlockMask = flex_attention = None

_compiled_flex = None


def run_flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    """``flex_attention`` with a ``BlockMask``: compiled (fused kernel) on CUDA, eager elsewhere.

    Eager flex materialises the scores like the dense path; it exists on CPU so tests can
    check it against SDPA with a boolean mask.
    """
    global _compiled_flex
    if q.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=block_mask)
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return flex_attention(q, k, v, block_mask=block_mask)


# --------------------------------------------------------------------------- patches
def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C); raster order, rows of pixels, channels fastest (MAE)."""
    B, C, H, W = images.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} is not divisible by patch size {p}")
    h, w = H // p, W // p
    x = images.reshape(B, C, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)  # (B, h, w, p, p, C)
    return x.reshape(B, h * w, p * p * C)


def unpatchify(patches: torch.Tensor, patch_size: int, grid_size: tuple[int, int] | None = None,
               channels: int = 3) -> torch.Tensor:
    """(B, N, p*p*C) -> (B, C, H, W); inverse of :func:`patchify`."""
    B, N, _ = patches.shape
    p = patch_size
    if grid_size is None:
        h = w = int(round(math.sqrt(N)))
        if h * w != N:
            raise ValueError(f"{N} patches do not form a square grid; pass grid_size")
    else:
        h, w = grid_size
    x = patches.reshape(B, h, w, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(B, channels, h * p, w * p)


def normalized_pixel_targets(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch normalised pixels (MAE ``norm_pix_loss``, AIM's default target).

    (B, N, P) -> (B, N, P); mean and *unbiased* variance over each patch's P values, as
    the official code does with ``var(dim=-1)``.
    """
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps) ** 0.5


# --------------------------------------------------------------------------- sin-cos
def sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, embed_dim) as [sin(pos*omega), cos(pos*omega)], not interleaved."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even width, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # (D/2,)
    out = positions.reshape(-1).to(torch.float64)[:, None] * omega[None, :]  # (M, D/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(embed_dim: int, grid_size: int | tuple[int, int], num_prefix_tokens: int = 0) -> torch.Tensor:
    """Fixed 2-D sin-cos table, (num_prefix_tokens + h*w, embed_dim), float32.

    Follows MAE's ``get_2d_sincos_pos_embed``: the grid comes from ``meshgrid(w, h)``, so
    the first D/2 channels carry the *column* index and the second D/2 the row index.
    Prefix tokens (cls) get all-zero rows.
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {embed_dim}")
    h, w = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    cols, rows = torch.meshgrid(torch.arange(w, dtype=torch.float64), torch.arange(h, dtype=torch.float64),
                                indexing="xy")  # each (h, w)
    emb = torch.cat([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], dim=1)
    if num_prefix_tokens:
        emb = torch.cat([torch.zeros(num_prefix_tokens, embed_dim, dtype=torch.float64), emb], dim=0)
    return emb.float()


# --------------------------------------------------------------------------- attention
def relative_position_index(grid_size: tuple[int, int]) -> torch.Tensor:
    """BEiT's (N+1, N+1) index into a relative position bias table over a (h, w) grid plus cls.

    The table has (2h-1)(2w-1) + 3 rows: one per relative offset, then cls->token,
    token->cls and cls->cls.
    """
    h, w = grid_size
    num_relative_distance = (2 * h - 1) * (2 * w - 1) + 3
    coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).flatten(1)  # (2, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 2)
    rel[:, :, 0] += h - 1
    rel[:, :, 1] += w - 1
    rel[:, :, 0] *= 2 * w - 1
    N = h * w
    index = torch.zeros(N + 1, N + 1, dtype=torch.long)
    index[1:, 1:] = rel.sum(-1)
    index[0, 0:] = num_relative_distance - 3
    index[0:, 0] = num_relative_distance - 2
    index[0, 0] = num_relative_distance - 1
    return index


def num_relative_distance(grid_size: tuple[int, int]) -> int:
    """Rows of a relative position bias table over ``grid_size`` plus cls: (2h-1)(2w-1) + 3."""
    h, w = grid_size
    return (2 * h - 1) * (2 * w - 1) + 3


def gather_relative_bias(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(rows, heads) table, (T, T) index -> (heads, T, T) additive attention bias."""
    T = index.shape[0]
    return table[index.view(-1)].view(T, T, -1).permute(2, 0, 1).contiguous()


class RelativePositionBias(nn.Module):
    """BEiT's relative position bias over a (h, w) patch grid plus one cls token, shared by all blocks.

    The table has (2h-1)(2w-1) + 3 rows per head (see :func:`relative_position_index`).
    Fine-tuning copies it into one table per block (``Attention(rel_pos_grid=...)``).
    """

    def __init__(self, grid_size: tuple[int, int], num_heads: int):
        super().__init__()
        self.grid_size = tuple(grid_size)
        self.num_relative_distance = num_relative_distance(self.grid_size)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(self.num_relative_distance, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(self.grid_size), persistent=False)

    def forward(self) -> torch.Tensor:
        """-> (heads, N+1, N+1) additive attention bias."""
        return gather_relative_bias(self.relative_position_bias_table, self.relative_position_index)


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``.

    ``qkv_bias`` is "all" (q, k and v biased, as MAE/ViT), "qv" (BEiT: q and v biased,
    k bias fixed at zero) or "none" (AIM). ``attn_mask`` is a boolean (True = may attend)
    or additive mask broadcastable to (B, heads, T, T), or a flex-attention ``BlockMask``
    (AIM's prefix-causal mask on CUDA; see ``run_flex_attention``); ``rel_pos_bias`` is an
    additive (heads, T, T) bias.

    ``rel_pos_grid`` (h, w): the block owns a relative position bias table over that grid
    plus cls (``relative_position_bias_table``, BEiT's per-block mode, the official names
    ``blocks.i.attn.relative_position_bias_table``), added to any ``rel_pos_bias`` passed in.
    """

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
        if qkv_bias == "qv":
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        if rel_pos_grid is not None:
            rel_pos_grid = tuple(rel_pos_grid)
            self.relative_position_bias_table = nn.Parameter(
                torch.zeros(num_relative_distance(rel_pos_grid), num_heads))
            self.register_buffer("relative_position_index", relative_position_index(rel_pos_grid), persistent=False)
        else:
            self.relative_position_bias_table = None

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        B, T, D = x.shape
        if self.relative_position_bias_table is not None:
            if T != self.relative_position_index.shape[0]:
                raise ValueError("the relative position bias needs the full token grid plus cls; got "
                                 f"{T} tokens for a table over {self.relative_position_index.shape[0]}")
            own = gather_relative_bias(self.relative_position_bias_table, self.relative_position_index)
            rel_pos_bias = own if rel_pos_bias is None else rel_pos_bias + own
        if self.q_bias is not None:
            bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
            qkv = F.linear(x, self.qkv.weight, bias)
        else:
            qkv = self.qkv(x)
        qkv = qkv.reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, T, head_dim)
        if BlockMask is not None and isinstance(attn_mask, BlockMask):
            if rel_pos_bias is not None or (self.attn_drop and self.training):
                raise ValueError("a flex-attention BlockMask cannot be combined with a relative position bias "
                                 "or attention dropout; pass a dense boolean mask instead")
            x = run_flex_attention(q, k, v, attn_mask)
            return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, T, D)))
        mask = attn_mask
        dtype = q.dtype
        precision = contextlib.nullcontext()
        if q.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
            # On CPU the reduced-precision SDPA kernels run 3-5x slower than the fp32 ones at
            # ViT sizes (forward + backward), while bf16 matmuls run ~2.5x faster; so under
            # autocast only the Linears use bf16 and attention itself runs in fp32 (also more
            # exact). CPU autocast would cast SDPA's inputs back to bf16, hence it is paused.
            q, k, v = q.float(), k.float(), v.float()
            if mask is not None and mask.dtype != torch.bool:
                mask = mask.float()
            precision = torch.autocast("cpu", enabled=False)
        if rel_pos_bias is not None:
            bias = rel_pos_bias.to(q.dtype).unsqueeze(0)  # (1, heads, T, T)
            if mask is None:
                mask = bias
            elif mask.dtype == torch.bool:
                mask = bias.masked_fill(~mask, float("-inf"))
            else:
                mask = mask + bias
        with precision:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                               dropout_p=self.attn_drop if self.training else 0.0)
        x = x.to(dtype).transpose(1, 2).reshape(B, T, D)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), x + mlp(norm(x)), optional layer scale."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: str = "all",
                 bias: bool = True, drop_path: float = 0.0, init_values: float | None = None,
                 norm_layer=None, act_layer=nn.GELU, rel_pos_grid: tuple[int, int] | None = None):
        super().__init__()
        norm_layer = norm_layer or (lambda d: nn.LayerNorm(d, eps=1e-6))
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=bias, rel_pos_grid=rel_pos_grid)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, bias=bias)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, rel_pos_bias=rel_pos_bias)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


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
