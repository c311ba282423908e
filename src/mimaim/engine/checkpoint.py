"""Checkpoints that survive a crash or a ``kill -9``.

A checkpoint is a folder ``checkpoints/step-00001234/`` holding ``model.safetensors``
(the objective's weights: encoder, heads) and ``state.pt`` (optimiser, RNG states,
step, epoch). Both are written into a hidden temporary folder, flushed to disk, and the
folder is renamed into place in one atomic step: a reader sees a whole checkpoint or
none. Loading uses safetensors and ``torch.load(weights_only=True)``, which never
unpickles arbitrary objects.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"


class CheckpointError(RuntimeError):
    pass


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


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
                    metadata: dict[str, str] | None = None) -> Path:
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"{PREFIX}{step:08d}"
    tmp = ckpt_dir / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    save_file(state_dict_for_saving(model), str(tmp / "model.safetensors"), metadata=metadata or {})
    torch.save(state, tmp / "state.pt")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(ckpt_dir)
    for old in list_checkpoints(ckpt_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_dir.glob(".tmp-*"):  # left by a process killed mid-save
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def list_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.exists():
        return []
    done = [p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
            and (p / "model.safetensors").exists() and (p / "state.pt").exists()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(Path(run_dir) / "checkpoints")
    return found[-1] if found else None


def load_weights(model: torch.nn.Module, path: str | Path, strict: bool = True, what: str = "checkpoint") -> None:
    """Load safetensors weights, explaining a mismatch (another model or objective) in words."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    try:
        weights = load_file(str(path))
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"cannot read {what} {path}: {err}") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape)
    if strict and (missing or unexpected or wrong_shape):
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong_shape:
            k = wrong_shape[0]
            detail.append(f"{len(wrong_shape)} of another shape (e.g. {k}: file {tuple(weights[k].shape)} "
                          f"vs model {tuple(expected[k].shape)})")
        raise CheckpointError(f"{what} {path} does not fit this model: " + "; ".join(detail) +
                              ". It was probably saved by another model, objective or image/patch size; "
                              "use the run's own config.yaml or a matching --model/--objective.")
    model.load_state_dict(weights, strict=strict)


def load_state(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "state.pt"
    return torch.load(path, map_location="cpu", weights_only=True)
