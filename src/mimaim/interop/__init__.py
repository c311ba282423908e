"""Converters between mimaim objectives and peer libraries (HF transformers, timm, lightly)."""
