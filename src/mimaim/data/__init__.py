"""Data: sources (built-in digits, image folders, WebDataset shards), transforms, and the resumable loader.

The engine's entry points (contract C4): ``training_subset``, ``steps_per_epoch`` and
``make_epoch_loader`` (one process's micro-batches of one epoch, for every kind of source).
"""

from .loader import GlobalBatchSampler, PretrainDataset, collate, make_epoch_loader, make_loader, steps_per_epoch
from .sources import (DATA_SPEC_HELP, DataError, Source, build_source, check_bad_fraction, group_by_class,
                      parse_data_spec, training_subset)
from .transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize, eval_transform, pretrain_transform

__all__ = [
    "DATA_SPEC_HELP", "DataError", "GlobalBatchSampler", "IMAGENET_MEAN", "IMAGENET_STD", "PretrainDataset",
    "Source", "build_source", "check_bad_fraction", "collate", "denormalize", "eval_transform",
    "group_by_class", "make_epoch_loader", "make_loader", "parse_data_spec", "pretrain_transform",
    "steps_per_epoch", "training_subset",
]
