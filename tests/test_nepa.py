"""NEPA (objectives/nepa.py): the loss, the causal trunk, runs, and the peer test against stable-pretraining.

Peer: ``stable_pretraining.methods.nepa.NEPA`` (stable-pretraining 0.1.8) with its own ``backbone``
``TransformerBlock``, configured to a trunk ours has (``use_rope=False, use_qk_norm=False, use_swiglu=False``,
LayerScale 1e-5, no cls token), its LayerNorms' eps set to ours (1e-6; its default is 1e-5) and its learned
``pos_embed`` replaced by our frozen sin-cos table. Same weights and images -> the same loss and gradients over
20 identical AdamW steps, fp32 tolerance. Where the peer departs from the authors' code it is pinned:
with additive positions its target is ``patch_embed(x) + pos_embed``; the authors' target (RoPE, nothing
added) is the patch embedding alone, which ours follows, so that case trains the peer's real forward under the
authors' loss and asserts the peer's own loss is the one with positions in the target.

stable-pretraining imports far more than NEPA uses: the lightweight packages its import chain runs (lightning,
loguru, tabulate, prettytable) must be installed; four heavy ones that only other code of the package uses are
stubbed when absent (``HEAVY_STUBS``), each call into a stub is recorded, and the test asserts the only one is
the package's own logging-verbosity call at first use.
"""

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
import types
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from mimaim.objectives import build_objective
from mimaim.objectives.nepa import next_embedding_loss

from tiny_runs import images, make_run, randomize

#: absent heavy packages that stable-pretraining imports at module level only for code NEPA never runs:
#: kornia (data/gpu_transforms.py), datasets (data/datasets.py; and ``datasets.logging.set_verbosity_info()``
#: at first use, in a try), requests_cache (data/download.py), pandas (utils/visualization.py, loggers)
HEAVY_STUBS = ("kornia", "datasets", "requests_cache", "pandas")
ALLOWED_STUB_CALLS = {"datasets.logging.set_verbosity_info"}
TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread):
    """Tiny models: one thread beats two on a shared CPU (conftest.one_torch_thread)."""


# --------------------------------------------------------------------------- the objective
def tiny(cls_token=True, **backbone):
    torch.manual_seed(0)
    obj = build_objective("nepa", "vit_micro", 16, 4, {}, embed_dim=32, depth=2, num_heads=4,
                          class_token=cls_token, **backbone)
    return randomize(obj)  # off the init: LayerScale, biases and norms all matter


@pytest.mark.parametrize("cls_token", [True, False])
def test_loss_is_minus_the_cosine_of_output_k_with_the_next_patch_embedding(cls_token):
    obj = tiny(cls_token).train()
    x = images(3, 16)
    out = obj(x)
    enc = obj.encoder
    z = enc.patch_embed(x)  # the target: the patch projection, no position (patch_norm is Identity here)
    h = enc.forward_tokens(z + enc.pos_embed[:, enc.num_prefix_tokens:],
                           attn_mask=torch.ones(17 if cls_token else 16, 17 if cls_token else 16).tril().bool())
    tokens = torch.cat([enc.cls_token.expand(3, -1, -1), z], 1) if cls_token else z  # the authors' h_in
    expected = -F.cosine_similarity(h[:, :-1], tokens[:, 1:], dim=-1).mean()
    torch.testing.assert_close(out.loss, expected, **TOL)
    assert out.pred.shape == out.target.shape == (3, 16 if cls_token else 15, 32)  # with cls: every patch a target
    assert not out.target.requires_grad


def test_the_target_is_stop_gradient():
    """Gradients reach the patch projection through the trunk's input only: equal to a loss whose target is
    a detached copy, and different from one that lets them through the target too."""
    obj = tiny().train()
    x = images(2, 16)

    def grad(loss_fn):
        obj.zero_grad()
        h, z = obj.forward_trunk(x)
        loss_fn(h[:, :-1], z).backward()
        return obj.encoder.patch_embed.proj.weight.grad.clone()

    ours = grad(next_embedding_loss)
    detached = grad(lambda p, t: -F.cosine_similarity(p, t.detach().clone(), dim=-1).mean())
    through = grad(lambda p, t: -F.cosine_similarity(p, t, dim=-1).mean())
    torch.testing.assert_close(ours, detached, **TOL)
    assert (ours - through).abs().max() > 1e-4


