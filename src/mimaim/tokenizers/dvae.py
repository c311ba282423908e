"""A discrete VAE the user trains on their own images (BEiT appendix C; DALL-E's dVAE, small): Gumbel-softmax
with the temperature annealed from 1 to 1/16, MSE on [-1, 1] pixels plus ``kl_weight`` x KL(q || uniform),
DALL-E's prior term, which keeps codes alive; tokens are the argmax of the encoder's logits, as BEiT reads
DALL-E's. Saved as ``DIR/tokenizer.safetensors`` + ``DIR/config.json`` (``--tokenizer DIR``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data import build_source
from .base import VisualTokenizer

KIND = "mimaim-dvae"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "tokenizer.safetensors"


@dataclass
class DVAEConfig:
    vocab_size: int = 512
    downsample: int = 4
    hidden: int = 32
    codebook_dim: int = 32
    channels: int = 3

    def validate(self) -> "DVAEConfig":
        if self.downsample not in (2, 4, 8):
            raise ValueError(f"dVAE downsample must be 2, 4 or 8 (pixels per token side), got {self.downsample}")
        if self.vocab_size < 2:
            raise ValueError(f"dVAE vocab_size must be at least 2, got {self.vocab_size}")
        return self


class ResBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.ReLU(), nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(), nn.Conv2d(dim, dim, 1))

    def forward(self, x):
        return x + self.net(x)


class DiscreteVAE(nn.Module):
    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        self.cfg = cfg.validate()
        h, levels = cfg.hidden, int(math.log2(cfg.downsample))
        # strided convs first, residual blocks at the lower resolutions only: cheap on a CPU
        enc = [nn.Conv2d(cfg.channels, h, 4, stride=2, padding=1)]
        for _ in range(levels - 1):
            enc += [ResBlock(h), nn.Conv2d(h, h, 4, stride=2, padding=1)]
        enc += [ResBlock(h), nn.ReLU(), nn.Conv2d(h, cfg.vocab_size, 1)]
        self.encoder = nn.Sequential(*enc)
        self.codebook = nn.Embedding(cfg.vocab_size, cfg.codebook_dim)
        dec = [nn.Conv2d(cfg.codebook_dim, h, 1), ResBlock(h)]
        for _ in range(levels - 1):
            dec += [nn.ConvTranspose2d(h, h, 4, stride=2, padding=1), ResBlock(h)]
        dec += [nn.ReLU(), nn.ConvTranspose2d(h, cfg.channels, 4, stride=2, padding=1)]
        self.decoder = nn.Sequential(*dec)

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder(pixels * 2 - 1)  # [0, 1] -> [-1, 1] -> (B, V, h, w)

    def decode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, h, w) -> (B, C, H, W) pixels in [0, 1]."""
        z = self.codebook(ids).permute(0, 3, 1, 2)  # (B, d, h, w)
        return (self.decoder(z) * 0.5 + 0.5).clamp(0, 1)

    def forward(self, pixels: torch.Tensor, temperature: float, kl_weight: float):
        """-> (loss, reconstruction MSE on [-1, 1], logits)."""
        x = pixels * 2 - 1  # [-1, 1]
        logits = self.encoder(x)
        soft = F.gumbel_softmax(logits, tau=temperature, hard=False, dim=1)  # (B, V, h, w)
        z = torch.einsum("bvhw,vd->bdhw", soft, self.codebook.weight)
        recon = F.mse_loss(self.decoder(z), x)
        log_q = F.log_softmax(logits, dim=1)
        kl = (log_q.exp() * (log_q + math.log(self.cfg.vocab_size))).sum(1).mean()  # KL(q || uniform)
        return recon + kl_weight * kl, recon, logits


# --------------------------------------------------------------------------- tokenizer
class TrainedTokenizer(VisualTokenizer):
    """A ``mimaim tokenizer train`` output folder as a BEiT tokenizer (ids = argmax of logits)."""

    has_decoder = True

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = str(path)
        self.model, self.info = load_dvae(path)
        self.model.requires_grad_(False).eval()
        self.vocab_size = self.model.cfg.vocab_size
        self.downsample = self.model.cfg.downsample

    @torch.no_grad()
    def encode(self, pixels):
        return self.model.logits(pixels.float()).argmax(1)

    @torch.no_grad()
    def decode(self, ids, reference=None):
        return self.model.decode_ids(ids)


def save_dvae(model: DiscreteVAE, out: str | Path, info: dict) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS_NAME))
    (out / CONFIG_NAME).write_text(json.dumps({"kind": KIND, **asdict(model.cfg), **info}, indent=2))
    return out


