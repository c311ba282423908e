"""Data: sources (built-in digits, image folders, WebDataset shards), transforms, and the resumable loader;
modules import one way: ``base`` (Source) <- ``loader`` <- ``shards`` <- ``sources`` (data specs)."""

from .base import DataError, Source, check_bad_fraction, group_by_class, training_subset
from .loader import GlobalBatchSampler, PretrainDataset, collate, make_epoch_loader, steps_per_epoch
from .sources import DATA_SPEC_HELP, build_source, parse_data_spec
from .transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize, eval_transform, pretrain_transform

__all__ = [
    "DATA_SPEC_HELP", "DataError", "GlobalBatchSampler", "IMAGENET_MEAN", "IMAGENET_STD", "PretrainDataset",
    "Source", "build_source", "check_bad_fraction", "collate", "denormalize", "eval_transform",
    "group_by_class", "make_epoch_loader", "parse_data_spec", "pretrain_transform",
    "steps_per_epoch", "training_subset",
]
