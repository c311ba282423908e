"""Visual tokenizers for BEiT's targets (``base.py``): ``--tokenizer kmeans`` (default, a departure from the
paper: ``kmeans.py``), ``dalle:PATH`` (the paper's: ``dalle.py``) or ``PATH`` of ``mimaim tokenizer train``
(``dvae.py``); docs/methods.md section 6."""

from __future__ import annotations

from .base import VisualTokenizer, id_colours
from .dalle import DalleTokenizer
from .dvae import TrainedTokenizer
from .kmeans import DEFAULT_VOCAB, KMeansTokenizer

__all__ = ["DalleTokenizer", "KMeansTokenizer", "TrainedTokenizer", "VisualTokenizer", "build_tokenizer", "id_colours"]


def build_tokenizer(spec: str, patch_size: int, vocab_size: int = 0) -> VisualTokenizer:
    """The tokenizer ``spec`` names; ``vocab_size`` 0 = the tokenizer's own, else it must match."""
    spec = (spec or "kmeans").strip()
    if spec == "kmeans":
        return KMeansTokenizer(patch_size, vocab_size or DEFAULT_VOCAB)
    if spec == "dalle" or spec == "dalle:":
        raise ValueError("--tokenizer dalle needs the path of DALL-E's encoder.pkl: --tokenizer dalle:PATH, "
                         "e.g. --tokenizer dalle:~/weights/encoder.pkl")
    tokenizer = DalleTokenizer(spec[len("dalle:"):]) if spec.startswith("dalle:") else TrainedTokenizer(spec)
    if vocab_size and tokenizer.vocab_size != vocab_size:
        raise ValueError(f"tokenizer {spec!r} has a vocabulary of {tokenizer.vocab_size} ids, but vocab_size="
                         f"{vocab_size} was asked; drop --set objective.vocab_size (0 = the tokenizer's own) or set "
                         f"it to {tokenizer.vocab_size}, or pass a tokenizer with {vocab_size} ids")
    return tokenizer
