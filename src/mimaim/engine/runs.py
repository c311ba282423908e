"""A run is a self-describing artifact: each checkpoint folder holds ``run.json``, the *run record*
(``run_record(cfg)``: objective and resolved options, backbone name and constructor arguments, sizes,
probe protocol, the config). ``load_backbone`` rebuilds the encoder from it with ``models.create_model``
and loads the ``encoder.*`` weights, never building the objective, its heads or its tokenizer (a BEiT
run loads after its dalle file is gone); ``load_run`` rebuilds the whole objective (pictures)."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from ..config import ConfigError, PretrainConfig, load_yaml, make_config
from ..models import create_model
from ..version import __version__
from .checkpoint import (RECORD_FILE, SHARDED_INDEX, CheckpointError, check_weights_fit, latest_checkpoint,
                         list_checkpoints)
from .dcp import consolidated_weights

RECORD_FORMAT = 1
ENCODER_PREFIX = "encoder."


def run_record(cfg: PretrainConfig) -> dict:
    """What a checkpoint of ``cfg``'s run holds, JSON-serialisable, from the config and the objective
    *class* only (options, backbone flavour, probe protocol): nothing is built, no file is opened."""
    from .build import check_objective

    options, kwargs, protocol = check_objective(cfg)  # the trunk (``cfg.trunk``) and the probe protocol on it
    return json.loads(json.dumps({
        "format": RECORD_FORMAT,
        "mimaim_version": __version__,
        "objective": cfg.objective,
        "objective_options": dataclasses.asdict(options),
        "backbone": {"name": cfg.model, "kwargs": dict(img_size=cfg.img_size, patch_size=cfg.patch_size, **kwargs)},
        "img_size": cfg.img_size,
        "patch_size": cfg.patch_size,
        "probe_protocol": dataclasses.asdict(protocol),
        "config": cfg.to_dict(),
    }, default=str))  # JSON-safe: tuples as lists, anything else as its string


def read_record(ckpt: str | Path) -> dict:
    """The run record (``run.json``) of checkpoint folder ``ckpt``."""
    path = Path(ckpt) / RECORD_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {ckpt} has no {RECORD_FILE}; pass a checkpoint of a `mimaim pretrain` run")
    record = json.loads(path.read_text())
    if int(record.get("format", 0)) > RECORD_FORMAT:
        raise CheckpointError(f"{path} has run-record format {record['format']}, newer than this mimaim "
                              f"understands ({RECORD_FORMAT}); upgrade mimaim to read it")
    return record


def resolve_checkpoint(path: str | Path, checkpoint: str | Path | None = None) -> Path:
    """A run dir or checkpoint folder (plus an optional checkpoint name/path) -> the checkpoint folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} does not exist; pass the --out folder of a `mimaim pretrain` run "
                                "or one of its checkpoints/step-N folders")
    if checkpoint is not None:
        ckpt = Path(checkpoint)
        if not ckpt.exists() and (path / "checkpoints" / ckpt).exists():
            ckpt = path / "checkpoints" / ckpt
        if not ckpt.exists():
            raise FileNotFoundError(f"checkpoint {str(checkpoint)!r} not found (nor in {path / 'checkpoints'}); "
                                    f"available: {[p.name for p in list_checkpoints(path / 'checkpoints')]}")
        return ckpt
    if (path / "model.safetensors").exists() or (path / RECORD_FILE).exists() or (path / SHARDED_INDEX).exists():
        return path  # a checkpoint folder itself
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise FileNotFoundError(f"{path} has no finished checkpoint yet (looked in {path / 'checkpoints'}); "
                                "pass a run directory whose training saved at least one checkpoint")
    return ckpt


def read_checkpoint_weights(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """All weights of checkpoint folder ``ckpt`` (``encoder.*``, heads) on CPU; a sharded one consolidated."""
    if (Path(ckpt) / SHARDED_INDEX).is_file():
        return consolidated_weights(ckpt)
    path = Path(ckpt) / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {ckpt} has no model.safetensors; is it a mimaim checkpoint folder "
                              "(RUN_DIR/checkpoints/step-N)?")
    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"cannot read {path}: {err}") from None


def encoder_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``encoder.*`` entries of an objective's weights, without the prefix."""
    return {k[len(ENCODER_PREFIX):]: v for k, v in weights.items() if k.startswith(ENCODER_PREFIX)}


def build_backbone(record: dict, seed: int = 0) -> nn.Module:
    """The record's encoder architecture, freshly initialised from ``seed`` (random-init baselines),
    with the backbone's own init (an objective's re-init of part of it is not repeated)."""
    backbone = record["backbone"]
    torch.manual_seed(seed)
    return create_model(backbone["name"], **backbone["kwargs"])


def open_backbone(path: str | Path, device: str | torch.device = "cpu",
                  checkpoint: str | Path | None = None) -> tuple[nn.Module, dict, Path]:
    """-> (trained encoder in eval mode, run record, checkpoint folder). ``path``: run dir or checkpoint."""
    ckpt = resolve_checkpoint(path, checkpoint)
    record = read_record(ckpt)
    backbone = build_backbone(record)
    weights = encoder_weights(read_checkpoint_weights(ckpt))
    check_weights_fit(backbone.state_dict(), weights, f"the encoder of checkpoint {ckpt}")
    backbone.load_state_dict(weights, strict=True)
    return backbone.to(device).eval(), record, ckpt


def load_backbone(path: str | Path, device: str | torch.device = "cpu",
                  checkpoint: str | Path | None = None) -> nn.Module:
    """The trained encoder of a run (newest checkpoint) or of a checkpoint folder, in eval mode.

    >>> encoder = mimaim.load_backbone("runs/mae-digits")
    >>> feats = encoder.forward_features(images)  # (B, 1 + N, D)
    """
    return open_backbone(path, device, checkpoint)[0]


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None, device: str | torch.device = "cpu"):
    """-> (config, objective in eval mode, checkpoint path), heads and tokenizer included."""
    from .build import build_run_objective

    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise FileNotFoundError(f"run directory {str(run_dir)!r} does not exist; pass the --out folder of a "
                                "`mimaim pretrain` run")
    cfg: PretrainConfig = load_run_config(run_dir)
    ckpt = resolve_checkpoint(run_dir, checkpoint)
    objective = build_run_objective(cfg)
    weights = read_checkpoint_weights(ckpt)  # model.safetensors (ddp) or consolidated shards (fsdp)
    check_weights_fit(objective.state_dict(), weights, f"checkpoint {ckpt} of run {run_dir}")
    objective.load_state_dict(weights)
    return cfg, objective.to(device).eval(), ckpt


def save_config(cfg: PretrainConfig, path: str | Path) -> None:
    """Write ``config.yaml`` atomically: a reader (or a relaunch after a kill) sees the old file or the new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_run_config(run_dir: str | Path) -> PretrainConfig:
    if not (Path(run_dir) / "config.yaml").exists():
        raise ConfigError(f"{str(run_dir)!r} is not a mimaim run directory (no config.yaml); "
                          "pass the --out folder of a `mimaim pretrain` run")
    return make_config(load_yaml(Path(run_dir) / "config.yaml"))
