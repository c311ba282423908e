"""The built-in default tokenizer, **a departure from the paper** (which uses DALL-E's dVAE, BEiT 2.1.2): the
nearest of ``vocab_size`` k-means centroids of per-patch normalised pixels (as AIM's Table 3a targets), so
``--objective beit`` needs no weights file. Fitted on the first batch (rank 0's is broadcast) and kept as a
buffer, so every checkpoint holds it and a resumed or probed run never refits.
"""

from __future__ import annotations

import warnings

import torch

from ..models.layers import normalized_pixel_targets, patchify, unpatchify
from .base import VisualTokenizer

DEFAULT_VOCAB = 256


def kmeans_fit(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """(M, P) points -> (k, P) centroids: k-means++ seeding, then ``iters`` Lloyd steps; an emptied cluster
    is re-seeded at the point farthest from its centroid."""
    g = torch.Generator().manual_seed(seed)
    x = x.float().cpu()
    if x.shape[0] < k:
        warnings.warn(f"k-means: only {x.shape[0]} patches to fit {k} codes (a small first batch); the points are "
                      "repeated with a little noise, so some codes are near-duplicates. Raise --batch-size or "
                      "lower --set objective.vocab_size")
        reps = -(-k // x.shape[0])
        x = x.repeat(reps, 1) + 1e-3 * torch.randn(reps * x.shape[0], x.shape[1], generator=g)
    M = x.shape[0]
    centroids = torch.empty(k, x.shape[1])
    centroids[0] = x[torch.randint(0, M, (1,), generator=g)]
    d2 = ((x - centroids[0]) ** 2).sum(1)  # (M,) squared distance to the nearest chosen centroid
    for i in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / M)
        centroids[i] = x[torch.multinomial(probs, 1, generator=g)]
        d2 = torch.minimum(d2, ((x - centroids[i]) ** 2).sum(1))
    for _ in range(iters):
        dist = torch.cdist(x, centroids)  # (M, k)
        assign = dist.argmin(1)
        counts = torch.bincount(assign, minlength=k).float()
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        empty = counts == 0
        centroids = torch.where(empty[:, None], centroids, sums / counts.clamp_min(1)[:, None])
        if empty.any():
            far = dist.gather(1, assign[:, None]).squeeze(1).topk(int(empty.sum())).indices
            centroids[empty] = x[far]
    return centroids


class KMeansTokenizer(VisualTokenizer):
    """Ids = nearest centroid of each per-patch normalised ``patch_size`` patch (see module doc)."""

    has_decoder = True
    in_checkpoint = True

    def __init__(self, patch_size: int, vocab_size: int = DEFAULT_VOCAB, channels: int = 3, seed: int = 0):
        super().__init__()
        self.downsample = patch_size
        self.vocab_size = vocab_size
        self.channels = channels
        self.seed = seed
        self.register_buffer("codebook", torch.zeros(vocab_size, patch_size * patch_size * channels))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fit(self, vectors: torch.Tensor) -> None:
        """Fit the codebook on (M, p*p*C) normalised patches; rank 0's result is shared."""
        codebook = kmeans_fit(vectors.reshape(-1, vectors.shape[-1]), self.vocab_size, seed=self.seed)
        self.codebook.copy_(codebook.to(self.codebook.device))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(self.codebook, src=0)
        self.fitted.fill_(True)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        B, _, H, W = pixels.shape
        vectors = normalized_pixel_targets(patchify(pixels.float(), self.downsample))  # (B, N, p*p*C)
        if not bool(self.fitted):
            self.fit(vectors)
        dist = torch.cdist(vectors.reshape(B, -1, vectors.shape[-1]), self.codebook[None].to(vectors.dtype))
        return dist.argmin(-1).view(B, H // self.downsample, W // self.downsample)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        """(B, h, w) ids -> (B, C, h*p, w*p) pixels in [0, 1]: each normalised centroid gets the mean and spread
        of the ``reference`` pixels' own patch (as the MAE demo draws norm-pix predictions), else mid-grey."""
        B, h, w = ids.shape
        patches = self.codebook[ids.flatten(1)]  # (B, N, P)
        if reference is not None:
            ref = patchify(reference.float(), self.downsample)
            mean, std = ref.mean(-1, keepdim=True), (ref.var(-1, keepdim=True) + 1e-6) ** 0.5
        else:
            mean, std = 0.5, 0.2
        return unpatchify(patches * std + mean, self.downsample, (h, w), self.channels).clamp(0, 1)
