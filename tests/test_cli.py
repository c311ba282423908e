"""The command line end to end, as a new user drives it, on tiny generated images."""

import subprocess
import sys

import pytest

from mimaim.cli import main

TINY = ["--model", "vit_micro", "--img-size", "16", "--patch-size", "4", "--batch-size", "4", "--epochs", "1",
        "--set", "objective.decoder_embed_dim=32", "--set", "objective.decoder_depth=1",
        "--set", "objective.decoder_num_heads=2", "--no-progress"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "mimaim", *args], capture_output=True, text=True)


def test_help_explains_every_sub_command():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("pretrain", "probe", "reconstruct"):
        assert command in result.stdout
    pre = run_cli("pretrain", "--help").stdout
    for flag in ("--objective", "--model", "--img-size", "--patch-size", "--epochs", "--batch-size", "--accum-steps",
                 "--blr", "--warmup-epochs", "--weight-decay", "--mask-ratio", "--seed", "--out", "--config",
                 "--resume", "--precision", "--compile", "--data"):
        assert flag in pre


def test_pretrain_probe_reconstruct(tmp_path, image_folder, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", "--data", f"imagefolder:{image_folder}", *TINY, "--out", str(run)]) == 0
    assert list((run / "checkpoints").glob("step-*/model.safetensors"))
    assert main(["probe", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| pre-trained |" in out and "| random init |" in out and "linear top-1" in out and "knn top-1" in out
    assert (run / "probe.json").exists() and list((run / "features").glob("*.pt"))
    picture = tmp_path / "recon.png"
    img = next((image_folder / "a").glob("*.png"))
    assert main(["reconstruct", str(run), "--images", str(img), str(img), "--out", str(picture)]) == 0
    assert picture.stat().st_size > 1000


def test_bad_values_stop_before_any_work_with_a_message(tmp_path, image_folder):
    result = run_cli("pretrain", "--objective", "mea", "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and "unknown value 'mea'" in result.stderr and "mae" in result.stderr
    result = run_cli("pretrain", "--data", f"imagefolder:{tmp_path / 'missing'}", "--out", str(tmp_path / "y"))
    assert result.returncode == 2 and "does not exist" in result.stderr
    result = run_cli("pretrain", "--set", "objective.decoder_width=3", "--out", str(tmp_path / "z"))
    assert result.returncode == 2 and "decoder_width" in result.stderr and "allowed" in result.stderr
    result = run_cli("pretrain", "--mask-ratio", "1.5", "--out", str(tmp_path / "w"))
    assert result.returncode == 2 and "mask_ratio must be in [0, 1)" in result.stderr
    result = run_cli("pretrain", "--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "config file" in result.stderr
    assert "Traceback" not in result.stderr
    for name in "xyzw":  # nothing was started, so no run directory was left behind
        assert not (tmp_path / name).exists()


def test_yaml_preset_with_command_line_override(tmp_path, image_folder):
    preset = tmp_path / "p.yaml"
    preset.write_text("objective: mae\nmodel: vit_micro\nimg_size: 16\npatch_size: 4\nepochs: 3\nbatch_size: 4\n"
                      "objective_options: {decoder_depth: 1, decoder_embed_dim: 32, decoder_num_heads: 2}\n")
    run = tmp_path / "run"
    assert main(["pretrain", "--config", str(preset), "--epochs", "1", "--data", f"imagefolder:{image_folder}",
                 "--no-progress", "--out", str(run)]) == 0
    text = (run / "config.yaml").read_text()
    assert "epochs: 1" in text and "decoder_depth: 1" in text


def test_probe_and_resume_refuse_what_does_not_fit(tmp_path, image_folder):
    run = tmp_path / "run"
    assert main(["pretrain", "--data", f"imagefolder:{image_folder}", *TINY, "--out", str(run)]) == 0
    result = run_cli("pretrain", "--resume", str(run), "--model", "vit_tiny")
    assert result.returncode == 2 and "does not match the run being resumed" in result.stderr
    result = run_cli("pretrain", "--data", f"imagefolder:{image_folder}", *TINY, "--out", str(run))
    assert result.returncode == 2 and "already holds a run" in result.stderr and "--resume" in result.stderr
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in (image_folder / "a").iterdir():
        (flat / p.name).write_bytes(p.read_bytes())
    result = run_cli("probe", str(run), "--data", f"imagefolder:{flat}")
    assert result.returncode == 2 and "has no labels" in result.stderr
    result = run_cli("probe", str(tmp_path / "not-a-run"))
    assert result.returncode == 2 and "does not exist" in result.stderr
    # weights of another architecture under this run's config
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("model: vit_micro", "model: vit_tiny"))
    for record in (run / "checkpoints").glob("step-*/run.json"):  # the checkpoint's own record (C1) wins
        record.write_text(record.read_text().replace('"vit_micro"', '"vit_tiny"'))
    result = run_cli("probe", str(run))
    assert result.returncode == 2 and "does not fit this model" in result.stderr


@pytest.mark.parametrize("argv, norm", [([], None), (["--norm"], True), (["--no-norm"], False)])
def test_probe_norm_flag_is_the_protocol_unless_given(argv, norm, capsys):
    from mimaim.cli import build_parser
    args = build_parser().parse_args(["probe", "RUN", *argv])
    assert getattr(args, "norm", None) is norm
    with pytest.raises(SystemExit):
        build_parser().parse_args(["probe", "--help"])
    help_text = capsys.readouterr().out
    assert "(default: None)" not in help_text and "--no-norm" in help_text