@pytest.mark.parametrize("cls_token", [True, False])
def test_training_attention_is_causal_and_probes_read_it_bidirectional(cls_token):
    """Changing patches k+1.. leaves outputs 0..k (and the cls output) unchanged in training; not bidirectional."""
    obj = tiny(cls_token).train()
    x = images(2, 16)
    y = x.clone()
    y[:, :, 8:, :] += 1.0  # rows 2-3 of the 4x4 grid: patches 8..15 (raster order)
    p = obj.encoder.num_prefix_tokens
    hx, hy = obj.forward_trunk(x)[0], obj.forward_trunk(y)[0]
    torch.testing.assert_close(hx[:, :p + 8], hy[:, :p + 8], rtol=0, atol=0)
    assert (hx[:, p + 8:] - hy[:, p + 8:]).abs().amax(-1).min() > 1e-4  # every later output moves
    bx, by = obj.encoder.forward_features(x), obj.encoder.forward_features(y)  # probes: no mask
    assert (bx[:, :p + 8] - by[:, :p + 8]).abs().max() > 1e-4


def test_reconstruct_draws_nearest_patches_and_a_cosine_map():
    obj = tiny(cls_token=False).eval()
    x = images(3, 16)
    cols = obj.reconstruct(x)
    assert list(cols) == ["original", "nearest batch patch to each prediction", "cosine with the true next embedding"]
    assert all(v.shape == x.shape for v in cols.values())
    nearest = cols["nearest batch patch to each prediction"]
    assert torch.equal(nearest[:, :, :4, :4], torch.zeros_like(nearest[:, :, :4, :4]))  # nothing predicts patch 0
    batch_patches = {tuple(t.flatten().tolist()) for t in x.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 1, 4, 5)
                     .reshape(-1, 3, 4, 4)}
    drawn = nearest.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 1, 4, 5).reshape(3, 16, 3, 4, 4)[:, 1:]
    assert all(tuple(t.flatten().tolist()) in batch_patches for t in drawn.reshape(-1, 3, 4, 4))


def test_options_and_paper_trunk():
    obj = build_objective("nepa", "vit_micro", 32, 4, {})
    enc = obj.encoder
    assert enc.cls_token is not None and enc.pos_embed_kind == "sincos"
    assert torch.equal(enc.blocks[0].ls1.gamma, torch.full((128,), 1e-5))
    fc1 = enc.blocks[0].mlp.fc1.weight.detach()
    assert enc.blocks[0].attn.qkv.bias is not None and 0.015 < float(fc1.std()) < 0.025  # N(0, 0.02), the authors' init
    assert not hasattr(build_objective("nepa", "vit_micro", 32, 4, {"layer_scale": 0}).encoder.blocks[0].ls1,
                       "gamma")
    with pytest.raises(ValueError, match="layer_scale"):
        build_objective("nepa", "vit_micro", 32, 4, {"layer_scale": -1})


# --------------------------------------------------------------------------- runs
@pytest.mark.parametrize("trunk", ["paper", "shared"])
def test_load_backbone_and_timm_export_open_a_nepa_run(tmp_path, trunk):
    import mimaim
    from mimaim.cli import main
    from mimaim.eval.features import pool_tokens

    timm = pytest.importorskip("timm")
    run, obj = make_run(tmp_path / "run", "nepa", trunk=trunk)
    encoder = mimaim.load_backbone(run)
    x = images()
    with torch.no_grad():
        ours = encoder.forward_features(x)
        torch.testing.assert_close(ours, obj.encoder.forward_features(x), rtol=0, atol=0)
    assert not any(k.startswith("encoder") for k in encoder.state_dict())
    out = tmp_path / "timm"
    assert main(["export", str(run), "--to", "timm", "--out", str(out)]) == 0
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), ours, rtol=0, atol=1e-5)
        torch.testing.assert_close(model(x), pool_tokens(ours, encoder.num_prefix_tokens, "mean"), rtol=0, atol=1e-5)


