"""Online probes (``--online-probe linear,knn``, issue 18): while pre-training, every ``every`` steps and at the last
step, one no-grad forward of the *unmasked, full-attention* trunk (``objective.encoder`` in eval mode, read with the
objective's probe protocol by ``models/readout.py``, the read-out ``mimaim probe`` uses) on a fixed labelled slice
in the evaluation view: up to ``online_probe_images`` images of the train split (the k-NN bank, the head's data) and
of the held-out split (the accuracy). A linear head (MAE ``main_linprobe.py``: affine-free BatchNorm + Linear, SGD)
is kept across probes with its own optimiser and trained ``PASSES`` epochs each time (the curve); at the last step a
head is fitted afresh with the offline probe's recipe (``linear_top1``: 100 epochs, warm-up + cosine, its seed), so
the final figure does not depend on how often the run probed and, where the slice is the whole split (the built-in
digits), it is ``mimaim probe``'s linear figure. k-NN: DINO's weighted vote, k = 20, T = 0.07 (``knn_top1``).

Departures from the peers (lightly, solo-learn probe masked features; stable-pretraining syncs every step): nothing
runs on the steps between probes. The probe draws from its own ``torch.Generator``, never the training RNG, and puts
back each module's train/eval mode, so a run trains bitwise the same with and without it. Under DDP or FSDP every
rank runs the same probe (an FSDP forward is a collective); rank 0 logs.
"""

from __future__ import annotations

import math
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..data import eval_transform
from ..models.readout import read_out
from .build import check_objective
from .estimate import _as_meta_objective, trace_step
from .feature_probes import BASE_LR, fit_head, knn_top1, linear_head, linear_top1, top1
from .fsdp import is_fsdp

PROBES = ("linear", "knn")
#: the default interval keeps the probes' FLOPs at most this share of the training FLOPs: 2.5%, since a probe's
#: wall time runs up to ~15% above its FLOPs share (benchmarks/bench_online_probe.py measured 3.1-3.4% of step time
#: at a 3.0% FLOPs share on CPU), so that its time stays within 3% of step time
OVERHEAD = 0.025
PASSES = 10  #: epochs over the slice features the kept linear head trains at each probe before the last
CACHE_BYTES = 1 << 30  #: the slice's images are kept in memory (evaluation view) when they fit in this


def probe_flops(cfg, protocol) -> tuple[float, float]:
    """(training FLOPs per image: forward + backward of the objective, read-out FLOPs per image under the probe
    ``protocol``), counted on the meta device (``estimate.py``) under a forked RNG: building the objective must not
    move the training RNG."""
    with torch.random.fork_rng(devices=[]):
        meta = _as_meta_objective(cfg)
        images = torch.zeros(1, 3, cfg.img_size, cfg.img_size, device="meta")
        with FlopCounterMode(display=False) as counter:
            read_out(meta.encoder.eval(), images, protocol.pool, protocol.layers, protocol.norm)
        return trace_step(meta, 2, torch.float32)["flops"] / 2, float(counter.get_total_flops())


def default_every(images: int, read_flops: float, batch_size: int, train_flops: float) -> int:
    """The fewest steps between probes that keep a probe's forward (``images`` x read-out FLOPs per image) within
    ``OVERHEAD`` of the training FLOPs in between (batch x forward + backward FLOPs per image). The head's passes
    on (N, D) features and the k-NN cost ~N x D x (classes + N) FLOPs, well under one trunk forward: not counted."""
    return max(1, math.ceil(images * read_flops / (OVERHEAD * batch_size * train_flops)))


