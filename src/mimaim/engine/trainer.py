"""The pre-training loop: plain PyTorch, readable top to bottom.

    for each optimiser step:
        lr = cosine schedule with warm-up (per step, on fractional epochs)
        for each of accum_steps micro-batches:      # DDP syncs gradients on the last one
            loss = objective(images, masking) / accum_steps   # bf16 autocast if asked
            loss.backward()
        clip gradients (optional); optimizer.step()
        log; checkpoint every save_every steps and at each epoch's end

Everything objective-specific lives behind ``Objective`` (objectives/base.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from ..config import PretrainConfig, save_config
from ..data import (DataError, GlobalBatchSampler, PretrainDataset, build_source, check_bad_fraction,
                    make_loader, pretrain_transform)
from ..objectives import Objective, build_objective, get_objective_class
from .checkpoint import latest_checkpoint, load_state, load_weights, save_checkpoint
from .distributed import DistInfo, all_reduce_sum, cleanup, init_distributed, resolve_device
from .logging import MetricsLogger, read_metrics
from .optim import build_optimizer, cosine_lr, set_lr


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def resolved_objective_options(cfg: PretrainConfig) -> dict:
    """The user's options over the objective's quick defaults (``recipe: quick``) or the paper's."""
    cls = get_objective_class(cfg.objective)
    quick = getattr(cls, "quick_options", {}) if cfg.recipe == "quick" else {}
    return {**quick, **cfg.objective_options}


