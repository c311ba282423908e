"""Run records and ``load_backbone``: the encoder comes back without its objective, heads or tokenizer."""

import json

import pytest
import torch

import mimaim
from mimaim.config import make_config
from mimaim.engine.runs import save_config
from mimaim.engine.checkpoint import CheckpointError, save_checkpoint
from mimaim.engine.dcp import save_sharded_checkpoint
from mimaim.engine.runs import build_backbone, open_backbone, read_record, run_record
from mimaim.engine.trainer import build_run_objective

from tiny_runs import images, make_run, randomize


@pytest.mark.parametrize("objective", ["mae", "beit", "simmim", "aim"])
def test_load_backbone_gives_the_trained_encoder(tmp_path, objective):
    run, obj = make_run(tmp_path / "run", objective)
    encoder = mimaim.load_backbone(run)
    assert not encoder.training and type(encoder) is type(obj.encoder)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(encoder.forward_features(x), obj.encoder.forward_features(x), rtol=0, atol=0)
    assert not any(k.startswith(("decoder", "lm_head", "head", "tokenizer")) for k in encoder.state_dict())


def test_checkpoint_holds_the_run_record(tmp_path):
    run, _ = make_run(tmp_path / "run", "beit", recipe="paper")  # the relative-bias trunk (quick: absolute table)
    record = json.loads((run / "checkpoints" / "step-00000001" / "run.json").read_text())
    assert record["format"] == 1 and record["objective"] == "beit" and record["mimaim_version"] == mimaim.__version__
    assert record["backbone"]["name"] == "vit_micro"
    kwargs = record["backbone"]["kwargs"]
    assert (kwargs["img_size"], kwargs["patch_size"], kwargs["qkv_bias"], kwargs["rel_pos_bias"]) == (32, 4, "qv", True)
    assert record["objective_options"]["tokenizer"] == "kmeans" and record["config"]["objective"] == "beit"
    assert record["probe_protocol"]["pool"] == "mean"


def test_record_resolves_quick_options(tmp_path):
    record = run_record(make_config(objective="mae", objective_options={"mask_ratio": 0.5}))
    assert record["objective_options"]["decoder_depth"] == 2  # MAE's quick recipe
    assert record["objective_options"]["mask_ratio"] == 0.5
    json.dumps(record)


def test_beit_with_a_dalle_tokenizer_loads_after_the_file_is_gone(tmp_path):
    """The objective cannot be built (its tokenizer file is missing); the encoder still loads."""
    run = tmp_path / "run"
    cfg = make_config(objective="beit", model="vit_micro", img_size=32, patch_size=4, out=str(run),
                      objective_options={"tokenizer": f"dalle:{tmp_path / 'gone' / 'encoder.pkl'}"})
    record = run_record(cfg)
    torch.manual_seed(0)
    encoder = randomize(build_backbone(record))
    heads = torch.nn.Module()
    heads.encoder, heads.lm_head, heads.mask_token = encoder, torch.nn.Linear(128, 8192), torch.nn.Parameter(
        torch.zeros(1, 1, 128))
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    save_checkpoint(run / "checkpoints", 3, heads, {"step": 3}, record=record)
    loaded = mimaim.load_backbone(run)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), encoder.eval()(x), rtol=0, atol=0)
    with pytest.raises(Exception, match="encoder.pkl|dalle|tokenizer"):
        from mimaim.engine.runs import load_run
        load_run(run)  # the whole objective does need the file


def test_build_backbone_is_the_same_architecture_freshly_initialised(tmp_path):
    run, obj = make_run(tmp_path / "run", "aim")
    _, record, _ = open_backbone(run)
    fresh = build_backbone(record, seed=1)
    assert type(fresh) is type(obj.encoder)
    shapes = {k: v.shape for k, v in obj.encoder.state_dict().items()}
    assert {k: v.shape for k, v in fresh.state_dict().items()} == shapes
    assert not torch.equal(fresh.blocks[0].attn.qkv.weight, obj.encoder.blocks[0].attn.qkv.weight)
    again = build_backbone(record, seed=1)
    assert torch.equal(fresh.blocks[0].attn.qkv.weight, again.blocks[0].attn.qkv.weight)


def test_a_checkpoint_of_another_shape_is_a_clear_error(tmp_path):
    run, _ = make_run(tmp_path / "run", "mae")
    ckpt = run / "checkpoints" / "step-00000001"
    record = json.loads((ckpt / "run.json").read_text())
    record["backbone"]["name"] = "vit_tiny"
    (ckpt / "run.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="does not fit.*another shape"):
        mimaim.load_backbone(run)


def test_missing_things_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mimaim.load_backbone(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
        mimaim.load_backbone(tmp_path / "empty")
    run, _ = make_run(tmp_path / "run", "mae", step=2)
    assert read_record(run / "checkpoints" / "step-00000002")["objective"] == "mae"
    with pytest.raises(FileNotFoundError, match="available"):
        mimaim.load_backbone(run, checkpoint="step-00000009")
    assert mimaim.load_backbone(run, checkpoint="step-00000002") is not None


def test_newer_record_format_is_refused(tmp_path):
    run, _ = make_run(tmp_path / "run", "mae")
    path = run / "checkpoints" / "step-00000001" / "run.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "format": 99}))
    with pytest.raises(CheckpointError, match="newer"):
        mimaim.load_backbone(run)


def test_sharded_fsdp_checkpoint_loads_like_a_plain_one(tmp_path):
    """A ``torch.distributed.checkpoint`` folder (engine/dcp.py) is consolidated in one process."""
    cfg = make_config(objective="mae", model="vit_micro", img_size=32, patch_size=4, out=str(tmp_path / "run"))
    obj = randomize(build_run_objective(cfg)).eval()
    (tmp_path / "run").mkdir()
    save_config(cfg, tmp_path / "run" / "config.yaml")
    optimizer = torch.optim.AdamW(obj.parameters())
    save_sharded_checkpoint(tmp_path / "run" / "checkpoints", 4, obj, optimizer, {"step": 4}, record=run_record(cfg))
    encoder, record, ckpt = open_backbone(tmp_path / "run")
    assert ckpt.name == "step-00000004" and record["objective"] == "mae"
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), obj.encoder(x), rtol=0, atol=0)
