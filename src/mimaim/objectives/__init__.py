"""Pre-training objectives, one file each; importing this package registers them."""

from .base import (Augmentation, Objective, ObjectiveOutput, ProbeProtocol, build_objective, get_objective_class,
                   list_objectives, load_plugins, parse_options, register_objective)
from . import mae  # noqa: F401  (registers "mae")
from . import simmim  # noqa: F401  (registers "simmim")
from . import aim  # noqa: F401  (registers "aim")
from . import beit  # noqa: F401  (registers "beit")

__all__ = [
    "Augmentation", "Objective", "ObjectiveOutput", "ProbeProtocol", "build_objective", "get_objective_class",
    "list_objectives", "load_plugins", "parse_options", "register_objective",
]