def build_run_objective(cfg: PretrainConfig) -> Objective:
    """The objective and backbone a config describes, freshly initialised from ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    return build_objective(cfg.objective, cfg.model, cfg.img_size, cfg.patch_size,
                           resolved_objective_options(cfg))


def training_subset(train, fraction: float, seed: int):
    """A deterministic ``fraction`` of each class of ``train`` (at least one image per class).

    Each class is shuffled once from ``seed`` and its first share kept, so smaller
    fractions are subsets of larger ones (0.1 inside 0.3 inside 1.0) for data-scaling runs.
    """
    if fraction >= 1.0:
        return train
    g = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(train.labels):
        by_class.setdefault(label, []).append(i)
    keep = []
    for label in sorted(by_class):
        idx = by_class[label]
        order = torch.randperm(len(idx), generator=g).tolist()
        keep.extend(idx[j] for j in order[:max(1, round(len(idx) * fraction))])
    return train.subset(sorted(keep))


def autocast_context(device: torch.device, precision: str):
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def default_num_workers(cfg: PretrainConfig, in_memory: bool) -> int:
    if cfg.num_workers >= 0:
        return cfg.num_workers
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_proc = max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if per_proc <= 2:
        # On a 2-core machine a worker competes with the model for the same cores; decoded
        # in-memory data is cheap enough to prepare in the main process.
        return 0 if in_memory else 1
    return min(8, per_proc - 1)


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def pretrain(cfg: PretrainConfig, resume: bool = False) -> Path:
    """Pre-train ``cfg.objective``; returns the run directory. ``resume`` continues ``cfg.out``."""
    device = resolve_device(cfg.device)
    dist_info = init_distributed(device)
    try:
        return _pretrain(cfg, resume, device, dist_info)
    finally:
        cleanup()


def _say(info: DistInfo, msg: str) -> None:
    if info.is_main:
        print(msg, file=sys.stderr, flush=True)


def _pretrain(cfg: PretrainConfig, resume: bool, device: torch.device, info: DistInfo) -> Path:
    run_dir = Path(cfg.out)
    ckpt_dir = run_dir / "checkpoints"
    if info.is_main and not resume and latest_checkpoint(run_dir) is not None:
        raise FileExistsError(f"{run_dir} already holds a run; continue it with `mimaim pretrain --resume "
                              f"{run_dir}` or choose a new --out")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # ---- objective, data, optimiser (any bad value stops here, before the run directory exists)
    objective = build_run_objective(cfg).to(device)
    source = build_source(cfg.data, cfg.cache, cfg.max_bad_fraction, progress=cfg.progress and info.is_main)
    train = training_subset(source.split("train", cfg.val_fraction), cfg.data_fraction, cfg.seed)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    aug = objective.augmentation
    if cfg.augmentation:  # e.g. one crop scale for every objective in a comparison
        aug = replace(aug, **{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.augmentation.items()})
    transform = pretrain_transform(cfg.img_size, aug.crop_scale, aug.crop_ratio, aug.hflip, aug.color_jitter)
    dataset = PretrainDataset(train, transform, objective.sample_masking, cfg.seed)
    num_workers = default_num_workers(cfg, in_memory=not train.items or not isinstance(train.items[0], str))
    steps_per_epoch = GlobalBatchSampler(len(train), cfg.batch_size, cfg.accum_steps, info.rank,
                                         info.world_size).steps_per_epoch
    total_steps = steps_per_epoch * cfg.epochs
    lr = cfg.effective_lr()
    optimizer = build_optimizer(objective, lr, cfg.weight_decay, cfg.betas, objective.no_weight_decay())

    step = 0
    if resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise FileNotFoundError(f"no checkpoint to resume in {run_dir}/checkpoints; start a new run instead")
        load_weights(objective, ckpt, what="checkpoint")
        state = load_state(ckpt)
        if state.get("objective") not in (None, cfg.objective):
            raise ValueError(f"checkpoint {ckpt} was trained with objective {state['objective']!r}, "
                             f"not {cfg.objective!r}; resume with the run's own objective")
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"], device)
        step = int(state["step"])
        _say(info, f"resuming {run_dir} from step {step} ({ckpt.name})")

    n_params = sum(p.numel() for p in objective.encoder.parameters())
    _say(info, f"mimaim pretrain: {cfg.objective} on {cfg.model}/{cfg.patch_size} at {cfg.img_size}px "
               f"({n_params / 1e6:.1f}M encoder parameters), options {vars(objective.options)}")
    _say(info, f"data {train.name}: {len(train)} training images (data_fraction {cfg.data_fraction}; "
               f"{len(source.split('val', cfg.val_fraction))} held out for probes), "
               f"{steps_per_epoch} steps/epoch x {cfg.epochs} epochs, batch {cfg.batch_size} "
               f"({info.world_size} process(es) x {cfg.accum_steps} accumulation), lr {lr:.3g}, device {device}, "
               f"precision {cfg.precision}, {num_workers} loader worker(s) -> {run_dir}")

    model: torch.nn.Module = objective
    if cfg.compile:
        model = torch.compile(model)
    if info.enabled:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    logger = MetricsLogger(run_dir, enabled=info.is_main)
    if resume:
        logger.truncate_after(step)
    bar = None
    if info.is_main and cfg.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total_steps, initial=step, desc=f"{cfg.objective} pretrain", unit="step",
                   dynamic_ncols=True, mininterval=0.5)

    def checkpoint(at_step: int) -> None:
        if info.is_main:
            save_checkpoint(ckpt_dir, at_step, objective,
                            {"optimizer": optimizer.state_dict(), "rng": rng_state(device), "step": at_step,
                             "epoch": at_step / steps_per_epoch, "objective": cfg.objective, "model": cfg.model},
                            keep_last=cfg.keep_last,
                            metadata={"objective": cfg.objective, "model": cfg.model, "step": str(at_step)})

    warned: set[str] = set()
    seen = bad = 0
    window_loss, window_n, window_t = 0.0, 0, time.perf_counter()
    t_start = time.perf_counter()
    start_step, last_loss = step, float("nan")
    max_steps = total_steps if cfg.max_steps is None else min(total_steps, cfg.max_steps)
    objective.train()
    try:
        while step < max_steps:
            epoch, in_epoch = divmod(step, steps_per_epoch)
            sampler = GlobalBatchSampler(len(train), cfg.batch_size, cfg.accum_steps, info.rank, info.world_size,
                                         cfg.seed, epoch, start_step=in_epoch)
            loader = make_loader(dataset, sampler, num_workers, pin_memory=device.type == "cuda")
            micro = 0
            for batch in loader:
                if micro == 0:
                    set_lr(optimizer, cosine_lr(step / steps_per_epoch, lr, cfg.min_lr, cfg.warmup_epochs, cfg.epochs))
                images = batch["image"].to(device, non_blocking=True)
                masking = batch["masking"]
                masking = masking.to(device, non_blocking=True) if masking is not None else None
                seen += images.shape[0]
                for path in batch["bad"]:
                    bad += 1
                    if path not in warned and len(warned) < 20:
                        warned.add(path)
                        msg = f"warning: skipping unreadable image {path}"
                        (bar.write(msg, file=sys.stderr) if bar else print(msg, file=sys.stderr))
                last_micro = micro == cfg.accum_steps - 1
                sync = contextlib.nullcontext() if (last_micro or not info.enabled) else model.no_sync()
                with sync:
                    with autocast_context(device, cfg.precision):
                        out = model(images, masking)
                    loss = out.loss
                    loss_value = loss.item()
                    if not math.isfinite(all_reduce_sum(loss_value, device, info)):
                        checkpoint(step)  # the weights before this step are still good
                        raise TrainingDiverged(
                            f"the loss became {loss_value} at step {step} (epoch {step / steps_per_epoch:.2f}). "
                            f"The last good weights are saved in {ckpt_dir}. Try a lower --blr, gradient clipping "
                            "(--clip-grad 1.0), a longer --warmup-epochs, or --precision fp32; then resume with "
                            f"`mimaim pretrain --resume {run_dir}`.")
                    (loss / cfg.accum_steps).backward()
                window_loss += loss_value
                window_n += 1
                micro += 1
                if not last_micro:
                    continue
                micro = 0
                if cfg.clip_grad:
                    torch.nn.utils.clip_grad_norm_(objective.parameters(), cfg.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if bar is not None:
                    bar.update(1)

                if step % cfg.log_every == 0 or step == max_steps:
                    elapsed = time.perf_counter() - window_t
                    steps_in_window = window_n / cfg.accum_steps
                    last_loss = all_reduce_sum(window_loss / window_n, device, info) / info.world_size
                    total_bad = int(all_reduce_sum(bad, device, info))
                    total_seen = int(all_reduce_sum(seen, device, info))
                    if total_seen >= min(len(train), 1000):  # too few images seen for a stable share
                        check_bad_fraction(total_bad, total_seen, cfg.max_bad_fraction, sorted(warned)[:3])
                    row = {"epoch": round(step / steps_per_epoch, 4), "loss": last_loss,
                           "lr": optimizer.param_groups[0]["lr"] / optimizer.param_groups[0].get("lr_scale", 1.0),
                           "images_per_s": steps_in_window * cfg.batch_size / max(elapsed, 1e-9),
                           "skipped_images": total_bad + len(source.bad)}
                    logger.log(step, row)
                    if bar is not None:
                        bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{row['lr']:.2e}",
                                        img_s=f"{row['images_per_s']:.0f}")
                    window_loss, window_n, window_t = 0.0, 0, time.perf_counter()
                end_of_epoch = step % steps_per_epoch == 0
                if end_of_epoch and bar is None and info.is_main:
                    shown = last_loss if math.isfinite(last_loss) else window_loss / max(window_n, 1)
                    _say(info, f"epoch {step // steps_per_epoch}/{cfg.epochs} step {step}/{total_steps} "
                               f"loss {shown:.4f} ({time.perf_counter() - t_start:.0f}s)")
                if (cfg.save_every and step % cfg.save_every == 0) or end_of_epoch or step == max_steps:
                    checkpoint(step)
                if step >= max_steps:
                    break
    finally:
        if bar is not None:
            bar.close()
        logger.close()

    wall = time.perf_counter() - t_start
    if not math.isfinite(last_loss):  # nothing logged in this session (e.g. resuming a finished run)
        rows = read_metrics(run_dir) if info.is_main else []
        last_loss = float(rows[-1]["loss"]) if rows else float("nan")
    if step == start_step and (run_dir / "summary.json").exists():
        _say(info, f"{run_dir} had already finished all {step} steps; nothing to do")
    elif info.is_main:
        summary = {"objective": cfg.objective, "model": cfg.model, "steps": step, "epochs": step / steps_per_epoch,
                   "final_loss": last_loss, "wall_time_s": round(wall, 2),
                   "images_per_s": round((step - start_step) * cfg.batch_size / max(wall, 1e-9), 2),
                   "encoder_parameters": n_params, "skipped_images": bad + len(source.bad)}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        try:
            from ..eval.pictures import reconstruction_figure
            path = reconstruction_figure(objective, cfg, run_dir / "reconstruction.png", device=device)
            _say(info, f"wrote {path}")
        except Exception as err:  # noqa: BLE001 - a picture must never fail a finished run
            warnings.warn(f"could not draw the reconstruction picture: {err}")
        _say(info, f"done: {step} steps in {wall:.1f}s, final loss {last_loss:.4f}. Next: `mimaim probe {run_dir}` "
                   f"and `mimaim reconstruct {run_dir}`")
    return run_dir
