"""``mimaim finetune``: end-to-end fine-tuning of a pre-trained encoder, as MAE (2111.06377, App. A.1)
fine-tunes in ``main_finetune.py`` / ``models_vit.py`` / ``lr_decay.py``: global-pool head, layer-wise
lr decay, tables resized as docs/methods.md section 7 lists. Recipes ``paper`` (MAE's Table 9) and
``quick`` (small data, a BatchNorm before the head: docs/results.md, "Fine-tuning").
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import ConfigError
from ..data import IMAGENET_MEAN, IMAGENET_STD, Source, eval_transform
from ..engine.optim import lr_at, set_lr
from ..engine.precision import autocast_context
from ..engine.runs import open_backbone
from ..models import create_model
from ..models.layers import num_relative_distance, sincos_2d
from .probes import labelled_splits
from .recipes import FinetuneConfig

# --------------------------------------------------------------------------- position tables
def resize_pos_embed(pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int],
                     num_prefix_tokens: int, kind: str = "learned") -> torch.Tensor:
    """(1, prefix + h*w, D) -> (1, prefix + h'*w', D) for a new patch grid: a ``sincos`` table is
    recomputed (what MAE would have built at that size), a ``learned`` one resampled by timm (bicubic)."""
    from timm.layers import resample_abs_pos_embed

    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if pos_embed.shape[1] != num_prefix_tokens + old_grid[0] * old_grid[1]:
        raise ValueError(f"position table of {pos_embed.shape[1]} rows does not match a {old_grid} grid "
                         f"with {num_prefix_tokens} prefix token(s)")
    if kind == "sincos":
        return sincos_2d(pos_embed.shape[-1], new_grid, num_prefix_tokens)[None].to(pos_embed)
    if old_grid == new_grid:
        return pos_embed
    return resample_abs_pos_embed(pos_embed, list(new_grid), list(old_grid), num_prefix_tokens=num_prefix_tokens)


def resize_rel_pos_bias_table(table: torch.Tensor, old_grid: tuple[int, int],
                              new_grid: tuple[int, int]) -> torch.Tensor:
    """BEiT's ((2h-1)(2w-1) + 3, heads) table -> the table for a new grid (timm's
    ``resize_rel_pos_bias_table``: BEiT's interpolation; the 3 cls rows kept)."""
    from timm.layers import resize_rel_pos_bias_table as timm_resize

    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if old_grid == new_grid:
        return table
    return timm_resize(table, new_window_size=new_grid, new_bias_shape=(num_relative_distance(new_grid),
                                                                       table.shape[1]), old_window_size=old_grid)


# --------------------------------------------------------------------------- layer-wise decay
def layer_id(name: str, depth: int, depths: tuple[int, ...] | None = None) -> int:
    """Layer id of a ``Classifier`` parameter for layer-wise decay (MAE ``get_layer_id_for_vit``; SimMIM
    ``get_swin_layer`` with ``depths``): 0 for the embeddings, block i -> i + 1, the rest -> depth + 1; a
    Swin's patch merging before stage s takes the id of stage s - 1's last block (SimMIM's place for it)."""
    name = name.removeprefix("encoder.")
    if name in ("cls_token", "pos_embed", "mask_token", "absolute_pos_embed") or \
            name.startswith(("patch_embed", "patch_norm")):
        return 0
    parts = name.split(".")
    if depths is not None and parts[0] == "layers":
        stage = int(parts[1])
        if parts[2] == "downsample":
            return sum(depths[:stage])
        return sum(depths[:stage]) + int(parts[3]) + 1
    if parts[0] == "blocks":
        return int(parts[1]) + 1
    return depth + 1


def param_groups_lrd(model: "Classifier", weight_decay: float, layer_decay: float) -> list[dict]:
    """timm's ``param_groups_layer_decay`` (``lr_scale = layer_decay ** (depth + 1 - id)``), each group
    also listing its parameter ``names`` (dropped before the optimiser sees them)."""
    from timm.optim import param_groups_layer_decay

    groups = param_groups_layer_decay(model, weight_decay=weight_decay,
                                      no_weight_decay_list=sorted(model.no_weight_decay()), layer_decay=layer_decay)
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        g["names"] = [names[id(p)] for p in g["params"]]
    return groups


