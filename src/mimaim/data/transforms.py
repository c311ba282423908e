"""Pre-training and evaluation transforms (torchvision), with ImageNet mean/std.

``Augmentation`` describes an objective's pre-training augmentation (each objective's official
recipe sets its own, see docs/methods.md sections 2-5); ``pretrain_transform`` builds it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


INTERPOLATIONS = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR,
                  "nearest": T.InterpolationMode.NEAREST, "lanczos": T.InterpolationMode.LANCZOS}


@dataclass
class Augmentation:
    """RandomResizedCrop, an optional flip and an optional ColorJitter (docs/methods.md section 1):
    ``color_jitter`` c means (c, c, c, 0) as BEiT's, a 4-tuple (brightness, contrast, saturation, hue) as AIM's;
    applied with ``jitter_prob``, before the crop (``jitter_first``, BEiT) or after crop and flip (AIM)."""
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    color_jitter: float | tuple[float, float, float, float] = 0.0
    jitter_prob: float = 1.0
    jitter_first: bool = True
    interpolation: str = "bicubic"

    def __post_init__(self):
        for name in ("crop_scale", "crop_ratio", "color_jitter"):  # YAML gives lists
            if isinstance(getattr(self, name), list):
                setattr(self, name, tuple(getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"augmentation.crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"augmentation.crop_ratio must be (low, high) with 0 < low <= high, got {self.crop_ratio}")
        jitter = self.jitter
        if len(jitter) != 4 or min(jitter) < 0 or jitter[3] > 0.5:
            raise ValueError(f"augmentation.color_jitter must be one float >= 0 or (brightness, contrast, saturation, "
                             f"hue) with hue <= 0.5, got {self.color_jitter!r}")
        if not 0 <= self.jitter_prob <= 1:
            raise ValueError(f"augmentation.jitter_prob must be in [0, 1], got {self.jitter_prob}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"augmentation.interpolation: unknown {self.interpolation!r}; choose one of "
                             f"{', '.join(INTERPOLATIONS)}")

    @property
    def jitter(self) -> tuple[float, float, float, float]:
        """(brightness, contrast, saturation, hue)."""
        if isinstance(self.color_jitter, (int, float)):
            c = float(self.color_jitter)
            return (c, c, c, 0.0)
        return tuple(float(v) for v in self.color_jitter)


def pretrain_transform(img_size: int, aug: Augmentation | None = None):
    """The pre-training transform for ``aug`` (default ``Augmentation()``): crop, flip, jitter, normalise."""
    aug = aug or Augmentation()
    jitter = None
    if any(aug.jitter) and aug.jitter_prob > 0:
        jitter = T.ColorJitter(*aug.jitter)
        if aug.jitter_prob < 1:
            jitter = T.RandomApply([jitter], p=aug.jitter_prob)
    ops = []
    if jitter is not None and aug.jitter_first:
        ops.append(jitter)
    ops.append(T.RandomResizedCrop(img_size, scale=tuple(aug.crop_scale), ratio=tuple(aug.crop_ratio),
                                   interpolation=INTERPOLATIONS[aug.interpolation]))
    if aug.hflip:
        ops.append(T.RandomHorizontalFlip())
    if jitter is not None and not aug.jitter_first:
        ops.append(jitter)
    ops += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(ops)


EVAL_CROP_PCT = 0.875  # the MAE/AIM probes' resize-then-crop ratio


def eval_resize(img_size: int) -> int:
    """The shorter side an image larger than ``img_size`` is resized to before its centre crop."""
    return math.ceil(img_size / EVAL_CROP_PCT)


def eval_transform(img_size: int):
    """Resize to ``eval_resize(img_size)`` (bicubic) and centre-crop, as the MAE/AIM probes do; an image no
    larger than the model input (digits, CIFAR at 32 px) is resized straight to img_size."""
    resize = eval_resize(img_size)

    def _resize(img):
        if max(img.size) <= img_size:
            return img.resize((img_size, img_size), resample=3)  # bicubic
        return T.functional.center_crop(T.functional.resize(img, resize, T.InterpolationMode.BICUBIC), img_size)

    return T.Compose([T.Lambda(_resize), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) normalised -> [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() * std + mean).clamp(0, 1)