def load_dvae(path: str | Path) -> tuple[DiscreteVAE, dict]:
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    fix = "pass --tokenizer DIR with the --out folder of `mimaim tokenizer train` (config.json + tokenizer.safetensors)"
    if path.is_file() and path.name in (CONFIG_NAME, WEIGHTS_NAME):
        path = path.parent
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer {str(path)!r} does not exist; {fix}, or use the built-in "
                                "--tokenizer kmeans or --tokenizer dalle:PATH")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / name).is_file():
            raise FileNotFoundError(f"tokenizer folder {str(path)!r} has no {name}; {fix}")
    try:
        info = json.loads((path / CONFIG_NAME).read_text())
        if info.get("kind") != KIND:
            raise ValueError(f"kind is {info.get('kind')!r}, not {KIND!r}")
        cfg = DVAEConfig(**{f.name: info[f.name] for f in fields(DVAEConfig)})
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"tokenizer config {str(path / CONFIG_NAME)!r} is not a mimaim dVAE config ({err}); "
                         f"{fix}") from None
    model = DiscreteVAE(cfg)
    try:
        model.load_state_dict(load_file(str(path / WEIGHTS_NAME)))
    except Exception as err:  # noqa: BLE001 - corrupt or mismatched file
        raise ValueError(f"cannot load tokenizer weights {str(path / WEIGHTS_NAME)!r} ({type(err).__name__}: "
                         f"{str(err)[:200]}); the file is corrupt or from another config; retrain with "
                         "`mimaim tokenizer train`") from None
    return model, info


# --------------------------------------------------------------------------- training
def codebook_usage(ids: torch.Tensor, vocab_size: int) -> dict[str, float]:
    """Share of the vocabulary used and the perplexity exp(H) of the id histogram."""
    counts = torch.bincount(ids.flatten(), minlength=vocab_size).float()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"codes_used": int((counts > 0).sum()), "share_used": float((counts > 0).float().mean()),
            "perplexity": float(entropy.exp())}


@torch.no_grad()
def evaluate_dvae(model: DiscreteVAE, images: torch.Tensor, batch_size: int = 256, device="cpu") -> dict:
    """Hard-token reconstruction error on [0, 1] pixels (MSE and MAE) and codebook usage."""
    model.eval()
    ids_all, se, ae, n = [], 0.0, 0.0, 0
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size].to(device).float() / 255.0
        ids = model.logits(x).argmax(1)
        recon = model.decode_ids(ids)
        se += float(((recon - x) ** 2).sum())
        ae += float((recon - x).abs().sum())
        n += x.numel()
        ids_all.append(ids.cpu())
    model.train()
    return {"recon_mse": se / n, "recon_mae": ae / n, **codebook_usage(torch.cat(ids_all), model.cfg.vocab_size)}


def load_training_images(data: str, img_size: int, max_images: int = 0, progress: bool = True) -> torch.Tensor:
    """All images of a data spec, resized (bicubic) to img_size x img_size, as uint8 (M, 3, S, S)."""
    import numpy as np
    from PIL import Image
    from tqdm.auto import tqdm

    source = build_source(data, cache="off", progress=progress)
    n = len(source) if not max_images else min(max_images, len(source))
    index = torch.randperm(len(source), generator=torch.Generator().manual_seed(0))[:n].sort().values
    out = []
    for i in tqdm(index.tolist(), desc="loading images", disable=not progress, unit="img", mininterval=1.0):
        try:
            img = source.load(i).convert("RGB").resize((img_size, img_size), Image.BICUBIC)
        except Exception:  # noqa: BLE001 - a broken file is skipped
            continue
        out.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
    if not out:
        raise ValueError(f"no readable images in {data!r}")
    return torch.stack(out)


def train_dvae(images: torch.Tensor, cfg: DVAEConfig, steps: int = 300, batch_size: int = 64, lr: float = 1e-3,
               kl_weight: float = 0.05, temperature: tuple[float, float] = (1.0, 1 / 16), seed: int = 0,
               device: str = "cpu", progress: bool = True) -> tuple[DiscreteVAE, dict]:
    """Train on uint8 images (M, 3, S, S) with random flips; Adam, cosine lr, annealed temperature."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    model = DiscreteVAE(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    M = images.shape[0]
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="dVAE tokenizer", unit="step", disable=not progress, mininterval=0.5)
    for step in bar:
        frac = step / max(steps - 1, 1)
        tau = temperature[0] * (temperature[1] / temperature[0]) ** frac
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * frac))
        idx = torch.randint(0, M, (batch_size,), generator=g)
        x = images[idx].float() / 255.0
        flip = torch.rand(batch_size, generator=g) < 0.5
        x[flip] = x[flip].flip(-1)
        loss, recon, _ = model(x.to(device), tau, kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0 or step == steps - 1:
            bar.set_postfix(recon=f"{recon.item():.4f}", tau=f"{tau:.3f}")
    bar.close()
    info = {"train_steps": steps, "train_seconds": round(time.perf_counter() - t0, 2), "batch_size": batch_size,
            "lr": lr, "kl_weight": kl_weight, "train_images": M, "img_size": int(images.shape[-1])}
    return model.eval(), info