# --------------------------------------------------------------------------- model
class Classifier(nn.Module):
    """Encoder -> mean of the last block's patch tokens -> fc_norm -> head (MAE ``global_pool``)."""

    def __init__(self, encoder: nn.Module, num_classes: int, head_bn: bool = False):
        super().__init__()
        self.encoder = encoder
        self.encoder.norm = nn.Identity()  # MAE deletes the final norm under global pooling; fc_norm replaces it
        width = encoder.num_features  # Swin: the last stage's width
        self.fc_norm = nn.LayerNorm(width, eps=1e-6)
        # MAE main_linprobe.py: BatchNorm1d(affine=False, eps=1e-6) before the head; standardises each feature
        self.head_bn = nn.BatchNorm1d(width, affine=False, eps=1e-6) if head_bn else nn.Identity()
        self.head = nn.Linear(width, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()}

    def group_matcher(self, coarse: bool = False):
        """timm's hook for ``param_groups_layer_decay``: parameter name -> layer id (:func:`layer_id`)."""
        depth, depths = self.encoder.depth, getattr(self.encoder, "depths", None)
        return lambda name: layer_id(name, depth, depths)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # the last block's (Swin: stage's) patch tokens without the final norm, (B, D, h, w), cls left out
        x = self.encoder.forward_intermediates(images, indices=1, norm=False, intermediates_only=True)[-1]
        return self.head(self.head_bn(self.fc_norm(x.mean(dim=(2, 3)))))  # (B, classes)


def expand_shared_rel_pos_bias(state: dict, depth: int) -> dict:
    """A shared ``rel_pos_bias.relative_position_bias_table`` -> one copy per block
    (``blocks.i.attn.relative_position_bias_table``), as BEiT's ``run_class_finetuning.py``."""
    state = dict(state)
    table = state.pop("rel_pos_bias.relative_position_bias_table", None)
    if table is not None:
        for i in range(depth):
            state[f"blocks.{i}.attn.relative_position_bias_table"] = table.clone()
    return state


def build_finetune_encoder(record: dict, img_size: int, drop_path: float, pretrained: nn.Module | None,
                           seed: int = 0) -> nn.Module:
    """The record's backbone rebuilt for fine-tuning at ``img_size``: stochastic depth, one
    relative-bias table per block, a trainable position table; loaded with ``pretrained``'s
    weights (tables resized) unless it is None (then freshly initialised from ``seed``)."""
    kwargs = dict(record["backbone"]["kwargs"])
    kwargs["img_size"] = img_size
    if drop_path:
        kwargs["drop_path_rate"] = drop_path
    if kwargs.get("rel_pos_bias") in (True, "shared"):
        kwargs["rel_pos_bias"] = "per_block"
    torch.manual_seed(seed)
    encoder = create_model(record["backbone"]["name"], **kwargs)
    if pretrained is not None:
        state = pretrained.state_dict()
        old_grid, new_grid = tuple(pretrained.grid_size), tuple(encoder.grid_size)
        if getattr(encoder, "pos_embed", None) is not None and "pos_embed" in state:
            state["pos_embed"] = resize_pos_embed(state["pos_embed"], old_grid, new_grid,
                                                  encoder.num_prefix_tokens, encoder.pos_embed_kind)
        if getattr(encoder, "rel_pos_bias_mode", "none") == "per_block":
            state = expand_shared_rel_pos_bias(state, encoder.depth)
        for key in [k for k in state if k.endswith("relative_position_bias_table") and not k.startswith("layers.")]:
            state[key] = resize_rel_pos_bias_table(state[key], old_grid, new_grid)
        encoder.load_state_dict(state)
    if getattr(encoder, "pos_embed", None) is not None:
        encoder.pos_embed.requires_grad_(True)  # MAE models_vit.py: the sin-cos values, then trained
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
    """MAE's fine-tuning augmentation via timm: RandomResizedCrop (bicubic) [+ flip] [+ RandAugment] [+ erasing]."""
    from timm.data import create_transform

    aa = None if fcfg.auto_augment == "none" else fcfg.auto_augment
    return create_transform(img_size, is_training=True, scale=tuple(fcfg.crop_scale), hflip=0.5 if fcfg.hflip else 0.0,
                            color_jitter=None, auto_augment=aa, interpolation="bicubic", re_prob=fcfg.reprob,
                            re_mode="pixel", re_count=1, mean=IMAGENET_MEAN, std=IMAGENET_STD)


