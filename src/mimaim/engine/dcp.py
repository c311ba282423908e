"""Sharded checkpoints for ``--strategy fsdp`` through ``torch.distributed.checkpoint`` (DCP): every rank writes
its shard into ``checkpoints/step-N/`` (``.metadata``, one ``.distcp`` per rank; ``state.pt``, ``run.json`` from
rank 0), renamed into place once all are flushed, as in ``checkpoint.py``. N writers load into M processes (M = 1
without a process group too). Loading never unpickles arbitrary objects: the index goes through an unpickler
that admits only DCP's metadata classes, other entries through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict, get_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from .checkpoint import PREFIX, RECORD_FILE, CheckpointError, check_weights_fit, prune, publish
from .checkpoint import SHARDED_INDEX as METADATA_FILE

STATE_FILE = "state.pt"
MODEL_KEY, OPTIMIZER_KEY = "model", "optimizer"


def is_sharded_checkpoint(path: str | Path) -> bool:
    """True for a finished DCP checkpoint folder (its index and its state file exist)."""
    path = Path(path)
    return (path / METADATA_FILE).is_file() and (path / STATE_FILE).is_file()


# --------------------------------------------------------------------------- safe reading
class _MetadataUnpickler(pickle.Unpickler):
    """Admits only what a DCP index holds: DCP's metadata classes, torch.Size/dtype/layout, paths."""

    ALLOWED = {
        "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                                  "TensorStorageMetadata", "BytesStorageMetadata",
                                                  "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
        "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
        "torch.serialization": {"_get_layout"},  # maps a layout's name to torch.strided etc.
        "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
        "collections": {"OrderedDict"},
    }

    def find_class(self, module, name):
        if name in self.ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None),
                                                               (torch.dtype, torch.layout, torch.memory_format))):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint index; only DCP "
                                     "metadata is expected there (was this folder written by mimaim?)")


class SafeFileSystemReader(FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        with open(Path(self.path) / METADATA_FILE, "rb") as fh:
            metadata = _MetadataUnpickler(fh).load()
        metadata.storage_meta = metadata.storage_meta or StorageMeta()  # as FileSystemReader.read_metadata
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """Non-tensor entries through ``torch.load(weights_only=True)`` instead of a full unpickle."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        self.state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=True)


def read_index(path: str | Path):
    """The DCP ``Metadata`` of a checkpoint folder (shapes and dtypes of every entry)."""
    path = Path(path)
    if not (path / METADATA_FILE).is_file():
        raise CheckpointError(f"{path} is not a sharded checkpoint: it has no {METADATA_FILE} "
                              "(sharded checkpoints come from `--strategy fsdp` runs)")
    try:
        return SafeFileSystemReader(str(path)).read_metadata()
    except (pickle.UnpicklingError, EOFError, OSError) as err:
        raise CheckpointError(f"cannot read the index of checkpoint {path}: {err}") from None


def _model_entries(metadata) -> dict[str, TensorStorageMetadata]:
    """``{parameter name: TensorStorageMetadata}`` of the checkpoint's model part."""
    prefix = MODEL_KEY + "."
    return {key[len(prefix):]: meta for key, meta in metadata.state_dict_metadata.items()
            if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)}


def consolidated_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """All weights of a sharded checkpoint as one ``{name: tensor}`` dict on CPU (names as in
    ``model.safetensors``), in one process without a process group, whoever wrote it."""
    entries = _model_entries(read_index(path))
    weights = {name: torch.empty(tuple(m.size), dtype=m.properties.dtype) for name, m in entries.items()}
    with _single_process_quiet():
        dcp.load({MODEL_KEY: weights}, storage_reader=SafeFileSystemReader(str(path)), planner=SafeLoadPlanner(),
                 no_dist=True)
    return weights


# --------------------------------------------------------------------------- save / load
@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns on every single-process save/load that it assumes a single process: that is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save_sharded_checkpoint(ckpt_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                            state: dict, keep_last: int = 2, record: dict | None = None) -> Path:
    """Write ``ckpt_dir/step-N/`` from every rank (a collective; ``model`` sharded or plain); rank 0's
    ``state`` (step, epoch, RNG) goes to ``state.pt``, ``record`` to ``run.json``."""
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"{PREFIX}{step:08d}"
    tmp = ckpt_dir / f".tmp-{final.name}"  # the same name on every rank
    distributed = dist.is_initialized()
    main = not distributed or dist.get_rank() == 0
    if main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a process killed while writing this very step
            shutil.rmtree(tmp)
        tmp.mkdir()
    if distributed:
        dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _single_process_quiet():
        dcp.save({MODEL_KEY: model_sd, OPTIMIZER_KEY: optim_sd},
                 storage_writer=FileSystemWriter(str(tmp), sync_files=True), no_dist=not distributed)
    # dcp.save returns on rank 0 after every rank's files are written (and flushed) and the index is on disk
    if main:
        torch.save(state, tmp / STATE_FILE)
        if record is not None:
            (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2))
        publish(tmp, final, files=(STATE_FILE, METADATA_FILE, RECORD_FILE))
        prune(ckpt_dir, keep_last)
    if distributed:
        dist.barrier()
    return final


def load_sharded_checkpoint(path: str | Path, model: nn.Module,
                            optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load a sharded checkpoint into ``model`` (and ``optimizer``) in place; returns ``state.pt``. A
    collective under FSDP; each rank reads the slices its shards cover, whatever the writers' number."""
    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise CheckpointError(f"{path} is not a finished sharded checkpoint (it needs {METADATA_FILE} and "
                              f"{STATE_FILE})")
    entries = _model_entries(read_index(path))
    expected = get_model_state_dict(model)
    check_weights_fit(expected, {k: torch.empty(tuple(m.size), device="meta") for k, m in entries.items()},
                      f"checkpoint {path}")
    sd = {MODEL_KEY: expected}
    if optimizer is not None:
        sd[OPTIMIZER_KEY] = get_optimizer_state_dict(model, optimizer)
    with _single_process_quiet():
        dcp.load(sd, storage_reader=SafeFileSystemReader(str(path)), planner=SafeLoadPlanner(),
                 no_dist=not dist.is_initialized())
    set_model_state_dict(model, sd[MODEL_KEY])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, sd[OPTIMIZER_KEY])
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
