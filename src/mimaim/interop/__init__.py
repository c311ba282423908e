"""Converters between mimaim runs and peer libraries: HF transformers and timm (export, ``--init``)."""