def test_cli_pretrain_probe_reconstruct(image_folder, tmp_path, capsys):
    from mimaim.cli import main

    run = tmp_path / "nepa-run"
    assert main(["pretrain", "--objective", "nepa", "--data", f"imagefolder:{image_folder}", "--model", "vit_micro",
                 "--img-size", "16", "--patch-size", "4", "--batch-size", "4", "--epochs", "2", "--max-steps", "3",
                 "--no-progress", "--out", str(run)]) == 0
    assert (run / "summary.json").exists() and (run / "reconstruction.png").exists()
    assert main(["probe", str(run), "--probes", "linear,knn", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "mean of patch tokens" in out and "trunk run bidirectionally" in out


# --------------------------------------------------------------------------- peer: stable-pretraining
@contextmanager
def stubbed(names):
    """Import with empty stand-ins for the absent packages ``names``; yields the list of calls made into them.
    The finder and the stand-in modules are gone afterwards, so nothing else in the session sees them."""
    calls, absent = [], {n for n in names if importlib.util.find_spec(n) is None}

    class Missing(type):
        def __getattr__(cls, attr):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return Missing(f"{cls.__name__}.{attr}", (), {})

        def __call__(cls, *args, **kwargs):
            calls.append(cls.__name__)

    class Module(types.ModuleType):
        def __getattr__(self, attr):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return Missing(f"{self.__name__}.{attr}", (), {})

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path, target=None):
            return importlib.machinery.ModuleSpec(name, self, is_package=True) if name.split(".")[0] in absent \
                else None

        def create_module(self, spec):
            return Module(spec.name)

        def exec_module(self, module):
            module.__path__ = []

    finder = Finder()
    sys.meta_path.insert(0, finder)
    try:
        yield calls
    finally:
        sys.meta_path.remove(finder)
        for name in [m for m in sys.modules if m.split(".")[0] in absent]:
            del sys.modules[name]


@pytest.fixture(scope="module")
def peer():
    """(stable-pretraining's ``methods.nepa`` module, the calls made into stubs), root logging left as it was."""
    handlers, level = logging.root.handlers[:], logging.root.level
    try:
        pytest.importorskip("stable_pretraining")
        with stubbed(HEAVY_STUBS) as calls:
            module = importlib.import_module("stable_pretraining.methods.nepa")
    finally:
        logging.root.handlers[:] = handlers
        logging.root.setLevel(level)
    return module, calls


def peer_key(ours: str) -> str:
    """Our parameter name -> the peer's: the same layout, LayerScale as bare ``ls1``/``ls2`` parameters."""
    return ours.removeprefix("encoder.").replace(".ls1.gamma", ".ls1").replace(".ls2.gamma", ".ls2")


def matched_pair(peer_module, positions: bool):
    """Our NEPA (no cls token, LayerScale 1e-5, sin-cos or no positions) and the peer with its weights."""
    ours = tiny(cls_token=False, init_values=1e-5, pos_embed="sincos" if positions else "none").train()
    theirs = peer_module.NEPA(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4, use_rope=False,
                              use_qk_norm=False, use_swiglu=False, layer_scale_init=1e-5).train()
    with torch.no_grad():
        theirs.pos_embed.zero_()
        missing, unexpected = theirs.load_state_dict({peer_key(k): v for k, v in ours.state_dict().items()},
                                                     strict=False)
    assert (missing, unexpected) == ([] if positions else ["pos_embed"], [])
    theirs.pos_embed.requires_grad_(False)  # ours: a frozen table (sin-cos, or none = zeros)
    for m in theirs.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = 1e-6
    return ours, theirs


def authors_loss(h_in, h_out):
    """``prediction_loss`` of SihanXU/nepa (the paper's pseudo-code): output t against input t + 1, detached."""
    p, z = F.normalize(h_out[:, :-1], dim=-1), F.normalize(h_in.detach()[:, 1:], dim=-1)
    return -(p * z).sum(dim=-1).mean()


def peer_losses(theirs, x):
    """-> (the peer's own loss, the authors' loss on the peer's outputs and its patch embeddings)."""
    out = theirs(x)
    return out.loss, authors_loss(theirs.patch_embed(x), out.embeddings)


@pytest.mark.parametrize("positions", [False, True], ids=["no-positions", "sincos-positions"])
def test_same_weights_same_loss_and_gradients_as_stable_pretraining_over_20_adamw_steps(peer, positions):
    peer_module, stub_calls = peer
    ours, theirs = matched_pair(peer_module, positions)
    names = [n for n, p in ours.named_parameters() if p.requires_grad]
    theirs_params = dict(theirs.named_parameters(with_callbacks=False))
    assert sorted(map(peer_key, names)) == sorted(n for n, p in theirs_params.items() if p.requires_grad)
    sides = ([dict(ours.named_parameters())[n] for n in names], [theirs_params[peer_key(n)] for n in names])
    opts = [torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05) for params in sides]
    g = torch.Generator().manual_seed(1)
    worst = {"loss": 0.0, "grad": 0.0}
    for step in range(20):
        x = torch.randn(4, 3, 16, 16, generator=g)
        loss = ours(x).loss
        own, authors = peer_losses(theirs, x)
        if positions:  # pinned difference: the peer's target carries its additive positions, the authors' none
            pos = theirs.pos_embed
            with torch.no_grad():
                torch.testing.assert_close(own, authors_loss(theirs.patch_embed(x) + pos, theirs(x).embeddings), **TOL)
            assert abs(float((own - authors).detach())) > 1e-3
        else:
            torch.testing.assert_close(own, authors, **TOL)
        their_loss = authors  # the authors' definition, computed on the peer's real forward
        torch.testing.assert_close(loss, their_loss, **TOL)
        worst["loss"] = max(worst["loss"], float((loss - their_loss).detach().abs()))
        for opt, value in zip(opts, (loss, their_loss)):
            opt.zero_grad()
            value.backward()
        for n in names:
            a, b = dict(ours.named_parameters())[n].grad, theirs_params[peer_key(n)].grad
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m: f"step {step} {n}: {m}")
            worst["grad"] = max(worst["grad"], float((a - b).abs().max()))
        for opt in opts:
            opt.step()
    print(f"max |loss diff| {worst['loss']:.2e}, max |grad diff| {worst['grad']:.2e}")
    assert set(stub_calls) <= ALLOWED_STUB_CALLS, stub_calls


