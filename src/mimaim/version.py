"""The package version, in the ground layer so that every layer may read it."""

__version__ = "0.1.0"
