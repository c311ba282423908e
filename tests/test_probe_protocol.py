"""Probes read a run only through its checkpoint and the backbone contract, with each objective's protocol."""

import json

import pytest
import torch

from mimaim.eval.features import encode, pool_tokens
from mimaim.eval.probe_run import describe_protocol, format_table, probe_run, resolve_protocol

CONCRETE_OBJECTIVES = ("mae", "beit", "simmim", "aim")


# --------------------------------------------------------------------------- protocols
def test_each_objective_declares_its_protocol_and_overrides_are_named():
    assert (resolve_protocol("mae").pool, resolve_protocol("mae").layers, resolve_protocol("mae").norm) == \
        ("cls", None, True)
    for name in ("beit", "simmim"):
        assert resolve_protocol(name).pool == "mean"
    aim = resolve_protocol("aim")
    assert (aim.pool, aim.layers, aim.norm) == ("mean", (-6, -5, -4, -3, -2, -1), False)
    assert describe_protocol(aim) == "mean of patch tokens of blocks (-6, -5, -4, -3, -2, -1) averaged, no final norm"
    assert resolve_protocol("mae", pool="auto") is resolve_protocol("mae")
    over = resolve_protocol("mae", pool="mean", layers=[-2, -1])
    assert (over.pool, over.layers, over.norm) == ("mean", (-2, -1), True)
    assert "overridden by pool=mean, layers=(-2, -1)" in over.source and "main_linprobe" in over.source
    with pytest.raises(ValueError, match="pool"):
        resolve_protocol("mae", pool="max")


@pytest.fixture(scope="module")
def micro_vit():
    from mimaim.models import create_model
    torch.manual_seed(0)
    return create_model("vit_micro", img_size=16, patch_size=4, depth=3, class_token=True).eval()


def hooked_blocks(backbone, images):
    """Every block's output through forward hooks: an oracle independent of forward_intermediates."""
    outs = []
    handles = [b.register_forward_hook(lambda m, i, o: outs.append(o)) for b in backbone.blocks]
    try:
        final = backbone.forward_features(images)
    finally:
        for h in handles:
            h.remove()
    return outs, final


def test_encode_honours_layers_and_norm(micro_vit):
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    blocks, final = hooked_blocks(micro_vit, x)
    norm = micro_vit.norm
    torch.testing.assert_close(encode(micro_vit, x), final)
    torch.testing.assert_close(encode(micro_vit, x, None, norm=False), blocks[-1])
    torch.testing.assert_close(encode(micro_vit, x, [-2, -1], norm=False), (blocks[-2] + blocks[-1]) / 2)
    torch.testing.assert_close(encode(micro_vit, x, [0, 2], norm=True), (norm(blocks[0]) + norm(blocks[2])) / 2)
    assert not torch.allclose(encode(micro_vit, x, [-1], norm=True), encode(micro_vit, x, [-1], norm=False))


def test_pool_reads_the_cls_token_or_the_patch_mean():
    t = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    torch.testing.assert_close(pool_tokens(t, 1, "cls"), t[:, 0])
    torch.testing.assert_close(pool_tokens(t, 1, "mean"), t[:, 1:].mean(1))
    torch.testing.assert_close(pool_tokens(t, 0, "mean"), t.mean(1))
    with pytest.raises(ValueError, match="--pool mean"):
        pool_tokens(t, 0, "cls")


# --------------------------------------------------------------------------- mimaim probe on a run
@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    from conftest import make_image_folder
    from mimaim.config import make_config
    from mimaim.engine.trainer import pretrain

    root = tmp_path_factory.mktemp("probe")
    images = make_image_folder(root / "images")
    runs = {}
    for objective in ("mae", "aim"):
        cfg = make_config(objective=objective, model="vit_micro", img_size=16, patch_size=4,
                          data=f"imagefolder:{images}", batch_size=4, epochs=1, max_steps=2, out=str(root / objective),
                          progress=False, objective_options={"head_depth": 1, "head_width": 32} if objective == "aim"
                          else {"decoder_depth": 1, "decoder_embed_dim": 32, "decoder_num_heads": 2})
        runs[objective] = pretrain(cfg)
    return runs


