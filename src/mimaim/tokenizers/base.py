"""The visual-tokenizer contract BEiT's targets come through (paper section 2.1.2): ``encode`` maps [0, 1]
pixels at ``downsample`` pixels per token side to (B, h, w) ids; ``tokenize`` does so from the engine's
normalised images on the model's patch grid; ``decode`` (``has_decoder``) serves pictures only;
``in_checkpoint``: the weights are saved with the objective (k-means) or read from the user's file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data import denormalize


class VisualTokenizer(nn.Module):
    vocab_size: int = 0
    downsample: int = 1
    has_decoder: bool = False
    in_checkpoint: bool = False

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, ids: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no decoder")

    def input_size(self, grid_size: tuple[int, int]) -> tuple[int, int]:
        return grid_size[0] * self.downsample, grid_size[1] * self.downsample

    def to_input(self, images: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        """ImageNet-normalised (B, 3, H, W) -> [0, 1] pixels at the tokenizer's input size, resized with
        antialiased bicubic (BEiT resizes the PIL crop with Lanczos; here the crop is already a tensor)."""
        pixels = denormalize(images)  # (B, 3, H, W) in [0, 1]
        size = self.input_size(grid_size)
        if tuple(pixels.shape[-2:]) != size:
            pixels = F.interpolate(pixels, size=size, mode="bicubic", antialias=True, align_corners=False)
        return pixels.clamp(0, 1)

    @torch.no_grad()
    def tokenize(self, images: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, h, w) ids on the model's patch grid."""
        ids = self.encode(self.to_input(images, grid_size))
        if tuple(ids.shape[-2:]) != tuple(grid_size):
            raise ValueError(f"{type(self).__name__} gave a {tuple(ids.shape[-2:])} token grid for a model grid "
                             f"{tuple(grid_size)}; its downsampling {self.downsample} does not fit this image size")
        return ids


def id_colours(ids: torch.Tensor, vocab_size: int, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) ids -> (B, 3, H, W) colour-coded picture in [0, 1] (a fixed palette per id)."""
    palette = torch.rand(vocab_size, 3, generator=torch.Generator().manual_seed(1234)) * 0.8 + 0.1
    img = palette.to(ids.device)[ids].permute(0, 3, 1, 2)  # (B, 3, h, w)
    return F.interpolate(img, size=size, mode="nearest")
