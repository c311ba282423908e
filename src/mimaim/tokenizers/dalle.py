"""The paper's tokenizer: OpenAI DALL-E's dVAE encoder (BEiT section 2.1.2), via the ``dall-e`` package, never
downloaded. ``encoder.pkl`` is a *pickled module*, readable only by ``torch.load(weights_only=False)``, which runs
its code: done only for the one file the user named, after the safe reader refused it (a state dict passes it).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .base import VisualTokenizer

FIX = ("pass --tokenizer dalle:PATH with OpenAI's DALL-E encoder.pkl "
       "(https://cdn.openai.com/dall-e/encoder.pkl) or a state dict of dall_e.Encoder")


def _encoder_from_state_dict(state: dict, dall_e, path: Path):
    try:
        n_hid, channels = state["blocks.input.w"].shape[:2]
        vocab = state["blocks.output.conv.w"].shape[0]
        n_blk = len({k.split(".")[2] for k in state if k.startswith("blocks.group_1.block_")})
    except (KeyError, AttributeError, IndexError):
        raise ValueError(f"tokenizer file {str(path)!r} holds a state dict that is not a DALL-E encoder's "
                         f"(no blocks.input.w / blocks.output.conv.w); {FIX}") from None
    encoder = dall_e.Encoder(n_hid=int(n_hid), n_blk_per_group=n_blk, input_channels=int(channels),
                             vocab_size=int(vocab))
    try:
        encoder.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"tokenizer file {str(path)!r} does not fit a DALL-E encoder: {err}; {FIX}") from None
    return encoder


def load_dalle_encoder(path: str | Path):
    """The ``dall_e.Encoder`` in ``path`` (a pickled module or a state dict), frozen, on the CPU."""
    try:
        import dall_e
    except ImportError:
        raise ValueError("--tokenizer dalle:PATH needs the `dall-e` package: pip install 'mimaim[dalle]' "
                         "(or pip install dall-e)") from None
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"DALL-E tokenizer file {str(path)!r} does not exist; {FIX}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a pickled module; see the module docstring
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"cannot read DALL-E tokenizer file {str(path)!r} ({type(err).__name__}: {err}); "
                             f"the file may be truncated or corrupt; {FIX}") from None
    if isinstance(obj, dict):
        encoder = _encoder_from_state_dict(obj, dall_e, path)
    elif isinstance(obj, dall_e.Encoder):
        encoder = obj
    else:
        raise ValueError(f"tokenizer file {str(path)!r} holds a {type(obj).__name__}, not a DALL-E encoder "
                         f"(dall_e.Encoder); {FIX}")
    return encoder.requires_grad_(False).eval()


class DalleTokenizer(VisualTokenizer):
    """DALL-E dVAE encoder: ids = argmax of its logits on ``map_pixels`` of the 8x-upsampled grid."""

    downsample = 8
    has_decoder = False  # DALL-E's decoder.pkl is a separate file; pictures show colour-coded ids

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = str(path)
        self.encoder = load_dalle_encoder(path)
        self.vocab_size = int(self.encoder.vocab_size)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        from dall_e import map_pixels

        logits = self.encoder(map_pixels(pixels.float()))  # (B, vocab, h, w)
        return logits.argmax(dim=1)