def test_probe_run_defaults_to_the_objectives_protocol_and_prints_it(tiny_runs, monkeypatch):
    import mimaim.eval.probe_run as pr

    seen = []
    real = pr.extract_features
    monkeypatch.setattr(pr, "extract_features", lambda *a, **k: seen.append((k["pool"], k["layers"], k["norm"]))
                        or real(*a, **k))
    rows = probe_run(tiny_runs["aim"], probes=["knn"], progress=False)
    assert [r["encoder"] for r in rows] == ["pre-trained", "random init"]
    assert seen == [("mean", [-6, -5, -4, -3, -2, -1], False)] * 4  # both rows, train and val
    for r in rows:
        assert (r["pool"], r["layers"], r["norm"]) == ("mean", [-6, -5, -4, -3, -2, -1], False)
        assert "AverageLayers" in r["protocol_source"]
    first = format_table(rows).splitlines()[0]
    assert first.startswith("probe protocol: mean of patch tokens of blocks (-6") and "ml-aim" in first
    assert json.loads((tiny_runs["aim"] / "probe.json").read_text())[0]["protocol"] == rows[0]["protocol"]

    seen.clear()
    rows = probe_run(tiny_runs["mae"], probes=["knn"], random_init=False, progress=False)
    assert seen == [("cls", None, True)] * 2 and len(rows) == 1
    seen.clear()
    rows = probe_run(tiny_runs["mae"], probes=["knn"], pool="mean", layers=[-1], random_init=False, progress=False)
    assert seen == [("mean", [-1], True)] * 2 and "overridden" in rows[0]["protocol_source"]


def test_probe_run_never_builds_the_objective(tiny_runs, monkeypatch):
    import mimaim.engine.build as build
    import mimaim.objectives as objectives

    def refuse(*a, **k):
        raise AssertionError("probe_run built an objective")
    monkeypatch.setattr(build, "build_run_objective", refuse)
    monkeypatch.setattr(objectives, "build_objective", refuse)
    rows = probe_run(tiny_runs["mae"], probes=["knn"], progress=False)
    assert len(rows) == 2


def test_random_init_row_is_the_same_architecture_freshly_initialised(tiny_runs):
    from mimaim.engine.runs import build_backbone, open_backbone

    trained, record, _ = open_backbone(tiny_runs["aim"])
    fresh = build_backbone(record, seed=0)
    assert type(fresh) is type(trained) and fresh.num_prefix_tokens == trained.num_prefix_tokens == 0
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in trained.state_dict().items()}
    assert any(not torch.equal(v, trained.state_dict()[k]) for k, v in fresh.state_dict().items())


# --------------------------------------------------------------------------- position-blind trunks
@pytest.mark.parametrize("objective, recipe, blind", [
    ("mae", "quick", False), ("aim", "quick", False), ("beit", "quick", False), ("simmim", "quick", False),
    ("beit", "paper", True), ("simmim", "paper", True)])  # the papers' ViT: a relative bias that starts at zero
def test_a_patch_shuffle_moves_the_features_of_every_quick_trunk_from_step_0(objective, recipe, blind):
    from mimaim.config import make_config
    from mimaim.engine.build import build_run_objective
    from mimaim.eval.probe_run import BLIND_BELOW, position_change

    encoder = build_run_objective(make_config(objective=objective, recipe=recipe)).encoder.eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    moved = position_change(encoder, x, resolve_protocol(objective))
    assert (moved < BLIND_BELOW) == blind, moved
    assert moved < 1e-5 if blind else moved > 1e-2


def test_probe_warns_when_a_trunk_is_position_blind(tmp_path, capsys, monkeypatch):
    """BEiT's paper ViT at init (no absolute table, a zero relative bias) is flagged, with the fix; MAE's is not."""
    import tiny_runs
    from conftest import make_image_folder
    from mimaim.eval.probe_run import BLIND_BELOW

    monkeypatch.setattr(tiny_runs, "randomize", lambda module, **kw: module)  # keep the zero relative bias
    data = f"imagefolder:{make_image_folder(tmp_path / 'images')}"
    blind, _ = tiny_runs.make_run(tmp_path / "beit", "beit", recipe="paper", data=data)
    rows = probe_run(blind, probes=["knn"], progress=False)
    assert all(r["position_change"] < 1e-5 for r in rows)
    err = capsys.readouterr().err
    assert "warning: the vit_micro trunk of this beit run is position-blind" in err
    assert "pre-trained" in err and "random init" in err and "--set objective.abs_pos_emb=true" in err
    mae, _ = tiny_runs.make_run(tmp_path / "mae", "mae", data=data)
    assert probe_run(mae, probes=["knn"], progress=False)[0]["position_change"] > BLIND_BELOW
    assert "position-blind" not in capsys.readouterr().err
