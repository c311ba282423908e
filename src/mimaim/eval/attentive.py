"""The attentive probe: AIM's attention-pooling classifier on frozen tokens (2401.08541, Sec. 4 and App. D).

``AttentionPoolingClassifier`` as ``apple/ml-aim`` ``aim/v1/torch/layers.py`` defines it:

* BatchNorm1d over channels, ``affine=False``, eps 1e-6 (batch statistics while
  training, running statistics at evaluation);
* one learned query, initialised N(0, 0.02), split into ``num_heads`` heads (the trunk's
  head count); bias-free per-head key and value projections of the tokens;
* scaled dot-product attention of the query over all tokens, heads concatenated;
* a bias-free linear classifier.

It runs on tokens extracted once from the frozen trunk (``features.py``; the trunk runs
bidirectionally, with no mask), so it trains in seconds on small data sets. For a
backbone with a cls token (MAE) the cls token is one of the pooled tokens.

Training recipe (AIM App. D is not reproduced here; these are our choices): AdamW,
lr 1e-3 x batch/256, weight decay 0.05, linear warm-up then cosine, 50 epochs, batch 256,
no augmentation (the features are cached from the evaluation view).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from .probes import fit_head, register_probe, top1


class AttentionPoolingClassifier(nn.Module):
    """(B, T, D) tokens -> (B, num_classes) logits, pooled by one learned query."""

    def __init__(self, dim: int, num_classes: int, num_heads: int = 12, generator: torch.Generator | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attentive probe: width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.query = nn.Parameter(torch.randn(1, 1, dim, generator=generator) * 0.02)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.linear = nn.Linear(dim, num_classes, bias=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x.transpose(1, 2)).transpose(1, 2)  # each channel over (B, T)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, D): the query's attention read-out, as ml-aim computes it."""
        B, T, D = x.shape
        H = self.num_heads
        x = self.normalize(x)
        q = self.query.expand(B, -1, -1).reshape(B, 1, H, D // H).transpose(1, 2)  # (B, H, 1, D/H)
        k = self.k(x).reshape(B, T, H, D // H).transpose(1, 2)  # (B, H, T, D/H)
        v = self.v(x).reshape(B, T, H, D // H).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, 1, D/H)
        return out.transpose(1, 2).reshape(B, D)

    def pool_fast(self, x: torch.Tensor) -> torch.Tensor:
        """The same read-out without projecting every token: O(B T D H + B D^2) instead of O(B T D^2).

        With one query, q . (W_k x_t) = (W_k^T q) . x_t, and sum_t a_t W_v x_t = W_v sum_t a_t x_t,
        so keys and values are never formed per token. Same parameters, same function.
        """
        B, T, D = x.shape
        H, dh = self.num_heads, D // self.num_heads
        x = self.normalize(x)
        qk = torch.einsum("hd,hdc->hc", self.query.reshape(H, dh), self.k.weight.reshape(H, dh, D))  # (H, D)
        attn = (torch.einsum("btc,hc->bht", x, qk) * dh ** -0.5).softmax(dim=-1)  # (B, H, T)
        pooled = torch.einsum("bht,btc->bhc", attn, x)  # (B, H, D)
        return torch.einsum("bhc,hdc->bhd", pooled, self.v.weight.reshape(H, dh, D)).reshape(B, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.pool_fast(x))


@register_probe("attentive", needs_tokens=True)
def attentive_probe(train: dict, val: dict, num_classes: int, num_heads: int = 1, epochs: int = 50,
                    batch_size: int = 256, base_lr: float = 1e-3, weight_decay: float = 0.05,
                    warmup_epochs: int = 5, seed: int = 0, **_) -> float:
    """Fit on ``train["tokens"]`` (N, T, D), report top-1 (%) on ``val["tokens"]``."""
    x_tr, y_tr = train["tokens"], train["labels"]
    x_va, y_va = val["tokens"], val["labels"]
    g = torch.Generator().manual_seed(seed)
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # nn.Linear's default init draws from the global generator
    head = AttentionPoolingClassifier(x_tr.shape[-1], num_classes, num_heads, generator=g)
    torch.random.set_rng_state(torch_state)
    batch_size = min(batch_size, len(x_tr))
    lr = base_lr * batch_size / 256
    decay = [p for n, p in head.named_parameters() if p.ndim > 1 and n != "query"]
    no_decay = [p for n, p in head.named_parameters() if p.ndim <= 1 or n == "query"]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    fit_head(head, opt, x_tr, y_tr, epochs, batch_size, lr, warmup_epochs, g)
    return top1(head, x_va, y_va)