@torch.no_grad()
def evaluate(model: nn.Module, source: Source, img_size: int, device, batch_size: int = 256) -> float:
    """Top-1 (%) on ``source`` through the evaluation view (resize + centre crop)."""
    loader = torch.utils.data.DataLoader(LabelledDataset(source, eval_transform(img_size)), batch_size=batch_size)
    model.eval()
    correct = total = 0
    for images, labels in loader:
        with autocast_context(device, "auto"):
            logits = model(images.to(device))
        correct += (logits.argmax(dim=1).cpu() == labels).sum().item()
        total += len(labels)
    return 100.0 * correct / max(total, 1)


# --------------------------------------------------------------------------- the recipe
def build_criterion(fcfg: FinetuneConfig, num_classes: int):
    """-> (timm ``Mixup`` or None, loss): soft-target CE under mixup/cutmix (smoothing folded into the
    mixed targets), else label-smoothing CE, else plain CE."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if fcfg.uses_mixup():
        return Mixup(mixup_alpha=fcfg.mixup, cutmix_alpha=fcfg.cutmix, label_smoothing=fcfg.smoothing,
                     num_classes=num_classes), SoftTargetCrossEntropy()
    return None, LabelSmoothingCrossEntropy(fcfg.smoothing) if fcfg.smoothing > 0 else nn.CrossEntropyLoss()


def train_epochs(model: nn.Module, dataset, optimizer, criterion, mixup, fcfg: FinetuneConfig, device,
                 desc: str) -> tuple[int, float]:
    """The training loop: shuffled batches (drop_last, as MAE), per-step warm-up + cosine lr; stops after
    ``fcfg.epochs`` (or ``max_steps``). -> (steps, last loss)."""
    from tqdm.auto import tqdm

    random.seed(fcfg.seed)  # timm's Mixup and RandAugment draw from Python's and numpy's generators
    np.random.seed(fcfg.seed)
    steps_per_epoch = len(dataset) // fcfg.batch_size
    lr, total = fcfg.effective_lr(), steps_per_epoch * fcfg.epochs
    max_steps = total if fcfg.max_steps is None else min(total, fcfg.max_steps)
    bar = tqdm(total=max_steps, desc=desc, unit="step", disable=not fcfg.progress, dynamic_ncols=True,
               mininterval=0.5)
    step, last_loss = 0, float("nan")
    model.train()
    while step < max_steps:
        g = torch.Generator().manual_seed(fcfg.seed * 7919 + step // steps_per_epoch)
        loader = torch.utils.data.DataLoader(dataset, batch_size=fcfg.batch_size, shuffle=True, drop_last=True,
                                             generator=g, num_workers=fcfg.num_workers)
        for images, labels in loader:
            set_lr(optimizer, lr_at(step / steps_per_epoch, lr, fcfg.min_lr, fcfg.warmup_epochs, fcfg.epochs))
            images, labels = images.to(device), labels.to(device)
            if mixup is not None:
                images, labels = mixup(images, labels)  # labels become (B, classes) soft targets
            with autocast_context(device, "auto"):
                loss = criterion(model(images), labels)
            last_loss = loss.item()
            if not math.isfinite(last_loss):
                raise FloatingPointError(f"fine-tuning loss became {last_loss} at step {step}; "
                                         "lower --blr or --layer-decay")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.3f}")
            if step >= max_steps:
                break
    bar.close()
    return step, last_loss


def finetune(run_dir: str | Path, fcfg: FinetuneConfig | None = None) -> dict:
    """Fine-tune the encoder of ``run_dir``; returns (and saves to RUN_DIR/finetune*.json) the result."""
    fcfg = (fcfg or FinetuneConfig()).validate()
    run_dir = Path(run_dir)
    pretrained, record, ckpt = open_backbone(run_dir)
    data, img_size = fcfg.data or record["config"]["data"], fcfg.img_size or record["img_size"]
    if img_size % record["patch_size"]:
        raise ConfigError(f"fine-tuning img_size {img_size} is not a multiple of the run's patch size "
                          f"{record['patch_size']}; pass --img-size as a multiple of {record['patch_size']}")
    train, val, num_classes = labelled_splits(data, record["config"]["val_fraction"])  # fails early if unlabelled
    if fcfg.batch_size > len(train):
        raise ConfigError(f"finetune batch size {fcfg.batch_size} is larger than the {len(train)} labelled "
                          "training images; lower --batch-size")
    device = torch.device(fcfg.device)
    encoder = build_finetune_encoder(record, img_size, fcfg.drop_path, pretrained if fcfg.init == "pretrained"
                                     else None, seed=record["config"].get("seed", 0))
    del pretrained  # its weights are in the encoder now
    torch.manual_seed(fcfg.seed)
    model = Classifier(encoder, num_classes, head_bn=fcfg.head_bn).to(device)
    groups = param_groups_lrd(model, fcfg.weight_decay, fcfg.layer_decay)
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups],
                                  lr=fcfg.effective_lr(), betas=(0.9, 0.999))
    mixup, criterion = build_criterion(fcfg, num_classes)
    out = result_path(run_dir, fcfg, record["img_size"])
    objective, model_name = record["objective"], record["backbone"]["name"]
    print(f"mimaim finetune: {objective} {model_name} ({fcfg.init}) at {img_size}px on {data}, {fcfg.recipe} "
          f"recipe: {len(train)} train / {len(val)} held-out images, {num_classes} classes, "
          f"{len(train) // fcfg.batch_size} steps/epoch x {fcfg.epochs} epochs, lr {fcfg.effective_lr():.3g}, "
          f"layer decay {fcfg.layer_decay}, drop path {fcfg.drop_path}{', BatchNorm head' if fcfg.head_bn else ''}",
          file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    steps, last_loss = train_epochs(model, LabelledDataset(train, train_transform(img_size, fcfg)), optimizer,
                                    criterion, mixup, fcfg, device, desc=f"{objective} {out.stem}")
    wall = time.perf_counter() - t0
    top1 = evaluate(model, val, img_size, device)
    config = {k: v for k, v in asdict(fcfg).items() if k not in ("progress", "device")}
    config["crop_scale"] = list(config["crop_scale"])
    result = {"run": str(run_dir), "checkpoint": Path(ckpt).name, "objective": objective, "model": model_name,
              "init": fcfg.init, "recipe": fcfg.recipe, "data": data, "train_images": len(train),
              "val_images": len(val), "num_classes": num_classes, "pretrain_img_size": record["img_size"],
              "img_size": img_size, "steps": steps, "final_loss": last_loss, "top1": round(top1, 2),
              "wall_time_s": round(wall, 2), "lr": fcfg.effective_lr(), "config": config}
    out.write_text(json.dumps(result, indent=2))
    print(f"fine-tuned top-1 on the held-out split: {top1:.2f}% ({steps} steps, {wall:.1f}s) -> {out}",
          file=sys.stderr, flush=True)
    return result


def result_path(run_dir: str | Path, fcfg: FinetuneConfig, pretrain_img_size: int) -> Path:
    """RUN_DIR/finetune[-<size>px][-random].json: where ``finetune`` writes its result."""
    size = fcfg.img_size or pretrain_img_size
    return Path(run_dir) / (f"finetune{'' if size == pretrain_img_size else f'-{size}px'}"
                            f"{'' if fcfg.init == 'pretrained' else '-random'}.json")
