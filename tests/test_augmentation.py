"""Pre-training augmentation: each objective's ``Augmentation`` builds the official pipeline.

The official pipelines are written out here as the official code has them (torchvision
objects, same order) and compared on the same image under the same torch seed:
MAE ``main_pretrain.py`` (facebookresearch/mae @ efb2a80), SimMIM ``data/data_simmim.py``
(microsoft/SimMIM @ d3e29bc), AIM ``configs/aimv1/001_aim_v1_600M.yaml`` (apple/ml-l3m @ e6376a3).
"""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from mimaim.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Augmentation, pretrain_transform
from mimaim.objectives import get_objective_class


def image(seed=0, size=(40, 30)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def same_outputs(ours, official, draws=6):
    img = image()
    for seed in range(draws):
        torch.manual_seed(seed)
        a = ours(img)
        torch.manual_seed(seed)
        b = official(img)
        torch.testing.assert_close(a, b, atol=0, rtol=0)


NORMALIZE = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)


def test_aim_matches_l3m_aimv1_train_transform():
    official = T.Compose([
        T.RandomResizedCrop(24, scale=(0.4, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
        T.ToTensor(), NORMALIZE])
    same_outputs(pretrain_transform(24, get_objective_class("aim").augmentation), official, draws=10)


def test_mae_and_simmim_match_their_official_transforms():
    mae = T.Compose([T.RandomResizedCrop(24, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                     T.RandomHorizontalFlip(), T.ToTensor(), NORMALIZE])
    same_outputs(pretrain_transform(24, get_objective_class("mae").augmentation), mae)
    simmim = T.Compose([T.RandomResizedCrop(24, scale=(0.67, 1.0), ratio=(3. / 4., 4. / 3.)),  # bilinear
                        T.RandomHorizontalFlip(), T.ToTensor(), NORMALIZE])
    same_outputs(pretrain_transform(24, get_objective_class("simmim").augmentation), simmim)


def test_beit_jitters_the_whole_image_before_the_crop():
    """unilm beit/datasets.py DataAugmentationForBEiT: ColorJitter(0.4, 0.4, 0.4), flip, crop (0.08, 1)."""
    ops = pretrain_transform(24, get_objective_class("beit").augmentation).transforms
    assert isinstance(ops[0], T.ColorJitter)
    assert ops[0].brightness == ops[0].contrast == ops[0].saturation == (0.6, 1.4) and ops[0].hue is None
    assert isinstance(ops[1], T.RandomResizedCrop) and ops[1].scale == (0.08, 1.0)
    assert ops[1].interpolation == T.InterpolationMode.BICUBIC


def test_the_default_augmentation_is_crop_flip_normalise():
    assert [type(t) for t in pretrain_transform(16).transforms] == [
        T.RandomResizedCrop, T.RandomHorizontalFlip, T.ToTensor, T.Normalize]


def test_jitter_probability_is_applied():
    """p=0.8: about 80% of draws change colours; the crop alone never does (scale 1, no flip, one size)."""
    aug = Augmentation(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=False, color_jitter=(0.4, 0.4, 0.2, 0.1),
                       jitter_prob=0.8, jitter_first=False)
    img = image(size=(24, 24))
    plain = T.Compose([T.ToTensor(), NORMALIZE])(img)
    transform = pretrain_transform(24, aug)
    torch.manual_seed(0)
    changed = [not torch.allclose(transform(img), plain) for _ in range(400)]
    assert 0.74 < np.mean(changed) < 0.86


def test_bad_values_name_the_field():
    with pytest.raises(ValueError, match="jitter_prob"):
        Augmentation(jitter_prob=1.5)
    with pytest.raises(ValueError, match="interpolation.*bicubic"):
        Augmentation(interpolation="cubic")
    with pytest.raises(ValueError, match="color_jitter"):
        Augmentation(color_jitter=(0.4, 0.4))
    with pytest.raises(ValueError, match="crop_scale"):
        Augmentation(crop_scale=(0.5, 0.2))
    assert Augmentation(color_jitter=[0.4, 0.4, 0.2, 0.1]).jitter == (0.4, 0.4, 0.2, 0.1)  # YAML lists
