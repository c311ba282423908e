"""The attentive probe: AIM's attention-pooling classifier (2401.08541, Sec. 4) as ``apple/ml-aim``
``aim/v1/torch/layers.py`` defines it, on tokens extracted once. The training recipe is ours (App. D is not
reproduced): AdamW, cosine, no augmentation; ``fast=True`` (default) fixes the BatchNorm's statistics once
over all training tokens (what its running averages converge to), ``fast=False`` trains them as ml-aim does.
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
        """Each channel over (B, T): BatchNorm1d on (B*T, D) rows is the same as on (B, D, T), without transposes."""
        B, T, D = x.shape
        return self.bn(x.reshape(B * T, D)).reshape(B, T, D)

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

    def pool_fast(self, x: torch.Tensor, normalized: bool = False) -> torch.Tensor:
        """The same read-out without projecting every token, O(B T D H + B D^2): with one query,
        q . (W_k x_t) = (W_k^T q) . x_t and sum_t a_t W_v x_t = W_v sum_t a_t x_t."""
        B, T, D = x.shape
        H, dh = self.num_heads, D // self.num_heads
        if not normalized:
            x = self.normalize(x)
        qk = (self.query.reshape(H, 1, dh) @ self.k.weight.reshape(H, dh, D)).reshape(H, D)  # (H, D)
        scores = (x.reshape(B * T, D) @ (qk.T * dh ** -0.5)).reshape(B, T, H)
        attn = scores.transpose(1, 2).softmax(dim=-1)  # (B, H, T)
        pooled = attn @ x  # (B, H, D)
        out = (pooled.transpose(0, 1) @ self.v.weight.reshape(H, dh, D).transpose(1, 2))  # (H, B, dh)
        return out.transpose(0, 1).reshape(B, D)

    def forward(self, x: torch.Tensor, normalized: bool = False) -> torch.Tensor:
        """Logits; ``normalized=True``: ``x`` was already standardised with the BatchNorm's running statistics."""
        return self.linear(self.pool_fast(x, normalized))

    @torch.no_grad()
    def fix_statistics(self, tokens: torch.Tensor, chunk: int = 2048) -> None:
        """Set the BatchNorm's running mean/variance to the per-channel statistics of all ``tokens`` (N, T, D):
        chunk sums in float32 (torch.var_mean over dim 0 is ~5x slower on a CPU), totals in float64."""
        D = tokens.shape[-1]
        n, total, squares = 0, torch.zeros(D, dtype=torch.float64), torch.zeros(D, dtype=torch.float64)
        for i in range(0, len(tokens), chunk):
            t = tokens[i:i + chunk].reshape(-1, D).float()
            n += t.shape[0]
            total += t.sum(0).double()
            squares += (t * t).sum(0).double()
        mean = total / n
        self.bn.running_mean.copy_(mean.float())
        self.bn.running_var.copy_(((squares - n * mean * mean).clamp_min(0) / max(1, n - 1)).float())  # unbiased

    @torch.no_grad()
    def standardize(self, tokens: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
        """``tokens`` standardised with the running statistics, as float32 (``normalize`` at evaluation), by chunk."""
        mean, inv_std = self.bn.running_mean, (self.bn.running_var + self.bn.eps).rsqrt()
        out = torch.empty(tokens.shape, dtype=torch.float32)
        for i in range(0, len(tokens), chunk):
            o = out[i:i + chunk]
            o.copy_(tokens[i:i + chunk])
            o.sub_(mean).mul_(inv_std)
        return out


class _Standardized(nn.Module):
    """The head, fed tokens already standardised once (``fix_statistics`` + ``standardize``)."""

    def __init__(self, head: AttentionPoolingClassifier):
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x, normalized=True)


#: BatchNorm on batch statistics (``fast=False``), and the fit on statistics fixed once (``fast=True``)
SLOW = dict(epochs=50, batch_size=256, base_lr=1e-3, warmup_epochs=5)
FAST = dict(epochs=15, batch_size=256, base_lr=8e-3, warmup_epochs=1.5)


@register_probe("attentive", needs_tokens=True)
def attentive_probe(train: dict, val: dict, num_classes: int, num_heads: int = 1, epochs: int | None = None,
                    batch_size: int | None = None, base_lr: float | None = None, weight_decay: float = 0.05,
                    warmup_epochs: float | None = None, seed: int = 0, fast: bool = True, **_) -> float:
    """Fit on ``train["tokens"]`` (N, T, D), report top-1 (%) on ``val["tokens"]``; ``fast`` picks the fit and
    its recipe (module docstring); explicit ``epochs``, ``batch_size``, ``base_lr``, ``warmup_epochs`` win."""
    recipe = FAST if fast else SLOW
    given = dict(epochs=epochs, batch_size=batch_size, base_lr=base_lr, warmup_epochs=warmup_epochs)
    epochs, batch_size, base_lr, warmup_epochs = (recipe[k] if v is None else v for k, v in given.items())
    x_tr, y_tr = train["tokens"], train["labels"]
    x_va, y_va = val["tokens"], val["labels"]
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # nn.Linear's default init draws from the global generator
        head = AttentionPoolingClassifier(x_tr.shape[-1], num_classes, num_heads, generator=g)
    batch_size = min(batch_size, len(x_tr))
    lr = base_lr * batch_size / 256
    decay = [p for n, p in head.named_parameters() if p.ndim > 1 and n != "query"]
    no_decay = [p for n, p in head.named_parameters() if p.ndim <= 1 or n == "query"]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    if not fast:
        fit_head(head, opt, x_tr, y_tr, epochs, batch_size, lr, warmup_epochs, g)
        return top1(head, x_va, y_va)
    head.fix_statistics(x_tr)
    model = _Standardized(head)
    fit_head(model, opt, head.standardize(x_tr), y_tr, epochs, batch_size, lr, warmup_epochs, g)
    return top1(model, head.standardize(x_va), y_va)
