"""Pre-training objectives, one file each; importing this package registers them."""

from .base import (Augmentation, Objective, ObjectiveOutput, ProbeProtocol, build_objective, get_objective_class,
                   list_objectives, load_plugins, parse_options, register_objective)
from . import aim, beit, ijepa, mae, nepa, simmim  # noqa: F401  (importing them registers them)

__all__ = [
    "Augmentation", "Objective", "ObjectiveOutput", "ProbeProtocol", "build_objective", "get_objective_class",
    "list_objectives", "load_plugins", "parse_options", "register_objective",
]
