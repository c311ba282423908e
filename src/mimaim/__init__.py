"""mimaim: masked and autoregressive image modeling behind one training engine.

``mimaim.load_backbone(RUN_DIR)`` returns a run's trained encoder (see ``engine/runs.py``).
"""

from .version import __version__

__all__ = ["__version__", "load_backbone", "open_backbone"]


def __getattr__(name):  # imported on first use: ``import mimaim`` stays light (no torch)
    if name in ("load_backbone", "open_backbone"):
        from .engine import runs
        return getattr(runs, name)
    raise AttributeError(f"module 'mimaim' has no attribute {name!r}")
