"""Masking rules as small pure functions, drawn per sample in the data pipeline from a generator seeded by
(run seed, epoch, sample index), as the BEiT and SimMIM datasets do, so resumed and data-parallel runs
repeat a single-process run (docs/methods.md section 1). A mask is bool (N,) or (B, N), True = masked.
"""

from __future__ import annotations

import math

import torch


# --------------------------------------------------------------------------- MAE
def mae_noise(num_patches: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample uniform noise (N,) whose argsort defines MAE's random mask."""
    return torch.rand(num_patches, generator=generator)


def random_masking(tokens: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
    """MAE's per-sample random masking by argsort of uniform noise, small noise kept (models_mae.py): tokens
    (B, N, D), noise (B, N) -> visible (B, K = int(N * (1 - mask_ratio)), D), mask (B, N) 1 = removed, ids_restore."""
    B, N, D = tokens.shape
    len_keep = int(N * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(B, N, device=tokens.device)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small = keep
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]  # (B, K)
    visible = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
    mask = torch.ones(B, N, device=tokens.device, dtype=tokens.dtype)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # back to the original patch order
    return visible, mask, ids_restore


def unshuffle(tokens: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    """(B, N, D) tokens in shuffled order -> original patch order (MAE decoder step)."""
    D = tokens.shape[-1]
    return torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, D))


# --------------------------------------------------------------------------- SimMIM
def check_simmim_mask_sizes(img_size: int, mask_patch_size: int, model_patch_size: int) -> None:
    """SimMIM's ``MaskGenerator`` asserts: the mask cells tile the image and cover whole model patches."""
    if mask_patch_size <= 0 or img_size % mask_patch_size:
        divisors = [d for d in range(model_patch_size, img_size + 1, model_patch_size) if img_size % d == 0]
        raise ValueError(f"simmim.mask_patch_size {mask_patch_size} does not divide the image size {img_size}; "
                         "choose a mask patch size that divides it and is a multiple of the model patch size "
                         f"{model_patch_size} (one of {', '.join(map(str, divisors))}), e.g. --set "
                         f"objective.mask_patch_size={divisors[-1] if divisors else model_patch_size}, or change "
                         "--img-size")
    if mask_patch_size % model_patch_size:
        raise ValueError(f"simmim.mask_patch_size {mask_patch_size} is not a multiple of the model patch size "
                         f"{model_patch_size}: a mask cell must cover whole patches. Choose a multiple of "
                         f"{model_patch_size} that divides {img_size}, e.g. --set objective.mask_patch_size="
                         f"{model_patch_size * max(1, mask_patch_size // model_patch_size)}")


def simmim_mask(img_size: int, mask_patch_size: int, model_patch_size: int, mask_ratio: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """SimMIM's random masking of coarse cells (paper section 3.1, ``MaskGenerator``): ceil(cells * mask_ratio)
    cells picked by a random permutation, each repeated onto the model's token grid -> (N,) bool."""
    check_simmim_mask_sizes(img_size, mask_patch_size, model_patch_size)
    cells_per_side = img_size // mask_patch_size
    scale = mask_patch_size // model_patch_size
    num_cells = cells_per_side ** 2
    num_masked = int(-(-num_cells * mask_ratio // 1))  # ceil, as np.ceil in MaskGenerator
    masked_cells = torch.randperm(num_cells, generator=generator)[:num_masked]
    cells = torch.zeros(num_cells, dtype=torch.bool)
    cells[masked_cells] = True
    grid = cells.view(cells_per_side, cells_per_side)
    grid = grid.repeat_interleave(scale, dim=0).repeat_interleave(scale, dim=1)  # (h, w) tokens
    return grid.flatten()


# --------------------------------------------------------------------------- BEiT
def blockwise_mask(grid_size: tuple[int, int], num_masking_patches: int, min_num_patches: int = 16,
                   max_num_patches: int | None = None, min_aspect: float = 0.3, max_aspect: float | None = None,
                   generator: torch.Generator | None = None, blocks: list | None = None) -> torch.Tensor:
    """BEiT's blockwise masking (paper Algorithm 1, as unilm ``beit/masking_generator.py`` codes it): blocks
    of area ~ U(min_num_patches, remaining) and log-uniform aspect, up to 10 tries each, until the budget;
    a mask may end under the budget, never over it (the code, not the paper's "until > 0.4N"). Draws come
    from ``generator`` in place of Python's ``random``; ``blocks``, if a list, receives each accepted block."""
    H, W = grid_size
    max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
    max_aspect = max_aspect or 1.0 / min_aspect
    log_lo, log_hi = math.log(min_aspect), math.log(max_aspect)
    mask = torch.zeros(H, W, dtype=torch.bool)

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * torch.rand((), generator=generator, dtype=torch.float64).item()

    def randint(hi: int) -> int:  # 0..hi inclusive
        return int(torch.randint(0, hi + 1, (), generator=generator).item())

    def add_block(max_mask_patches: int) -> int:
        delta = 0
        for _attempt in range(10):
            target_area = uniform(min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(uniform(log_lo, log_hi))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < W and h < H:
                top, left = randint(H - h), randint(W - w)
                block = mask[top:top + h, left:left + w]
                new = h * w - int(block.sum())
                if 0 < new <= max_mask_patches:
                    block.fill_(True)
                    delta += new
                    if blocks is not None:
                        blocks.append(dict(area=target_area, aspect=aspect_ratio, remaining=max_mask_patches,
                                           h=h, w=w, added=new))
            if delta > 0:
                break
        return delta

    count = 0
    while count < num_masking_patches:
        delta = add_block(min(num_masking_patches - count, max_num_patches))
        if delta == 0:
            break
        count += delta
    return mask.flatten()


# --------------------------------------------------------------------------- I-JEPA
def ijepa_block_size(u: float, grid_size: tuple[int, int], scale: tuple[float, float],
                     aspect: tuple[float, float]) -> tuple[int, int]:
    """I-JEPA's block size (``MaskCollator._sample_block_size``): ONE uniform ``u`` sets both the scale and the
    aspect ratio; area int(N * scale), h = round(sqrt(area * aspect)), w = round(sqrt(area / aspect)), each
    kept below the grid side."""
    H, W = grid_size
    area = int(H * W * (scale[0] + u * (scale[1] - scale[0])))
    ratio = aspect[0] + u * (aspect[1] - aspect[0])
    return min(int(round(math.sqrt(area * ratio))), H - 1), min(int(round(math.sqrt(area / ratio))), W - 1)


def ijepa_place_block(size: tuple[int, int], grid_size: tuple[int, int], min_keep: int,
                      allowed: list[torch.Tensor] | None = None,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A block of ``size`` at a random corner (top in [0, H - h), as the official ``randint``), cut to the
    ``allowed`` regions, re-drawn until it keeps more than ``min_keep`` patches; after every 20 failures the
    last remaining region is dropped (``_sample_block_mask``). -> (kept (H, W) bool, whole block (H, W) bool)"""
    (h, w), (H, W) = size, grid_size
    allowed, tries, failures = allowed or [], 0, 0
    while True:
        top = int(torch.randint(0, H - h, (1,), generator=generator))
        left = int(torch.randint(0, W - w, (1,), generator=generator))
        block = torch.zeros(H, W, dtype=torch.bool)
        block[top:top + h, left:left + w] = True
        kept = block.clone()
        for region in allowed[:max(len(allowed) - tries, 0)]:
            kept &= region
        if int(kept.sum()) > min_keep:
            return kept, block
        failures += 1
        if failures == 20:
            tries, failures = tries + 1, 0
            if tries > len(allowed):
                raise ValueError(f"a {h}x{w} block never keeps more than min_keep={min_keep} patches; "
                                 "lower min_keep or raise the block scale")


def ijepa_multiblock(grid_size: tuple[int, int], num_targets: int = 4, target_scale=(0.15, 0.2),
                     target_aspect=(0.75, 1.5), context_scale=(0.85, 1.0), min_keep: int = 10,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """I-JEPA's multi-block masks for one image (paper Sec. 3, official ``MaskCollator``): a target size, a
    context size (aspect 1), ``num_targets`` target blocks, then one context block with every target block
    removed. -> (N,) int32 codes: bit k set = in target block k, bit ``num_targets`` = in the context."""
    target = ijepa_block_size(torch.rand(1, generator=generator).item(), grid_size, target_scale, target_aspect)
    context = ijepa_block_size(torch.rand(1, generator=generator).item(), grid_size, context_scale, (1.0, 1.0))
    code = torch.zeros(grid_size, dtype=torch.int32)
    outside = []
    for k in range(num_targets):
        block = ijepa_place_block(target, grid_size, min_keep, generator=generator)[0]
        code |= block.int() << k
        outside.append(~block)
    kept = ijepa_place_block(context, grid_size, min_keep, outside, generator)[0]
    return (code | kept.int() << num_targets).flatten()


def first_members(member: torch.Tensor) -> torch.Tensor:
    """(R, N) bool -> (R, K) indices of each row's first K True positions in raster order, K the smallest row
    count: how the official collator gives a batch's masks one length (``cm[:min_keep]``). One host sync."""
    K = int(member.sum(dim=1).min())
    return torch.argsort((~member).to(torch.uint8), dim=1, stable=True)[:, :K]