def test_negative_loss_plots_on_symlog_and_scale_fits_above_the_floor(tmp_path):
    """NEPA's loss (-cosine) reaches its floor -1 at a perfect prediction: compare's loss plot switches to symlog
    when a loss goes below 0 (log would drop it), and ``scale`` fits its power law to loss - floor."""
    from mimaim.engine.logging import MetricsLogger
    from mimaim.objectives import get_objective_class
    from mimaim.studies.compare import plot_loss_curves
    from mimaim.studies.scale import fit_power_law

    x = torch.randn(2, 5, 8)
    floor = get_objective_class("nepa").loss_floor
    assert next_embedding_loss(x, x).item() == pytest.approx(floor) == -1.0
    assert get_objective_class("mae").loss_floor == 0.0
    for name, losses in (("mae", [1.0, 0.5]), ("nepa", [-0.2, -0.9])):
        (tmp_path / name).mkdir()
        log = MetricsLogger(tmp_path / name)
        for step, loss in enumerate(losses, 1):
            log.log(step, {"epoch": step, "loss": loss})
        log.close()
    assert plot_loss_curves(tmp_path / "a.png", [("mae", tmp_path / "mae")]) == "log"
    assert plot_loss_curves(tmp_path / "b.png", [("mae", tmp_path / "mae"), ("nepa", tmp_path / "nepa")]) == "symlog"
    n = [1e5, 1e6, 1e7]
    fit = fit_power_law(n, [2.0 * v ** -0.3 for v in n])  # 1 - cos = 2 N^-0.3, i.e. loss = -1 + 2 N^-0.3
    assert fit["alpha"] == pytest.approx(0.3) and fit["points"] == 3
