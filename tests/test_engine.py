"""The training engine: config errors, checkpoints, resume after kill -9, DDP, NaN handling."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from mimaim.config import ConfigError, load_yaml, make_config
from mimaim.engine.checkpoint import (CheckpointError, latest_checkpoint, list_checkpoints, load_weights,
                                      save_checkpoint)
from mimaim.engine.optim import cosine_lr, param_groups_weight_decay
from mimaim.engine.build import build_run_objective
from mimaim.engine.trainer import TrainingDiverged, pretrain
from mimaim.objectives import build_objective

TINY = dict(model="vit_micro", img_size=16, patch_size=4, batch_size=4, epochs=2, warmup_epochs=1,
            objective_options={"decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2},
            num_workers=0, progress=False, log_every=1, val_fraction=0.2)


def tiny_cfg(tmp_path, image_folder, **kw):
    return make_config({**TINY, "data": f"imagefolder:{image_folder}", "out": str(tmp_path / "run"), **kw})


def final_weights(run_dir):
    return load_file(str(latest_checkpoint(run_dir) / "model.safetensors"))


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m: f"{k}: {m}")


# ------------------------------------------------------------------------- config
def test_unknown_config_key_names_the_allowed_keys():
    with pytest.raises(ConfigError, match="unknown config key 'epoch'.*allowed keys:.*epochs"):
        make_config({"epoch": 3})


@pytest.mark.parametrize("field,value,allowed", [("objective", "mea", "mae"), ("model", "vit_tiiny", "vit_tiny"),
                                                  ("precision", "fp8", "bf16")])
def test_unknown_values_name_the_allowed_ones(field, value, allowed):
    from mimaim.engine.build import check_objective

    with pytest.raises(ConfigError, match=f"{field}: unknown value '{value}'.*{allowed}"):
        check_objective(make_config({field: value}))  # config.py knows no objective: the build checks its name


def test_patch_size_must_divide_image_size():
    with pytest.raises(ConfigError, match="img_size 30 is not divisible by patch_size 4"):
        make_config({"img_size": 30, "patch_size": 4})


def test_unknown_objective_option_is_named():
    cfg = make_config({"objective_options": {"decoder_dpth": 2}})
    with pytest.raises(ValueError, match="decoder_dpth.*allowed: decoder_depth"):
        build_run_objective(cfg)


# ------------------------------------------------------------------------- optimiser
def test_schedule_warms_up_linearly_then_follows_the_cosine():
    assert cosine_lr(0.0, 1.0, 0.0, 2, 10) == 0.0
    assert cosine_lr(1.0, 1.0, 0.0, 2, 10) == pytest.approx(0.5)
    assert cosine_lr(2.0, 1.0, 0.0, 2, 10) == pytest.approx(1.0)
    assert cosine_lr(6.0, 1.0, 0.0, 2, 10) == pytest.approx(0.5)
    assert cosine_lr(10.0, 1.0, 0.1, 2, 10) == pytest.approx(0.1)


def test_no_weight_decay_on_norms_biases_positions_and_tokens():
    objective = build_objective("mae", "vit_micro", 16, 4, {"decoder_depth": 1, "decoder_embed_dim": 32,
                                                            "decoder_num_heads": 2})
    groups = param_groups_weight_decay(objective, 0.05, objective.no_weight_decay())
    names = {id(p): n for n, p in objective.named_parameters()}
    undecayed = {names[id(p)] for p in groups[0]["params"]}
    decayed = {names[id(p)] for p in groups[1]["params"]}
    # MAE decays its cls and mask tokens, as the official code (add_weight_decay with no skip list) does
    assert "encoder.cls_token" in decayed and "mask_token" in decayed
    assert "encoder.blocks.0.norm1.weight" in undecayed and "encoder.blocks.0.attn.qkv.bias" in undecayed
    assert "encoder.blocks.0.attn.qkv.weight" in decayed and "decoder_pred.weight" in decayed
    assert "encoder.pos_embed" not in decayed | undecayed  # frozen: not optimised at all


# ------------------------------------------------------------------------- checkpoints
def test_checkpoints_are_atomic_and_only_the_last_k_are_kept(tmp_path):
    model = torch.nn.Linear(3, 2)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, {"step": step}, keep_last=2)
    (tmp_path / ".tmp-step-00000004-dead").mkdir()  # a save killed half-way
    (tmp_path / "step-00000005").mkdir()  # a folder without files is not a checkpoint
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]


def test_loading_a_checkpoint_of_another_model_explains_the_mismatch(tmp_path):
    save_checkpoint(tmp_path, 1, torch.nn.Linear(3, 2), {"step": 1})
    with pytest.raises(CheckpointError, match="does not fit this model.*another shape.*another model"):
        load_weights(torch.nn.Linear(4, 2), tmp_path / "step-00000001")


def test_state_file_loads_without_unpickling_objects(tmp_path):
    save_checkpoint(tmp_path, 1, torch.nn.Linear(3, 2), {"step": 1, "rng": {"torch": torch.get_rng_state()}})
    state = torch.load(tmp_path / "step-00000001" / "state.pt", weights_only=True)
    assert state["step"] == 1


# ------------------------------------------------------------------------- training
def test_a_few_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    objective = build_objective("mae", "vit_micro", 16, 4, {"decoder_depth": 1, "decoder_embed_dim": 64,
                                                            "decoder_num_heads": 2})
    images = torch.randn(8, 3, 16, 16)
    noise = objective.draw_masking(8, torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(objective.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        loss = objective(images, noise).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_run_directory_holds_config_metrics_events_checkpoints_and_picture(tmp_path, image_folder):
    """3 epochs of 2 steps, cosine lr without warm-up: every artifact holds this run's own numbers."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from conftest import check_picture, finished_run_rows
    from mimaim.cli.pretrain import pretrain as pretrain_and_draw  # the engine trains; the command draws the picture

    cfg = tiny_cfg(tmp_path, image_folder, epochs=3, warmup_epochs=0, lr=2e-3)
    run = pretrain_and_draw(cfg)
    names = {p.name for p in run.iterdir()}
    assert {"config.yaml", "metrics.csv", "summary.json", "reconstruction.png", "checkpoints", "tensorboard"} <= names
    assert make_config(load_yaml(run / "config.yaml")) == cfg

    rows = finished_run_rows(run, 6)  # 10 training images, batch 4: 2 steps per epoch
    assert list(rows[0])[:4] == ["step", "epoch", "loss", "lr"] and "images_per_s" in rows[0]
    assert [float(r["epoch"]) for r in rows] == [s / 2 for s in range(1, 7)]
    assert [float(r["lr"]) for r in rows] == pytest.approx([cosine_lr(s / 2, 2e-3, 0.0, 0, 3) for s in range(6)],
                                                            rel=1e-4)  # the lr each step used
    losses = [float(r["loss"]) for r in rows]
    assert losses[-1] < 0.8 * losses[0], losses  # MAE's reconstruction loss falls
    assert all(int(r["skipped_images"]) == 0 and float(r["images_per_s"]) > 0 for r in rows)

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("pretrain/loss")
    assert [e.step for e in scalars] == list(range(1, 7))
    assert [e.value for e in scalars] == pytest.approx(losses, rel=1e-4)

    ckpt = latest_checkpoint(run)
    assert ckpt.name == "step-00000006" and [p.name for p in list_checkpoints(run / "checkpoints")][-2:] == [
        "step-00000004", "step-00000006"]
    weights = load_file(str(ckpt / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    fresh = build_run_objective(cfg).state_dict()
    assert weights.keys() == fresh.keys() and not torch.equal(weights["decoder_pred.weight"],
                                                              fresh["decoder_pred.weight"])
    check_picture(run / "reconstruction.png", columns=4, rows=2)  # MAE's 4 columns, the 2 held-out images


def test_resume_after_a_clean_stop_matches_an_uninterrupted_run(tmp_path, image_folder, capsys):
    full = pretrain(tiny_cfg(tmp_path / "a", image_folder))
    done_full = capsys.readouterr().err.splitlines()[-1]
    part = tiny_cfg(tmp_path / "b", image_folder, max_steps=3)  # stops mid-epoch 2 (2 steps per epoch)
    pretrain(part)
    part.max_steps = None
    resumed = pretrain(part, resume=True)
    assert_same_weights(final_weights(full), final_weights(resumed))
    # the closing line and summary.json give the last step's loss: the same number for the same final weights
    done_resumed = capsys.readouterr().err.splitlines()[-1]
    assert "loss of the last step" in done_full
    last = [line.split("loss of the last step ")[1].split()[0] for line in (done_full, done_resumed)]
    assert last[0] == last[1], last
    summaries = [json.loads((run / "summary.json").read_text()) for run in (full, resumed)]
    assert summaries[0]["final_loss"] == summaries[1]["final_loss"]


@pytest.mark.slow
def test_kill_9_between_checkpoints_then_resume_matches_an_uninterrupted_run(tmp_path, image_folder):
    args = ["--data", f"imagefolder:{image_folder}", "--model", "vit_micro", "--img-size", "16", "--patch-size", "4",
            "--batch-size", "2", "--epochs", "6", "--warmup-epochs", "1", "--set", "objective.decoder_embed_dim=32",
            "--set", "objective.decoder_depth=1", "--set", "objective.decoder_num_heads=2", "--num-workers", "0", "--no-progress",
            "--save-every", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mimaim", "pretrain"]
    subprocess.run(cmd + args + ["--out", str(tmp_path / "full")], check=True, env=env, capture_output=True)

    victim = tmp_path / "killed"
    proc = subprocess.Popen(cmd + args + ["--out", str(victim)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list_checkpoints(victim / "checkpoints"):
        time.sleep(0.02)
    time.sleep(0.3)  # let it run on past the checkpoint: that work is lost and must be redone identically
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    last = latest_checkpoint(victim)
    total_steps = 6 * (10 // 2)  # 6 epochs x (2 classes x 5 training images // batch 2)
    assert last is not None
    assert int(last.name.split("-")[1]) < total_steps, "the run finished before it was killed; nothing was tested"
    subprocess.run(cmd + ["--resume", str(victim), "--no-progress"], check=True, env=env, capture_output=True)
    assert_same_weights(final_weights(tmp_path / "full"), final_weights(victim))


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, image_folder, monkeypatch):
    from mimaim.objectives.mae import MAE

    calls = {"n": 0}
    original = MAE.forward_loss

    def flaky(self, images, pred, mask):
        calls["n"] += 1
        loss, target = original(self, images, pred, mask)
        return (loss * float("nan") if calls["n"] >= 4 else loss), target

    monkeypatch.setattr(MAE, "forward_loss", flaky)
    cfg = tiny_cfg(tmp_path, image_folder, epochs=4)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 3 .*step-00000002.*--clip-grad.*--resume"):
        pretrain(cfg)
    # the failing step's weights are never saved: the last checkpoint is the periodic one before it
    last = latest_checkpoint(cfg.out)
    assert last is not None and last.name == "step-00000002"
    assert all(torch.isfinite(t).all() for t in load_file(str(last / "model.safetensors")).values())


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path, image_folder):
    args = ["--data", f"imagefolder:{image_folder}", "--model", "vit_micro", "--img-size", "16", "--patch-size", "4",
            "--batch-size", "4", "--epochs", "2", "--warmup-epochs", "1", "--set", "objective.decoder_embed_dim=32",
            "--set", "objective.decoder_depth=1", "--set", "objective.decoder_num_heads=2", "--num-workers", "0", "--no-progress",
            "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "mimaim", "pretrain", *args, "--out", str(tmp_path / "one")],
                   check=True, env=env, capture_output=True)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "mimaim", "pretrain", *args, "--out", str(tmp_path / "two")],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_weights(final_weights(tmp_path / "one"), final_weights(tmp_path / "two"), atol=1e-5)
