"""The pre-training loop, plain PyTorch: ``setup`` (objective, data, ``parallelize``, AdamW, restore),
``train_step`` (micro-batches under autocast, one finiteness sync per step, clip, step), a log line
every ``log_every`` steps and atomic checkpoints (``checkpoint.py``; every rank its shard under FSDP,
``dcp.py``). A non-finite loss stops the run and sets aside the checkpoints written as it blew up.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..config import PretrainConfig
from ..data import build_source, check_bad_fraction, steps_per_epoch, training_subset
from ..objectives import Objective
from .build import build_run_objective
from .checkpoint import latest_checkpoint, list_checkpoints, load_state, load_weights, save_checkpoint
from .dcp import is_sharded_checkpoint, load_sharded_checkpoint, save_sharded_checkpoint
from .distributed import DistInfo, cleanup, init_distributed, resolve_device
from .fsdp import all_finite, gradient_sync, is_fsdp, parallelize
from .logging import MetricsLogger, read_metrics
from .meters import BadImages, LogWindow, Progress
from .online_probe import OnlineProbe, start_online_probe
from .optim import build_optimizer, lr_at, set_lr
from .pipeline import build_transform, default_num_workers, epoch_loader
from .precision import autocast_context, slow_bf16_warning
from .runs import run_record, save_config


class TrainingDiverged(RuntimeError):
    """The loss (or the weights) became NaN or infinite."""


@dataclass
class Run:
    """Everything ``setup`` builds; the loop reads it."""
    objective: Objective
    model: torch.nn.Module  # the objective as parallelize wrapped it
    optimizer: torch.optim.Optimizer
    source: object
    train: object
    transform: object
    num_workers: int
    steps_per_epoch: int
    step: int  # optimiser steps already taken (restored when resuming)


def pretrain(cfg: PretrainConfig, resume: bool = False, init: Callable[[Objective], str] | None = None) -> Path:
    """Pre-train ``cfg.objective`` -> the run directory. ``resume`` continues ``cfg.out`` from its newest checkpoint
    (from step 0 if none); ``init`` (from ``cli/pretrain.py``) loads ``cfg.init`` into a new run -> its report."""
    device = resolve_device(cfg.device)
    info = init_distributed(device)
    try:
        return train(cfg, resume, device, info, init)
    finally:
        cleanup()


def train(cfg: PretrainConfig, resume: bool, device: torch.device, info: DistInfo, init=None) -> Path:
    run_dir, ckpt_dir = Path(cfg.out), Path(cfg.out) / "checkpoints"
    run = setup(cfg, resume, device, info, init)
    spe, step, start_step = run.steps_per_epoch, run.step, run.step
    total_steps = spe * cfg.epochs
    run.objective.total_steps = total_steps  # the whole run's optimiser steps, for schedules (I-JEPA's EMA)
    max_steps = total_steps if cfg.max_steps is None else min(total_steps, cfg.max_steps)
    progress = Progress(info, cfg.progress, total_steps, step, f"{cfg.objective} pretrain")
    bad, window = BadImages(progress), LogWindow(device, cfg.batch_size)
    logger = MetricsLogger(run_dir, enabled=info.is_main)
    if resume:
        logger.truncate_after(step)
    online = start_online_probe(cfg, run, device, max_steps, say=lambda msg: _say(info, msg))  # None: off

    def checkpoint(at: int) -> None:
        if not all_finite(run.objective.parameters()):  # each rank checks its shards under FSDP
            raise TrainingDiverged(diverged(run_dir, losses, start_step, at, spe, "non-finite weights",
                                            info.is_main))
        if info.is_main or is_fsdp(run.model):  # sharded: every rank writes its shard
            save(cfg, ckpt_dir, at, run, device)

    t_start, last_loss = time.perf_counter(), float("nan")
    losses = torch.full((max(max_steps - start_step, 0),), float("nan"), device=device)  # per step, never synced
    run.objective.train()
    try:
        while step < max_steps:
            epoch, in_epoch = divmod(step, spe)
            batches = iter(epoch_loader(run.train, run.transform, run.objective, cfg, info, epoch, in_epoch,
                                        run.num_workers, device))
            for _ in range(in_epoch, spe):
                loss, finite = train_step(run, cfg, batches, step, device, info, bad)
                losses[step - start_step] = loss
                if not finite:
                    raise TrainingDiverged(diverged(run_dir, losses, start_step, step, spe, loss.item(),
                                                    info.is_main))
                window.add(loss)
                step += 1
                if step % cfg.log_every == 0 or step == max_steps or (online and online.due(step)):
                    last_loss = log(logger, window, bad, info, run, cfg, step, progress, online)
                progress.update()
                if step % spe == 0 and progress.bar is None:
                    progress.say(f"epoch {step // spe}/{cfg.epochs} step {step}/{total_steps} loss "
                                 f"{last_loss:.4f} ({time.perf_counter() - t_start:.0f}s)")
                if (cfg.save_every and step % cfg.save_every == 0) or step % spe == 0 or step == max_steps:
                    checkpoint(step)
                if step >= max_steps:
                    break
    finally:
        progress.close()
        logger.close()
    last_step_loss = losses[step - start_step - 1].item() if step > start_step else float("nan")  # one sync, at the end
    finish(cfg, run, info, start_step, step, time.perf_counter() - t_start, last_step_loss, bad)
    return run_dir


def train_step(run: Run, cfg: PretrainConfig, batches, step: int, device: torch.device, info: DistInfo,
               bad: BadImages) -> tuple[torch.Tensor, bool]:
    """Optimiser step ``step`` over ``accum_steps`` micro-batches -> (loss averaged over processes, finite);
    a non-finite step returns before clipping and the optimiser touch the weights."""
    spe = run.steps_per_epoch
    set_lr(run.optimizer, lr_at(step / spe, cfg.effective_lr(), cfg.min_lr, cfg.warmup_epochs, cfg.epochs,
                                cfg.schedule, cfg.milestones, cfg.lr_gamma))
    loss_sum = torch.zeros((), device=device)
    for micro in range(cfg.accum_steps):
        batch = next(batches)
        bad.add(batch)
        images = batch["image"].to(device, non_blocking=True)
        masking = batch["masking"]
        masking = masking.to(device, non_blocking=True) if masking is not None else None
        with gradient_sync(run.model, micro == cfg.accum_steps - 1):
            with autocast_context(device, cfg.precision):
                loss = run.model(images, masking).loss
            (loss / cfg.accum_steps).backward()
        loss_sum += loss.detach().float() / cfg.accum_steps
    if info.enabled:
        torch.distributed.all_reduce(loss_sum)
        loss_sum /= info.world_size
    if not torch.isfinite(loss_sum):
        return loss_sum, False
    if cfg.clip_grad:
        torch.nn.utils.clip_grad_norm_(run.objective.parameters(), cfg.clip_grad)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.objective.after_optimizer_step(step + 1)
    return loss_sum, True


# --------------------------------------------------------------------------- setup
def setup(cfg: PretrainConfig, resume: bool, device: torch.device, info: DistInfo, init=None) -> Run:
    """Objective, data and optimiser (a bad value stops here, before the run directory exists),
    then the newest checkpoint when resuming."""
    run_dir = Path(cfg.out)
    if info.is_main and not resume and latest_checkpoint(run_dir) is not None:
        raise FileExistsError(f"{run_dir} already holds a run; continue it with `mimaim pretrain --resume "
                              f"{run_dir}` or choose a new --out")
    warning = slow_bf16_warning(device, cfg.precision)
    if warning and info.is_main:
        print(warning, file=sys.stderr, flush=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    objective = build_run_objective(cfg)
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is None and cfg.init:
        if init is None:
            raise ValueError(f"init {cfg.init!r}: pass the weights loader as pretrain(cfg, init=...) "
                             "(mimaim.cli.pretrain.pretrain does), or leave init unset")
        _say(info, init(objective))
    objective = objective.to(device)
    source = build_source(cfg.data, cfg.cache, cfg.max_bad_fraction, progress=cfg.progress and info.is_main)
    train = training_subset(source.split("train", cfg.val_fraction), cfg.data_fraction, cfg.seed)
    spe = steps_per_epoch(len(train), cfg.batch_size, cfg.accum_steps, info.world_size)
    model = parallelize(objective, cfg, device, info)  # FSDP replaces the parameters: the optimiser comes after
    optimizer = build_optimizer(objective, cfg.effective_lr(), cfg.weight_decay, cfg.betas,
                                objective.no_weight_decay())
    step = restore(ckpt, objective, optimizer, cfg, device) if ckpt is not None else 0
    if info.is_main:  # after restore: a resume refused (e.g. another strategy) leaves the record as it was
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    if resume:
        _say(info, f"resuming {run_dir} from step {step} ({ckpt.name})" if ckpt is not None else
             f"{run_dir} has no checkpoint to continue from: starting it from step 0 with its recorded config")
    run = Run(objective, model, optimizer, source, train,
              build_transform(objective, cfg), default_num_workers(cfg, train.in_memory), spe, step)
    _describe(cfg, run, info, device)
    return run


def restore(ckpt: Path, objective: Objective, optimizer, cfg: PretrainConfig, device: torch.device) -> int:
    """Weights, optimiser moments, RNG state -> the step; lr and weight decay come from ``cfg`` (a resumed run may
    change them). A sharded checkpoint (``--strategy fsdp``) loads into any number of processes."""
    if is_sharded_checkpoint(ckpt):
        state = load_sharded_checkpoint(ckpt, objective, optimizer)  # a collective under FSDP
    elif is_fsdp(objective):
        raise ValueError(f"checkpoint {ckpt} was written under --strategy ddp (one whole model.safetensors); "
                         "resume it with --strategy ddp: its sharded checkpoints start with a --strategy fsdp run")
    else:
        load_weights(objective, ckpt, what="checkpoint")
        state = load_state(ckpt)
    if state.get("objective") not in (None, cfg.objective):
        raise ValueError(f"checkpoint {ckpt} was trained with objective {state['objective']!r}, "
                         f"not {cfg.objective!r}; resume with the run's own objective")
    if "optimizer" in state:  # sharded checkpoints hold the AdamW moments in their shards
        optimizer.load_state_dict(state["optimizer"])
    for group in optimizer.param_groups:
        group["weight_decay"] = cfg.weight_decay if group["weight_decay"] else 0.0
    set_rng_state(state["rng"], device)
    return int(state["step"])


def save(cfg: PretrainConfig, ckpt_dir: Path, step: int, run: Run, device: torch.device) -> Path:
    """Under DDP (rank 0): model.safetensors + state.pt; sharded (every rank): DCP shards + state.pt."""
    state = {"rng": rng_state(device), "step": step, "epoch": step / run.steps_per_epoch,
             "objective": cfg.objective, "model": cfg.model}
    record = run_record(cfg)
    if is_fsdp(run.model):
        return save_sharded_checkpoint(ckpt_dir, step, run.objective, run.optimizer, state,
                                       keep_last=cfg.keep_last, record=record)
    state["optimizer"] = run.optimizer.state_dict()
    return save_checkpoint(ckpt_dir, step, run.objective, state, keep_last=cfg.keep_last,
                           metadata={"objective": cfg.objective, "model": cfg.model, "step": str(step)},
                           record=record)


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# --------------------------------------------------------------------------- logging, stop, finish
def log(logger, window: LogWindow, bad: BadImages, info: DistInfo, run: Run, cfg: PretrainConfig, step: int,
        progress: Progress, online: OnlineProbe | None = None) -> float:
    w = window.flush(info, bad)
    if w["seen"] >= min(len(run.train), 1000):  # too few images seen for a stable share
        check_bad_fraction(w["bad"], w["seen"], cfg.max_bad_fraction, sorted(bad.warned)[:3])
    group = run.optimizer.param_groups[0]
    row = {"epoch": round(step / run.steps_per_epoch, 4), "loss": w["loss"],
           "lr": group["lr"] / group.get("lr_scale", 1.0), "images_per_s": w["images_per_s"],
           "skipped_images": w["bad"] + len(run.source.bad)}
    if online is not None:  # training FLOPs so far, and the online probe on its steps (every rank runs it)
        row.update(online.row(step))
        window.reset()  # the probe's time is not counted in the next line's images/s (the summary's wall time has it)
    logger.log(step, row)
    if progress.bar is not None:
        progress.bar.set_postfix(loss=f"{w['loss']:.4f}", lr=f"{row['lr']:.2e}", img_s=f"{row['images_per_s']:.0f}")
    return w["loss"]


#: a checkpoint whose first step's loss exceeds this multiple of the median loss before it was
#: written as the run was already blowing up (e.g. --lr 1e5: finite but huge weights)
SPIKE = 10.0


def diverged(run_dir: Path, losses: torch.Tensor, start_step: int, step: int, spe: int, what,
             is_main: bool = True) -> str:
    """Rename ``diverged-step-N`` the checkpoints written as the run blew up (step s's is kept if its loss was finite
    and below ``SPIKE`` x the median before it), which a resumed run never reads -> the message saying what next."""
    history = losses.tolist()
    set_aside = []
    for ckpt in reversed(list_checkpoints(run_dir / "checkpoints")):
        s = int(ckpt.name.split("-")[1])
        if s < start_step or s - start_step >= len(history):
            break
        before = [x for x in history[:s - start_step] if math.isfinite(x)]
        at = history[s - start_step]
        if s <= step and math.isfinite(at) and (not before or at <= SPIKE * statistics.median(before)):
            break
        if is_main:  # the one writer of the run directory
            ckpt.rename(ckpt.with_name(f"diverged-{ckpt.name}"))
        set_aside.append(f"{ckpt.name} (its first step's loss was {at:.3g})")
    last = latest_checkpoint(run_dir)
    aside = f"Set aside, written as it blew up: {', '.join(set_aside)}. " if set_aside else ""
    kept = (f"The last good checkpoint is {last} (step {int(last.name.split('-')[1])}); a resumed run continues "
            "from it. " if last is not None else "No good checkpoint was saved before it, so a resumed run restarts "
            "from step 0. ")
    value = f"the loss became {what}" if not isinstance(what, str) else f"training hit {what}"
    return (f"{value} at step {step} (epoch {step / spe:.2f}); this step's weights were not saved. {aside}{kept}"
            "Try a lower --lr/--blr, gradient clipping (--clip-grad 1.0), a longer --warmup-epochs, or --precision "
            f"fp32, and continue with new settings: `mimaim pretrain --resume {run_dir} --lr 1e-4` (on --resume "
            "the lr, blr, min-lr, clip-grad, warmup-epochs, weight-decay and epochs may change).")


def finish(cfg: PretrainConfig, run: Run, info: DistInfo, start_step: int, step: int, wall: float,
           last_loss: float, bad: BadImages) -> None:
    run_dir, what = Path(cfg.out), "loss of the last step"
    if not math.isfinite(last_loss):  # no step in this session (killed after the last checkpoint): the log's
        rows = read_metrics(run_dir) if info.is_main else []
        last_loss, what = (float(rows[-1]["loss"]) if rows else float("nan")), "last logged loss (a window mean)"
    if step == start_step and (run_dir / "summary.json").exists():
        _say(info, f"{run_dir} had already finished all {step} steps; nothing to do")
        return
    if info.is_main:
        n_params = sum(p.numel() for p in run.objective.encoder.parameters())
        summary = {"objective": cfg.objective, "model": cfg.model, "steps": step,
                   "epochs": step / run.steps_per_epoch, "final_loss": last_loss, "wall_time_s": round(wall, 2),
                   "images_per_s": round((step - start_step) * cfg.batch_size / max(wall, 1e-9), 2),
                   "encoder_parameters": n_params, "skipped_images": bad.bad + len(run.source.bad)}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        _say(info, f"done: {step} steps in {wall:.1f}s, {what} {last_loss:.4f}. Next: `mimaim probe {run_dir}` "
                   f"and `mimaim reconstruct {run_dir}`")


def _describe(cfg: PretrainConfig, run: Run, info: DistInfo, device: torch.device) -> None:
    n_params = sum(p.numel() for p in run.objective.encoder.parameters())
    _say(info, f"mimaim pretrain: {cfg.objective} on {cfg.model}/{cfg.patch_size} at {cfg.img_size}px "
               f"({n_params / 1e6:.1f}M encoder parameters), options {vars(run.objective.options)}")
    _say(info, f"data {run.train.name}: {len(run.train)} training images (data_fraction {cfg.data_fraction}; "
               f"{len(run.source.split('val', cfg.val_fraction))} held out for probes), "
               f"{run.steps_per_epoch} steps/epoch x {cfg.epochs} epochs, batch {cfg.batch_size} "
               f"({info.world_size} process(es) x {cfg.accum_steps} accumulation), lr {cfg.effective_lr():.3g} "
               f"({cfg.schedule}), device {device}, precision {cfg.precision}, {run.num_workers} loader worker(s) "
               f"-> {cfg.out}")


def _say(info: DistInfo, msg: str) -> None:
    if info.is_main:
        print(msg, file=sys.stderr, flush=True)
