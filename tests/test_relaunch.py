"""Relaunch after any kill, NaN stops that can be continued, one config resolver, the bf16 warning."""

import pytest
import torch
from safetensors.torch import load_file

from mimaim.cli import main
from mimaim.config import ConfigError, load_yaml, make_config, resolve_config
from mimaim.engine.runs import save_config
from mimaim.engine.checkpoint import latest_checkpoint
from mimaim.engine.logging import read_metrics

TINY = ["--model", "vit_micro", "--img-size", "16", "--patch-size", "4", "--batch-size", "4", "--epochs", "1",
        "--warmup-epochs", "1", "--set", "objective.decoder_embed_dim=32", "--set", "objective.decoder_depth=1",
        "--set", "objective.decoder_num_heads=2", "--no-progress", "--num-workers", "0", "--log-every", "1"]


def weights(run):
    return load_file(str(latest_checkpoint(run) / "model.safetensors"))


def test_a_kill_before_the_first_checkpoint_restarts_from_step_0_with_the_recorded_config(tmp_path, image_folder):
    data = ["--data", f"imagefolder:{image_folder}"]
    assert main(["pretrain", *data, *TINY, "--out", str(tmp_path / "full")]) == 0
    killed = tmp_path / "killed"  # as a kill leaves it after config.yaml, before any checkpoint
    killed.mkdir()
    (killed / "config.yaml").write_text((tmp_path / "full" / "config.yaml").read_text()
                                        .replace(str(tmp_path / "full"), str(killed)))
    assert main(["pretrain", "--resume", str(killed), "--no-progress"]) == 0
    a, b = weights(tmp_path / "full"), weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_command_a_scheduler_reissues_starts_the_run_then_continues_it(tmp_path, image_folder, capsys):
    run = tmp_path / "job"
    cmd = ["pretrain", "--data", f"imagefolder:{image_folder}", *TINY, "--epochs", "2", "--out", str(run),
           "--resume", str(run)]
    assert main(cmd + ["--max-steps", "1"]) == 0  # first launch: no run there yet, so it starts one
    assert "holds no run yet" in capsys.readouterr().err
    assert main(cmd) == 0  # relaunch: continues from its checkpoint at step 1
    assert "resuming" in capsys.readouterr().err
    assert [int(r["step"]) for r in read_metrics(run)] == [1, 2, 3, 4]
    assert main(["pretrain", "--resume", "auto", "--out", str(run), "--no-progress"]) == 0
    assert "already finished" in capsys.readouterr().err


def test_resume_of_an_empty_folder_without_settings_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.yaml.*--config"):
        from mimaim.cli.pretrain import resolve_pretrain
        resolve_pretrain({}, resume=str(tmp_path / "empty"))


def test_after_a_nan_stop_resuming_with_a_sane_lr_finishes_with_finite_loss(tmp_path, image_folder, capsys):
    run = tmp_path / "run"
    args = ["pretrain", "--data", f"imagefolder:{image_folder}", *TINY, "--epochs", "3", "--out", str(run)]
    assert main(args + ["--lr", "1e5"]) == 1  # diverges
    err = capsys.readouterr().err
    assert "loss became" in err and "--resume" in err
    # the checkpoint written as the weights blew up (finite, but a 1e20 loss) is set aside, never resumed from
    assert latest_checkpoint(run) is None or all(
        torch.isfinite(t).all() and t.abs().max() < 1e3 for t in weights(run).values())
    assert main(["pretrain", "--resume", str(run), "--lr", "1e-4", "--no-progress"]) == 0
    rows = read_metrics(run)
    assert int(rows[-1]["step"]) == 6 and all(float(r["loss"]) < 10 for r in rows[-3:])
    assert load_yaml(run / "config.yaml")["lr"] == pytest.approx(1e-4)  # the next relaunch keeps the new lr


def test_resolver_keeps_the_recorded_run_and_lets_only_optimiser_settings_change():
    recorded = make_config(epochs=3, lr=1e5, img_size=16, patch_size=4).to_dict()
    cfg = resolve_config({"epochs": 5}, {"lr": 1e-4, "clip_grad": 1.0}, recorded)
    assert (cfg.lr, cfg.clip_grad, cfg.epochs, cfg.img_size) == (1e-4, 1.0, 5, 16)
    assert resolve_config({}, {"img_size": 16}, recorded).img_size == 16  # the same value is no change
    with pytest.raises(ConfigError, match="--img-size 32 does not match the run being resumed.*16"):
        resolve_config({}, {"img_size": 32}, recorded)
    # defaults < preset < flags for a new run
    assert resolve_config({"epochs": 4, "seed": 3}, {"epochs": 2}).epochs == 2


