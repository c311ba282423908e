"""Visual tokenizers for BEiT's targets, behind one contract (see ``base.py``).

``--tokenizer`` values:

* ``kmeans`` (default): a k-means codebook over per-patch normalised pixels, fitted on the
  first batch; built in, seconds, a departure from the paper (``kmeans.py``).
* ``dalle:PATH``: the paper's DALL-E dVAE encoder from a local weights file (``dalle.py``).
* ``PATH``: a discrete VAE trained with ``mimaim tokenizer train`` (``dvae.py``).
"""

from __future__ import annotations

from .base import VisualTokenizer, id_colours
from .dalle import DalleTokenizer, load_dalle_encoder
from .dvae import DiscreteVAE, DVAEConfig, TrainedTokenizer, codebook_usage, load_dvae, save_dvae, train_dvae
from .kmeans import DEFAULT_VOCAB as KMEANS_DEFAULT_VOCAB
from .kmeans import KMeansTokenizer, kmeans_fit

TOKENIZER_HELP = "kmeans | dalle:PATH | PATH (a `mimaim tokenizer train` --out folder)"


def build_tokenizer(spec: str, patch_size: int, vocab_size: int = 0) -> VisualTokenizer:
    """The tokenizer ``spec`` names; ``vocab_size`` 0 = the tokenizer's own, else it must match."""
    spec = (spec or "kmeans").strip()
    if spec == "kmeans":
        return KMeansTokenizer(patch_size, vocab_size or KMEANS_DEFAULT_VOCAB)
    if spec.startswith("dalle:"):
        path = spec[len("dalle:"):]
        if not path:
            raise ValueError("--tokenizer dalle: needs a path, e.g. --tokenizer dalle:~/weights/encoder.pkl")
        tokenizer = DalleTokenizer(path)
    elif spec == "dalle":
        raise ValueError("--tokenizer dalle needs the path of DALL-E's encoder.pkl: --tokenizer dalle:PATH")
    else:
        tokenizer = TrainedTokenizer(spec)
    if vocab_size and tokenizer.vocab_size != vocab_size:
        raise ValueError(f"tokenizer {spec!r} has a vocabulary of {tokenizer.vocab_size} ids, but vocab_size="
                         f"{vocab_size} was asked; drop --opt vocab_size (0 = the tokenizer's own) or set it to "
                         f"{tokenizer.vocab_size}, or pass a tokenizer with {vocab_size} ids")
    return tokenizer


__all__ = [
    "DVAEConfig", "DalleTokenizer", "DiscreteVAE", "KMeansTokenizer", "TOKENIZER_HELP", "TrainedTokenizer",
    "VisualTokenizer", "build_tokenizer", "codebook_usage", "id_colours", "kmeans_fit", "load_dalle_encoder",
    "load_dvae", "save_dvae", "train_dvae",
]
