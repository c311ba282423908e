"""Fine-tuning settings, declared once as ``PretrainConfig``'s are (``config.opt``): MAE's recipe
(``main_finetune.py``, FINETUNE.md) and a ``quick`` one sized for minutes on a CPU. A field left at
None takes its recipe's value; a value set explicitly wins. Light to import (no torch): the command
line is built from it."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import check_fields, need, opt

INITS = ("pretrained", "random")

RECIPES: dict[str, dict] = {
    "quick": dict(epochs=10, batch_size=64, blr=1e-2, warmup_epochs=1.0, layer_decay=0.75, drop_path=0.1,
                  smoothing=0.1, mixup=0.0, cutmix=0.0, auto_augment="none", reprob=0.0, crop_scale=(0.5, 1.0),
                  hflip=False, head_bn=True),
    # MAE FINETUNE.md / Table 9 (ViT-B; the repo's command uses layer decay 0.65)
    "paper": dict(epochs=100, batch_size=1024, blr=5e-4, warmup_epochs=5.0, layer_decay=0.75, drop_path=0.1,
                  smoothing=0.1, mixup=0.8, cutmix=1.0, auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25,
                  crop_scale=(0.08, 1.0), hflip=True, head_bn=False),
}


@dataclass
class FinetuneConfig:
    recipe: str = opt("quick", "quick: sized to show learning in minutes on a CPU; "
                               "paper: MAE's ViT-B recipe (FINETUNE.md)", choices=tuple(RECIPES))
    epochs: int | None = opt(None, "fine-tuning epochs (default: the recipe's)", must="> 0")
    batch_size: int | None = opt(None, "batch (default: the recipe's)", must="> 0")
    blr: float | None = opt(None, "base lr, lr = blr x batch/256 (default: the recipe's)")
    lr: float | None = opt(None, "absolute lr (overrides the base lr)")
    min_lr: float = opt(1e-6, "floor of the cosine schedule")
    warmup_epochs: float | None = opt(None, "warm-up epochs (default: the recipe's)")
    weight_decay: float = opt(0.05, "AdamW weight decay")
    layer_decay: float | None = opt(None, "layer-wise lr decay, 1 = off (default: the recipe's)", must="in (0, 1]")
    drop_path: float | None = opt(None, "stochastic depth (default: the recipe's)", must="in [0, 1)")
    smoothing: float | None = opt(None, "label smoothing (default: the recipe's)", must="in [0, 1)")
    mixup: float | None = opt(None, "mixup alpha, 0 = off (default: the recipe's)", must=">= 0")
    cutmix: float | None = opt(None, "cutmix alpha, 0 = off (default: the recipe's)", must=">= 0")
    auto_augment: str | None = opt(None, "timm RandAugment spec, 'none' = off (default: the recipe's)")
    reprob: float | None = opt(None, "random erasing probability (default: the recipe's)", must="in [0, 1]")
    crop_scale: tuple | None = opt(None, "RandomResizedCrop area range LOW,HIGH (default: the recipe's)")
    hflip: bool | None = opt(None, "random horizontal flip (default: the recipe's)")
    head_bn: bool | None = opt(None, "affine-free BatchNorm before the head, as MAE's linear probe "
                                     "(default: the recipe's)")
    img_size: int | None = opt(None, "fine-tuning resolution (default: the pre-training one; "
                                     "position tables are resized)", must="> 0")
    data: str | None = opt(None, "labelled data (default: the run's own data)")
    init: str = opt("pretrained", "pretrained (default) | random: the same trunk at random init "
                                  "(training from scratch)", choices=INITS)
    seed: int = opt(0, "random seed")
    device: str = opt("cpu", "cpu | cuda")
    num_workers: int = opt(0, "DataLoader workers")
    max_steps: int | None = opt(None, "stop after N steps (smoke tests; the schedule still follows epochs)")
    progress: bool = opt(True, "no progress bars", flag="--no-progress")

    def __post_init__(self):
        need(self.recipe in RECIPES, f"finetune recipe {self.recipe!r} is unknown; choose one of {', '.join(RECIPES)}")
        for key, value in RECIPES[self.recipe].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if isinstance(self.auto_augment, str) and self.auto_augment.lower() in ("none", "off", ""):
            self.auto_augment = "none"
        self.crop_scale = tuple(self.crop_scale)

    def effective_lr(self) -> float:
        return self.lr if self.lr is not None else self.blr * self.batch_size / 256

    def uses_mixup(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def validate(self) -> "FinetuneConfig":
        check_fields(self)
        need(not self.uses_mixup() or self.batch_size % 2 == 0,
             f"mixup/cutmix pair images within a batch and need an even batch size, got {self.batch_size}; "
             "pass an even --batch-size or --mixup 0 --cutmix 0")
        need(len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
             f"crop_scale must be two numbers 0 < lo <= hi <= 1, got {self.crop_scale}")
        return self