class OnlineProbe:
    """The slice, the kept linear head and its optimiser; ``row(step)`` -> the metrics.csv columns of a log row."""

    def __init__(self, cfg, run, device: torch.device, last_step: int, say=print):
        self.cfg, self.run, self.device, self.last_step = cfg, run, device, last_step
        self.protocol = check_objective(cfg)[2]
        self.generator = torch.Generator().manual_seed(cfg.seed)  # the probe's own: never the training RNG
        pick = torch.Generator().manual_seed(cfg.seed)
        self.splits = {name: _slice(run.source.split(name, cfg.val_fraction), cfg.online_probe_images, pick)
                       for name in ("train", "val")}
        self.num_classes = len(run.source.classes)
        self.train_flops, self.read_flops = probe_flops(cfg, self.protocol)  # per image
        images = sum(len(s) for s in self.splits.values())
        self.every = cfg.online_probe_every or default_every(images, self.read_flops, cfg.batch_size,
                                                             self.train_flops)
        self.cache, self.head, self.opt = {}, None, None
        say(f"online probe: {', '.join(cfg.online_probe)} every {self.every} steps and at step {last_step} on "
            f"{len(self.splits['train'])} train / {len(self.splits['val'])} held-out images (the trunk unmasked, "
            f"{images * self.read_flops / (cfg.batch_size * self.train_flops):.2f} training steps of FLOPs per probe)")

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.last_step

    def row(self, step: int) -> dict:
        """``flops`` (training FLOPs so far: FLOPs per image x images seen) and, on a probe step, the accuracies."""
        out = {"flops": self.train_flops * self.cfg.batch_size * step}
        return {**out, **self.evaluate(final=step == self.last_step)} if self.due(step) else out

    def evaluate(self, final: bool) -> dict:
        """One probe: features of both slices, then the head's passes and the k-NN -> top-1 (%) per probe."""
        (x_tr, y_tr), (x_va, y_va) = (self.features(name) for name in ("train", "val"))
        out = {}
        if "linear" in self.cfg.online_probe:
            out["online_linear"] = self.linear(x_tr, y_tr, x_va, y_va, final)
        if "knn" in self.cfg.online_probe:
            out["online_knn"] = knn_top1(x_tr, y_tr, x_va, y_va, self.num_classes)
        return out

    @torch.no_grad()
    def features(self, name: str, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D) float32 read-out on the CPU and (N,) labels: the trunk in eval mode, each module's mode put back;
        under FSDP the root's own parameters are gathered around it (its blocks gather theirs as they run)."""
        images, labels = self.cache.get(name) or _load(self.splits[name], self.cfg.img_size)
        if images.numel() * images.element_size() <= CACHE_BYTES:
            self.cache[name] = images, labels
        encoder, model = self.run.objective.encoder, self.run.model
        modes = [(m, m.training) for m in encoder.modules()]
        encoder.eval()
        if is_fsdp(model):
            model.unshard()
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        try:
            with autocast:
                pooled = [read_out(encoder, images[i:i + batch_size].to(self.device), self.protocol.pool,
                                   self.protocol.layers, self.protocol.norm).cpu()
                          for i in range(0, len(images), batch_size)]
        finally:
            if is_fsdp(model):
                model.reshard()
            for m, mode in modes:
                m.train(mode)
        return torch.cat(pooled), labels

    def linear(self, x_tr, y_tr, x_va, y_va, final: bool) -> float:
        """The kept head: ``PASSES`` epochs (cosine from the base lr) per probe; the offline probe at the last."""
        if final:
            return linear_top1(x_tr, y_tr, x_va, y_va, self.num_classes)
        batch_size = min(256, len(x_tr))
        lr = BASE_LR * batch_size / 256
        if self.head is None:
            self.head = linear_head(x_tr.shape[1], self.num_classes, self.generator)
            self.opt = torch.optim.SGD(self.head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
        fit_head(self.head, self.opt, x_tr, y_tr, PASSES, batch_size, lr, 0, self.generator)
        return top1(self.head, x_va, y_va)


def start_online_probe(cfg, run, device: torch.device, last_step: int, say=print) -> OnlineProbe | None:
    """The online probe ``cfg.online_probe`` asks for, or None (off, or data without labels: said in one line)."""
    if not cfg.online_probe:
        return None
    source = run.source
    if not source.has_labels or len(source.split("val", cfg.val_fraction)) == 0:
        why = "has no labels" if not source.has_labels else "has an empty held-out split (raise --val-fraction)"
        say(f"online probe off: data {cfg.data!r} {why}; it needs class sub-folders or shards with an integer `cls`")
        return None
    return OnlineProbe(cfg, run, device, last_step, say)


def _slice(split, n: int, generator: torch.Generator):
    """The whole ``split`` or a fixed seeded subset of ``n`` of its images (in file order)."""
    if len(split) <= n:
        return split
    return split.subset(sorted(torch.randperm(len(split), generator=generator)[:n].tolist()))


def _load(source, img_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The evaluation view of every readable image of ``source`` and its labels (unreadable ones are left out)."""
    transform, images, labels = eval_transform(img_size), [], []
    for i in range(len(source)):
        try:
            images.append(transform(source.load(i)))
            labels.append(source.labels[i])
        except Exception as err:  # noqa: BLE001 - unreadable images are left out of probes, as offline
            print(f"online probe: skipping {source.describe(i)} ({err})", file=sys.stderr)
    return torch.stack(images), torch.tensor(labels)
