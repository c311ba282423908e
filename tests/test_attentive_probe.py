"""The attentive probe: ml-aim's AttentionPoolingClassifier on cached frozen tokens."""

import math

import pytest
import torch
import torch.nn.functional as F

from mimaim.data.sources import Source
from mimaim.eval.attentive import AttentionPoolingClassifier, attentive_probe
from mimaim.eval.probe_run import DEFAULT_PROBES, probe_encoder
from mimaim.eval.probes import get_probe


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread):
    """These models are tiny: one thread beats two on a shared CPU (conftest.one_torch_thread)."""


def reference_pool(head: AttentionPoolingClassifier, x: torch.Tensor) -> torch.Tensor:
    """ml-aim's forward written out: BN over channels, one query, per-head softmax(q k^T / sqrt(d)) v."""
    B, T, D = x.shape
    H = head.num_heads
    d = D // H
    x = F.batch_norm(x.transpose(1, 2), head.bn.running_mean.clone(), head.bn.running_var.clone(), training=True,
                     eps=1e-6).transpose(1, 2)
    q = head.query.reshape(H, d)
    k = (x @ head.k.weight.T).reshape(B, T, H, d)
    v = (x @ head.v.weight.T).reshape(B, T, H, d)
    attn = torch.einsum("hd,bthd->bht", q, k).div(math.sqrt(d)).softmax(-1)
    return torch.einsum("bht,bthd->bhd", attn, v).reshape(B, D)


def test_matches_ml_aim_definition():
    torch.manual_seed(0)
    head = AttentionPoolingClassifier(48, 7, num_heads=3)
    assert head.bn.affine is False and head.bn.eps == 1e-6
    assert head.k.bias is None and head.v.bias is None and head.linear.bias is None
    assert head.query.shape == (1, 1, 48)
    x = torch.randn(5, 11, 48)
    expected = reference_pool(head, x)
    torch.testing.assert_close(head.pool(x), expected, atol=1e-5, rtol=1e-5)  # the direct form
    torch.testing.assert_close(head.pool_fast(x), expected, atol=1e-5, rtol=1e-5)  # the form it trains with
    torch.testing.assert_close(head(x), head.linear(expected), atol=1e-5, rtol=1e-5)


def test_query_init_is_normal_002():
    head = AttentionPoolingClassifier(4096, 2, num_heads=8, generator=torch.Generator().manual_seed(0))
    assert abs(head.query.std().item() - 0.02) < 0.002


def test_registered_as_a_token_probe_and_default():
    spec = get_probe("attentive")
    assert spec.needs_tokens and spec.fn is attentive_probe
    assert "attentive" in DEFAULT_PROBES


