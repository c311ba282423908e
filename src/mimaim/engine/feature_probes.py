"""The linear and k-NN probes on cached features, one implementation for ``mimaim probe`` (``eval/probes.py``) and the
online probes (``online_probe.py``): MAE's linear-probe head and recipe (``main_linprobe.py``) and DINO's weighted
k-NN. Features in, top-1 (%) out: nothing here knows a trunk or an objective."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .optim import cosine_lr, set_lr

BASE_LR = 0.1  #: at batch 256 (MAE main_linprobe.py)


def linear_head(dim: int, num_classes: int, generator: torch.Generator) -> nn.Module:
    """MAE's linear-probe head: affine-free BatchNorm + Linear (weights ~ N(0, 0.01), truncated; zero bias)."""
    with torch.random.fork_rng(devices=[]):  # nn.Linear's default init draws from the global RNG: put it back
        head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01, generator=generator)
    nn.init.zeros_(head[1].bias)
    return head


def linear_top1(x_tr, y_tr, x_va, y_va, num_classes: int, epochs: int = 100, batch_size: int = 256,
                base_lr: float = BASE_LR, warmup_epochs: int = 10, seed: int = 0) -> float:
    """The linear probe (``mimaim probe``'s, online's last): a fresh head, SGD (momentum 0.9, lr = base_lr x
    batch/256) with warm-up + cosine on features ``x_tr`` -> top-1 (%) on ``x_va``."""
    g = torch.Generator().manual_seed(seed)
    head = linear_head(x_tr.shape[1], num_classes, g)
    batch_size = min(batch_size, len(x_tr))
    lr = base_lr * batch_size / 256
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    fit_head(head, opt, x_tr.float(), y_tr, epochs, batch_size, lr, warmup_epochs, g)
    return top1(head, x_va.float(), y_va)


def fit_head(head: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, epochs: int,
             batch_size: int, lr: float, warmup_epochs: float, generator: torch.Generator) -> None:
    """Cross-entropy on cached features, shuffled mini-batches, cosine schedule with warm-up."""
    steps_per_epoch = max(1, len(x) // batch_size)
    step = 0
    head.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for b in range(steps_per_epoch):
            idx = order[b * batch_size:(b + 1) * batch_size]
            set_lr(opt, cosine_lr(step / steps_per_epoch, lr, 0.0, warmup_epochs, epochs))
            loss = F.cross_entropy(head(x[idx].float()), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1


@torch.no_grad()
def top1(head: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 1024) -> float:
    """Top-1 (%) of ``head`` in eval mode, in chunks so that token caches fit in memory."""
    head.eval()
    correct = sum((head(x[i:i + chunk].float()).argmax(dim=1) == y[i:i + chunk]).sum().item()
                  for i in range(0, len(x), chunk))
    return 100.0 * correct / max(1, len(x))


@torch.no_grad()
def knn_top1(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, labels: torch.Tensor,
             num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> float:
    """Top-1 (%) of DINO's weighted k-NN: cosine similarity to the ``bank``, votes exp(sim / T) of the top k."""
    bank, queries = F.normalize(bank.float(), dim=1), F.normalize(queries.float(), dim=1)
    k = min(k, len(bank))
    correct = 0
    for start in range(0, len(queries), chunk):
        sims = queries[start:start + chunk] @ bank.T  # (b, N_bank)
        top_sims, top_idx = sims.topk(k, dim=1)
        votes = torch.zeros(sims.shape[0], num_classes).scatter_add_(1, bank_labels[top_idx],
                                                                     (top_sims / temperature).exp())
        correct += (votes.argmax(dim=1) == labels[start:start + chunk]).sum().item()
    return 100.0 * correct / max(1, len(queries))