def test_every_config_field_has_one_flag_with_help_and_set_converts_types(tmp_path):
    import dataclasses

    from mimaim.cli import build_parser
    from mimaim.config import NESTED, PretrainConfig

    help_text = build_parser()._subparsers._group_actions[0].choices["pretrain"].format_help()
    for f in dataclasses.fields(PretrainConfig):
        assert f.metadata.get("help"), f"{f.name} has no help"
        flag = f.metadata.get("flag", True)
        nested = {v: k for k, v in NESTED.items()}  # objective_options -> objective.KEY=VALUE under --set
        assert (f"{nested[f.name]}." if flag is False else flag if isinstance(flag, str) else
                "--" + f.name.replace("_", "-")) in help_text, f.name  # a flag, or the dotted --set for a dict
    args = build_parser().parse_args(["pretrain", "--milestones", "3,4", "--schedule", "multistep",
                                      "--set", "betas=0.9,0.99", "--no-progress"])
    assert args.milestones == (3, 4) and args.progress is False and not hasattr(args, "epochs")
    cfg = make_config(betas="0.9,0.99", clip_grad="1.0", compile="true")
    assert cfg.betas == (0.9, 0.99) and cfg.clip_grad == 1.0 and cfg.compile is True


def test_config_yaml_is_written_atomically(tmp_path):
    cfg = make_config(epochs=7)
    save_config(cfg, tmp_path / "config.yaml")
    save_config(make_config(epochs=8), tmp_path / "config.yaml")
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temporary left behind
    assert load_yaml(tmp_path / "config.yaml")["epochs"] == 8


def test_bf16_on_a_cpu_without_native_bf16_warns_before_training(monkeypatch):
    from mimaim.engine import precision

    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "read_cpu_flags", lambda: {"fpu", "avx2", "avx512f"})
    warning = precision.slow_bf16_warning(cpu, "bf16")
    assert warning and "20x slower than fp32" in warning and "--precision fp32" in warning
    assert precision.slow_bf16_warning(cpu, "fp32") is None
    monkeypatch.setattr(precision, "read_cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert precision.slow_bf16_warning(cpu, "bf16") is None
    monkeypatch.setattr(precision, "read_cpu_flags", lambda: {"amx_bf16"})
    assert precision.slow_bf16_warning(cpu, "bf16") is None


def test_bf16_warning_is_printed_before_the_first_step(tmp_path, image_folder, monkeypatch, capsys):
    from mimaim.engine import precision

    monkeypatch.setattr(precision, "read_cpu_flags", lambda: {"avx2"})
    assert main(["pretrain", "--data", f"imagefolder:{image_folder}", *TINY, "--max-steps", "1",
                 "--precision", "bf16", "--device", "cpu", "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "20x slower" in err and err.index("20x slower") < err.index("done:")


def test_fsdp_with_activation_checkpointing_in_one_process_trains_like_ddp_and_loads(tmp_path, image_folder,
                                                                                     capsys):
    """--strategy fsdp on one process writes sharded (DCP) checkpoints; same weights as a plain run;
    load_backbone and load_run read them; a DDP checkpoint is not resumed under FSDP."""
    import mimaim
    from mimaim.engine.runs import load_run

    args = ["pretrain", "--data", f"imagefolder:{image_folder}", *TINY, "--max-steps", "2", "--clip-grad", "0.5",
            "--precision", "fp32", "--device", "cpu"]
    assert main(args + ["--out", str(tmp_path / "ddp")]) == 0
    assert main(args + ["--strategy", "fsdp", "--activation-checkpointing", "--out", str(tmp_path / "fsdp")]) == 0
    ckpt = latest_checkpoint(tmp_path / "fsdp")
    assert (ckpt / ".metadata").is_file() and not (ckpt / "model.safetensors").exists()
    a, b = mimaim.load_backbone(tmp_path / "ddp").state_dict(), mimaim.load_backbone(tmp_path / "fsdp").state_dict()
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert load_run(tmp_path / "fsdp")[2] == ckpt  # the whole objective too (reconstruction pictures)
    capsys.readouterr()
    assert main(["pretrain", "--resume", str(tmp_path / "ddp"), "--strategy", "fsdp", "--max-steps", "3",
                 "--no-progress"]) == 2
    assert "resume it with --strategy ddp" in capsys.readouterr().err
    assert "strategy: ddp" in (tmp_path / "ddp" / "config.yaml").read_text()  # the refused resume changed nothing


def test_init_starts_a_new_run_from_another_run_s_weights(tmp_path, image_folder, capsys):
    data = ["--data", f"imagefolder:{image_folder}"]
    assert main(["pretrain", *data, *TINY, "--out", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    assert main(["pretrain", *data, *TINY, "--init", str(tmp_path / "a"), "--max-steps", "1",
                 "--out", str(tmp_path / "b")]) == 0
    err = capsys.readouterr().err
    assert "init from" in err and "loaded" in err
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    # the first step runs at lr 0 (warm-up starts at 0), so b's weights are still a's
    enc = [k for k in a if k.startswith("encoder.")]
    assert enc and all(torch.equal(a[k], b[k]) for k in enc)
