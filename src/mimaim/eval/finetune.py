"""``mimaim finetune``: end-to-end fine-tuning of a pre-trained encoder, MAE/BEiT recipe.

MAE (2111.06377) App. A.1 / Table 9, as ``facebookresearch/mae`` ``main_finetune.py`` runs it:

* the encoder is rebuilt with stochastic depth (``drop_path``) and loaded with the
  pre-trained weights; a head reads the **global average of the patch tokens** of the last
  block through ``fc_norm`` (the encoder's final norm is dropped, as MAE's ``global_pool``
  does), initialised truncated normal std 2e-5;
* AdamW (0.9, 0.999), weight decay 0.05 (not on 1-D parameters, position table, cls);
  ``lr = blr x batch / 256``; linear warm-up then cosine to ``min_lr``, stepped per iteration;
* **layer-wise learning-rate decay** (BEiT 2106.08254 Sec. 3, MAE ``lr_decay.py``): layer id
  0 = cls / position table / patch embedding, block i -> i + 1, everything else (fc_norm,
  head) -> depth + 1; a parameter's lr is scaled by ``layer_decay ** (depth + 1 - id)``;
* RandAugment m9-mstd0.5-inc1, random erasing 0.25, mixup 0.8 / cutmix 1.0 with label
  smoothing 0.1 through timm (``create_transform``, ``Mixup``, ``SoftTargetCrossEntropy``).

Fine-tuning at another resolution than pre-training re-derives the position table
(``resize_pos_embed``): a fixed sin-cos table is recomputed for the new grid (exact); a
learned one is interpolated bicubically (as timm's ``resample_abs_pos_embed``). BEiT's
relative position bias table is interpolated the same way.

Departures, stated: the reported top-1 is the one after the last epoch (MAE's log reports
the best epoch, which selects on the evaluation set); defaults are shorter (``epochs``,
``warmup_epochs``) for CPU budgets.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..data import IMAGENET_MEAN, IMAGENET_STD, Source, eval_transform
from ..engine.optim import cosine_lr, set_lr
from ..models.layers import sincos_2d

INITS = ("pretrained", "random")


@dataclass
class FinetuneConfig:
    epochs: int = 10
    batch_size: int = 64
    blr: float = 5e-4  # MAE ViT-B (FINETUNE.md); lr = blr x batch / 256
    lr: float | None = None
    min_lr: float = 1e-6
    warmup_epochs: float = 1.0  # MAE: 5 of 100 epochs
    weight_decay: float = 0.05
    layer_decay: float = 0.75  # MAE paper Table 9 (the repo uses 0.65 for ViT-B)
    drop_path: float = 0.1
    smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    img_size: int | None = None  # None: the pre-training resolution
    data: str | None = None  # None: the run's own data
    init: str = "pretrained"  # pretrained | random (the "from scratch" baseline)
    seed: int = 0
    device: str = "cpu"
    num_workers: int = 0
    max_steps: int | None = None  # stop early (tests); the schedule still follows epochs
    progress: bool = True

    def effective_lr(self) -> float:
        return self.lr if self.lr is not None else self.blr * self.batch_size / 256

    def validate(self) -> "FinetuneConfig":
        def need(cond, msg):
            if not cond:
                raise ConfigError(msg)
        need(self.epochs > 0, f"finetune epochs must be positive, got {self.epochs}")
        need(self.batch_size > 0, f"finetune batch_size must be positive, got {self.batch_size}")
        need(0 < self.layer_decay <= 1, f"layer_decay must be in (0, 1], got {self.layer_decay}; 1 turns it off")
        need(0 <= self.drop_path < 1, f"drop_path must be in [0, 1), got {self.drop_path}")
        need(0 <= self.smoothing < 1, f"smoothing must be in [0, 1), got {self.smoothing}")
        need(self.mixup >= 0 and self.cutmix >= 0, "mixup and cutmix must be >= 0 (0 turns each off)")
        need(not self.uses_mixup() or self.batch_size % 2 == 0,
             f"mixup/cutmix pair images within a batch and need an even batch size, got {self.batch_size}; "
             "pass an even --batch-size or --mixup 0 --cutmix 0")
        need(self.init in INITS, f"init: unknown value {self.init!r}; choose one of {', '.join(INITS)}")
        need(self.img_size is None or self.img_size > 0, f"img_size must be positive, got {self.img_size}")
        return self

    def uses_mixup(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0


# --------------------------------------------------------------------------- position tables
def resize_pos_embed(pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int],
                     num_prefix_tokens: int, kind: str = "learned") -> torch.Tensor:
    """(1, prefix + h*w, D) -> (1, prefix + h'*w', D) for a new patch grid.

    ``kind="sincos"``: the fixed table is recomputed for the new grid (what MAE would have
    built at that size); ``kind="learned"``: the grid part is resized bicubically
    (align_corners=False), prefix rows (cls) are kept as they are.
    """
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    D = pos_embed.shape[-1]
    if pos_embed.shape[1] != num_prefix_tokens + old_grid[0] * old_grid[1]:
        raise ValueError(f"position table of {pos_embed.shape[1]} rows does not match a {old_grid} grid "
                         f"with {num_prefix_tokens} prefix token(s)")
    if kind == "sincos":
        return sincos_2d(D, new_grid, num_prefix_tokens)[None].to(pos_embed)
    if kind != "learned":
        raise ValueError(f"kind must be sincos or learned, got {kind!r}")
    if old_grid == new_grid:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    grid = grid.reshape(1, *old_grid, D).permute(0, 3, 1, 2).float()  # (1, D, h, w)
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], D).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def resize_rel_pos_bias_table(table: torch.Tensor, old_grid: tuple[int, int],
                              new_grid: tuple[int, int]) -> torch.Tensor:
    """BEiT's ((2h-1)(2w-1) + 3, heads) table -> the table for a new grid (bicubic; 3 cls rows kept)."""
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if old_grid == new_grid:
        return table
    (h, w), (nh, nw), heads = old_grid, new_grid, table.shape[1]
    grid = table[:-3].T.reshape(1, heads, 2 * h - 1, 2 * w - 1).float()
    grid = F.interpolate(grid, size=(2 * nh - 1, 2 * nw - 1), mode="bicubic", align_corners=False)
    return torch.cat([grid.reshape(heads, -1).T.to(table.dtype), table[-3:]], dim=0)


