"""Checkpoints that survive a crash or a ``kill -9``: ``checkpoints/step-N/`` (``model.safetensors``,
``state.pt``: optimiser, RNG, step; ``run.json``: the run record) is written into a hidden folder,
flushed, and renamed into place in one atomic step, so a reader sees a whole checkpoint or none.
Loading never unpickles arbitrary objects (safetensors, ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"
RECORD_FILE = "run.json"
SHARDED_INDEX = ".metadata"  # a sharded (FSDP, torch.distributed.checkpoint) checkpoint: see dcp.py


class CheckpointError(RuntimeError):
    pass


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def state_dict_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies; tensors that share storage are cloned (safetensors forbids sharing)."""
    out, seen = {}, set()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        out[name] = t.clone().contiguous() if key in seen or not t.is_contiguous() else t
        seen.add(key)
    return out


def save_checkpoint(ckpt_dir: str | Path, step: int, model: torch.nn.Module, state: dict, keep_last: int = 2,
                    metadata: dict[str, str] | None = None, record: dict | None = None) -> Path:
    """Write ``checkpoints/step-N/`` atomically; ``record`` (``runs.run_record(cfg)``) goes to ``run.json``."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"{PREFIX}{step:08d}"
    tmp = ckpt_dir / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    save_file(state_dict_for_saving(model), str(tmp / "model.safetensors"), metadata=metadata or {})
    torch.save(state, tmp / "state.pt")
    if record is not None:
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2))
    publish(tmp, final)
    prune(ckpt_dir, keep_last)
    return final


def publish(tmp: Path, final: Path, files=None) -> None:
    """Flush ``files`` of ``tmp`` (default: all) to disk, then rename ``tmp`` to ``final`` in one atomic step."""
    for f in (tmp / name for name in files) if files is not None else tmp.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints, and what a save killed half-way left behind."""
    for old in list_checkpoints(ckpt_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_dir.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def list_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.exists():
        return []
    done = [p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.pt").exists()
            and ((p / "model.safetensors").exists() or (p / SHARDED_INDEX).exists())]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(Path(run_dir) / "checkpoints")
    return found[-1] if found else None


def load_weights(model: torch.nn.Module, path: str | Path, what: str = "checkpoint") -> None:
    """Load safetensors weights, explaining a mismatch (another model or objective) in words."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    try:
        weights = load_file(str(path))
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"cannot read {what} {path}: {err}") from None
    check_weights_fit(model.state_dict(), weights, f"{what} {path}")
    model.load_state_dict(weights)


def check_weights_fit(expected: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], what: str) -> None:
    """Raise ``CheckpointError`` naming missing, unexpected and other-shape keys, if any."""
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape)
    if not (missing or unexpected or wrong_shape):
        return
    detail = []
    if missing:
        detail.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        detail.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if wrong_shape:
        k = wrong_shape[0]
        detail.append(f"{len(wrong_shape)} of another shape (e.g. {k}: file {tuple(weights[k].shape)} "
                      f"vs model {tuple(expected[k].shape)})")
    raise CheckpointError(f"{what} does not fit this model: " + "; ".join(detail) +
                          ". It was probably saved by another model, objective or image/patch size; "
                          "use the run's own config.yaml or a matching --model/--objective.")


def load_state(ckpt: str | Path) -> dict:
    """``state.pt`` of checkpoint folder ``ckpt`` (step, RNG states, and under DDP the optimiser)."""
    return torch.load(Path(ckpt) / "state.pt", map_location="cpu", weights_only=True)
