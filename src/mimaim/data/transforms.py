"""Pre-training and evaluation transforms (torchvision), with ImageNet mean/std."""

from __future__ import annotations

import math

import torch
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pretrain_transform(img_size: int, crop_scale=(0.2, 1.0), crop_ratio=(3 / 4, 4 / 3), hflip: bool = True,
                       color_jitter: float = 0.0):
    """MAE's augmentation: RandomResizedCrop (bicubic) + flip + normalise; BEiT adds colour jitter."""
    ops = []
    if color_jitter:
        ops.append(T.ColorJitter(color_jitter, color_jitter, color_jitter))
    ops.append(T.RandomResizedCrop(img_size, scale=tuple(crop_scale), ratio=tuple(crop_ratio),
                                   interpolation=T.InterpolationMode.BICUBIC))
    if hflip:
        ops.append(T.RandomHorizontalFlip())
    ops += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(ops)


def eval_transform(img_size: int, crop_pct: float = 0.875):
    """Resize to img_size/crop_pct (bicubic) and centre-crop, as the MAE/AIM probes do.

    For images no larger than the model input (digits, CIFAR at 32 px) the crop keeps
    the whole image: resize straight to img_size.
    """
    resize = int(math.ceil(img_size / crop_pct))

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