# --------------------------------------------------------------------------- layer-wise decay
def layer_id(name: str, depth: int) -> int:
    """MAE ``get_layer_id_for_vit`` on a ``Classifier`` parameter name (METHODS.md Sec. 1).

    ``patch_norm`` (AIM's LayerNorm after the patch projection) is part of the embedding: id 0.
    """
    name = name.removeprefix("encoder.")
    if name in ("cls_token", "pos_embed", "mask_token") or name.startswith(("patch_embed", "patch_norm")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups_lrd(model: nn.Module, depth: int, weight_decay: float, layer_decay: float,
                     no_weight_decay: set[str] = frozenset()) -> list[dict]:
    """AdamW groups per (layer id, decay or not), each with ``lr_scale = layer_decay ** (depth + 1 - id)``.

    No weight decay on 1-D parameters (biases, norms) and names in ``no_weight_decay``, as
    MAE's ``param_groups_lrd``. Each group also lists its parameter ``names``.
    """
    num_layers = depth + 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (param.ndim == 1 or name in no_weight_decay)
        lid = layer_id(name, depth)
        group = groups.setdefault((lid, decay), {
            "params": [], "names": [], "layer_id": lid, "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": layer_decay ** (num_layers - lid)})
        group["params"].append(param)
        group["names"].append(name)
    return [groups[k] for k in sorted(groups)]


# --------------------------------------------------------------------------- model
class Classifier(nn.Module):
    """Encoder -> mean of the last block's patch tokens -> fc_norm -> head (MAE ``global_pool``)."""

    def __init__(self, encoder: nn.Module, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.encoder.norm = nn.Identity()  # MAE deletes the final norm under global pooling; fc_norm replaces it
        self.fc_norm = nn.LayerNorm(encoder.embed_dim, eps=1e-6)
        self.head = nn.Linear(encoder.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in getattr(self.encoder, "no_weight_decay", lambda: set())()}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.encoder.forward_tokens(self.encoder.embed(images), norm=False)  # (B, prefix + N, D)
        x = x[:, self.encoder.num_prefix_tokens:].mean(dim=1)  # (B, D)
        return self.head(self.fc_norm(x))  # (B, classes)


def build_finetune_encoder(cfg, img_size: int, drop_path: float, pretrained_encoder: nn.Module | None):
    """The run's backbone flavour rebuilt at ``img_size`` with stochastic depth, loaded with
    ``pretrained_encoder``'s weights (position tables resized) unless it is None."""
    from ..engine.trainer import resolved_objective_options
    from ..models import create_model, model_family
    from ..objectives import get_objective_class, parse_options

    cls = get_objective_class(cfg.objective)
    opts = parse_options(cls, resolved_objective_options(cfg))
    family = model_family(cfg.model)
    kwargs = dict(img_size=img_size, patch_size=cfg.patch_size)
    flavour = getattr(cls, "family_backbone_kwargs", None)
    kwargs.update(flavour(opts, family) if flavour else cls.backbone_kwargs(opts))
    if drop_path:
        kwargs["drop_path_rate"] = drop_path
    torch.manual_seed(cfg.seed)
    encoder = create_model(cfg.model, **kwargs)
    if pretrained_encoder is None:
        return encoder
    state = pretrained_encoder.state_dict()
    old_grid, new_grid = tuple(pretrained_encoder.grid_size), tuple(encoder.grid_size)
    if getattr(encoder, "pos_embed", None) is not None and "pos_embed" in state:
        state["pos_embed"] = resize_pos_embed(state["pos_embed"], old_grid, new_grid,
                                              encoder.num_prefix_tokens, encoder.pos_embed_kind)
    key = "rel_pos_bias.relative_position_bias_table"
    if key in state:
        state[key] = resize_rel_pos_bias_table(state[key], old_grid, new_grid)
    encoder.load_state_dict(state)
    return encoder


# --------------------------------------------------------------------------- data
class LabelledDataset(torch.utils.data.Dataset):
    def __init__(self, source: Source, transform):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        for attempt in range(16):  # an unreadable image is replaced by the next one
            i = (index + attempt) % len(self.source)
            try:
                return self.transform(self.source.load(i)), self.source.labels[i]
            except Exception:  # noqa: BLE001
                continue
        raise RuntimeError(f"16 consecutive images could not be read from {self.source.describe(index)}")


def train_transform(img_size: int, fcfg: FinetuneConfig):
    """MAE's fine-tuning augmentation via timm: RandomResizedCrop (bicubic) + flip + RandAugment + erasing."""
    from timm.data import create_transform

    return create_transform(img_size, is_training=True, color_jitter=None, auto_augment=fcfg.auto_augment,
                            interpolation="bicubic", re_prob=fcfg.reprob, re_mode="pixel", re_count=1,
                            mean=IMAGENET_MEAN, std=IMAGENET_STD)


@torch.no_grad()
def evaluate(model: nn.Module, source: Source, img_size: int, device, batch_size: int = 256) -> float:
    """Top-1 (%) on ``source`` through the evaluation view (resize + centre crop)."""
    from ..engine.trainer import autocast_context

    loader = torch.utils.data.DataLoader(LabelledDataset(source, eval_transform(img_size)), batch_size=batch_size)
    model.eval()
    correct = total = 0
    for images, labels in loader:
        with autocast_context(device, "auto"):
            logits = model(images.to(device))
        correct += (logits.argmax(dim=1).cpu() == labels).sum().item()
        total += len(labels)
    return 100.0 * correct / max(total, 1)


# --------------------------------------------------------------------------- the loop
def finetune(run_dir: str | Path, fcfg: FinetuneConfig | None = None) -> dict:
    """Fine-tune the encoder of ``run_dir``; returns (and saves to RUN_DIR/finetune*.json) the result."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from tqdm.auto import tqdm

    from ..engine.runs import load_run
    from ..engine.trainer import autocast_context
    from .probe_run import labelled_splits

    fcfg = (fcfg or FinetuneConfig()).validate()
    run_dir = Path(run_dir)
    cfg, objective, ckpt = load_run(run_dir)
    data = fcfg.data or cfg.data
    img_size = fcfg.img_size or cfg.img_size
    if img_size % cfg.patch_size:
        raise ConfigError(f"fine-tuning img_size {img_size} is not a multiple of the run's patch size "
                          f"{cfg.patch_size}; pass --img-size as a multiple of {cfg.patch_size}")
    train, val, num_classes = labelled_splits(data, cfg.val_fraction)  # fails early on unlabelled data
    if fcfg.batch_size > len(train):
        raise ConfigError(f"finetune batch size {fcfg.batch_size} is larger than the {len(train)} labelled "
                          "training images; lower --batch-size")
    device = torch.device(fcfg.device)

    pretrained = objective.encoder if fcfg.init == "pretrained" else None
    encoder = build_finetune_encoder(cfg, img_size, fcfg.drop_path, pretrained)
    torch.manual_seed(fcfg.seed)
    model = Classifier(encoder, num_classes).to(device)
    lr = fcfg.effective_lr()
    groups = param_groups_lrd(model, encoder.depth, fcfg.weight_decay, fcfg.layer_decay, model.no_weight_decay())
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups],
                                  lr=lr, betas=(0.9, 0.999))

    mixup = Mixup(mixup_alpha=fcfg.mixup, cutmix_alpha=fcfg.cutmix, label_smoothing=fcfg.smoothing,
                  num_classes=num_classes) if fcfg.uses_mixup() else None
    if mixup is not None:
        criterion = SoftTargetCrossEntropy()  # smoothing is folded into the mixed targets
    elif fcfg.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(fcfg.smoothing)
    else:
        criterion = nn.CrossEntropyLoss()

    random.seed(fcfg.seed)  # timm's Mixup and RandAugment draw from Python's and numpy's generators
    np.random.seed(fcfg.seed)
    dataset = LabelledDataset(train, train_transform(img_size, fcfg))
    steps_per_epoch = len(train) // fcfg.batch_size  # drop_last, as MAE
    total = steps_per_epoch * fcfg.epochs
    max_steps = total if fcfg.max_steps is None else min(total, fcfg.max_steps)
    tag = f"finetune{'' if img_size == cfg.img_size else f'-{img_size}px'}{'' if fcfg.init == 'pretrained' else '-random'}"
    print(f"mimaim finetune: {cfg.objective} {cfg.model} ({fcfg.init}) at {img_size}px on {data}: {len(train)} "
          f"train / {len(val)} held-out images, {num_classes} classes, {steps_per_epoch} steps/epoch x "
          f"{fcfg.epochs} epochs, lr {lr:.3g}, layer decay {fcfg.layer_decay}, drop path {fcfg.drop_path}",
          file=sys.stderr, flush=True)
    bar = tqdm(total=max_steps, desc=f"{cfg.objective} {tag}", unit="step", disable=not fcfg.progress,
               dynamic_ncols=True, mininterval=0.5)
    step, last_loss, t0 = 0, float("nan"), time.perf_counter()
    model.train()
    while step < max_steps:
        epoch = step // steps_per_epoch
        g = torch.Generator().manual_seed(fcfg.seed * 7919 + epoch)
        loader = torch.utils.data.DataLoader(dataset, batch_size=fcfg.batch_size, shuffle=True, drop_last=True,
                                             generator=g, num_workers=fcfg.num_workers)
        for images, labels in loader:
            set_lr(optimizer, cosine_lr(step / steps_per_epoch, lr, fcfg.min_lr, fcfg.warmup_epochs, fcfg.epochs))
            images, labels = images.to(device), labels.to(device)
            if mixup is not None:
                images, labels = mixup(images, labels)  # labels become (B, classes) soft targets
            with autocast_context(device, "auto"):
                loss = criterion(model(images), labels)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"fine-tuning loss became {loss.item()} at step {step}; "
                                         "lower --blr or --layer-decay")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            last_loss = loss.item()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.3f}")
            if step >= max_steps:
                break
    bar.close()
    wall = time.perf_counter() - t0
    top1 = evaluate(model, val, img_size, device)
    result = {"run": str(run_dir), "checkpoint": ckpt.name, "objective": cfg.objective, "model": cfg.model,
              "init": fcfg.init,
              "data": data, "train_images": len(train), "val_images": len(val), "num_classes": num_classes,
              "pretrain_img_size": cfg.img_size, "img_size": img_size, "steps": step, "final_loss": last_loss,
              "top1": round(top1, 2), "wall_time_s": round(wall, 2), "lr": lr,
              "config": {k: v for k, v in asdict(fcfg).items() if k not in ("progress", "device")}}
    (run_dir / f"{tag}.json").write_text(json.dumps(result, indent=2))
    print(f"fine-tuned top-1 on the held-out split: {top1:.2f}% ({step} steps, {wall:.1f}s) -> "
          f"{run_dir / (tag + '.json')}", file=sys.stderr, flush=True)
    return result