def _toy(n, T=6, D=24, C=3, seed=0):
    """Class signal in ONE token at a random position: pooling must find it."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (n,), generator=g)
    centers = torch.randn(C, D, generator=g) * 3
    tokens = torch.randn(n, T, D, generator=g)
    where = torch.randint(0, T, (n,), generator=g)
    tokens[torch.arange(n), where] += centers[y]
    return {"tokens": tokens.bfloat16(), "labels": y, "pooled": tokens.mean(1)}


def test_learns_from_tokens():
    data = _toy(400, seed=0)
    train = {k: v[:300] for k, v in data.items()}
    val = {k: v[300:] for k, v in data.items()}
    acc = attentive_probe(train, val, 3, num_heads=4, epochs=15, batch_size=100, base_lr=4e-3, warmup_epochs=2)
    assert acc > 85.0, acc


def test_deterministic_for_a_seed():
    data = _toy(200, seed=1)
    train = {k: v[:150] for k, v in data.items()}
    val = {k: v[150:] for k, v in data.items()}
    a = attentive_probe(train, val, 3, num_heads=2, epochs=3, batch_size=32, seed=3)
    b = attentive_probe(train, val, 3, num_heads=2, epochs=3, batch_size=32, seed=3)
    assert a == b


def test_probes_mae_and_aim_encoders_through_features():
    """Both flavours (cls token for MAE, patch tokens only for AIM), with averaged layers, on two classes that
    even random-init features separate (dark and bright noisy images): both probes far above chance (50%)."""
    from mimaim.objectives import build_objective

    rng = torch.Generator().manual_seed(0)
    labels = [i % 2 for i in range(24)]
    items = [(40 + 150 * y + torch.rand(16, 16, 3, generator=rng) * 60).to(torch.uint8).numpy() for y in labels]
    src = Source("toy", items, labels, ["dark", "bright"])
    train, val = src.subset(list(range(16))), src.subset(list(range(16, 24)))
    for name in ("mae", "aim"):
        torch.manual_seed(0)
        enc = build_objective(name, "vit_micro", 16, 4, {}, depth=2).encoder
        scores = probe_encoder(enc, train, val, 2, 16, ["attentive", "knn"], layers=[-2, -1])
        assert set(scores) == {"attentive", "knn"}
        assert min(scores.values()) >= 87.5, (name, scores)  # at most one of the 8 held-out images wrong


# --------------------------------------------------------------------------- the fast fit
def test_fixed_statistics_are_the_token_statistics_and_standardising_once_is_the_eval_forward():
    from mimaim.eval.attentive import _Standardized

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 7, 24, generator=g) * torch.linspace(0.5, 3, 24) + torch.linspace(-2, 2, 24)
    head = AttentionPoolingClassifier(24, 5, num_heads=3, generator=g)
    head.fix_statistics(x, chunk=16)
    flat = x.reshape(-1, 24).double()
    torch.testing.assert_close(head.bn.running_mean, flat.mean(0).float())
    torch.testing.assert_close(head.bn.running_var, flat.var(0, unbiased=True).float())
    head.eval()
    torch.testing.assert_close(_Standardized(head)(head.standardize(x, chunk=16)), head(x), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def digits_tokens():
    """Token maps of scikit-learn's digits from AIM's trunk at init, read with AIM's protocol (last 6 blocks)."""
    from mimaim.config import make_config
    from mimaim.engine.runs import build_backbone, run_record
    from mimaim.eval.features import extract_features
    from mimaim.eval.probe_run import labelled_splits, resolve_protocol

    torch.set_num_threads(1)
    backbone = build_backbone(run_record(make_config(objective="aim", model="vit_micro", img_size=16, patch_size=4)))
    train, val, classes = labelled_splits("digits", 0.2)
    p = resolve_protocol("aim")
    feats = {name: extract_features(backbone, split, 16, list(p.layers), p.pool, p.norm, keep_tokens=True)
             for name, split in (("train", train), ("val", val))}
    return feats, backbone.num_heads, classes


def test_fast_fit_agrees_with_the_slow_one_on_digits(digits_tokens, monkeypatch):
    """Fixed statistics + the FAST schedule vs batch-statistics BatchNorm + the SLOW one: within 4 points
    (mean of two seeds; the seeds themselves move the slow fit by about 3 points), for a fraction of the work."""
    import mimaim.eval.attentive as att

    feats, heads, classes = digits_tokens
    seen = []
    real = att.fit_head
    monkeypatch.setattr(att, "fit_head", lambda *a: seen.append(a[5] and a[4] * len(a[2])) or real(*a))
    slow = [attentive_probe(feats["train"], feats["val"], classes, num_heads=heads, seed=s, fast=False) for s in (0, 1)]
    fast = [attentive_probe(feats["train"], feats["val"], classes, num_heads=heads, seed=s) for s in (0, 1)]
    assert sum(slow) / 2 > 50  # the probe learns here (10 classes)
    assert abs(sum(fast) / 2 - sum(slow) / 2) <= 4.0, (slow, fast)
    slow_samples, fast_samples = seen[0], seen[2]  # epochs x training images
    assert fast_samples <= 0.35 * slow_samples
