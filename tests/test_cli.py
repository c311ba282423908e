"""The command line end to end, as a new user drives it, on tiny generated images."""

import json
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
    rows = {r["encoder"]: r for r in json.loads((run / "probe.json").read_text())}
    assert set(rows) == {"pre-trained", "random init"} and list((run / "features").glob("*.pt"))
    pre = rows["pre-trained"]  # what the table printed, with the run it read
    assert (pre["checkpoint"], pre["train_images"], pre["val_images"]) == ("step-00000002", 10, 2)
    assert f"| pre-trained | {pre['linear_top1']:.2f} | {pre['attentive_top1']:.2f} | {pre['knn_top1']:.2f} |" in out
    picture = tmp_path / "recon.png"
    img = next((image_folder / "a").glob("*.png"))
    assert main(["reconstruct", str(run), "--images", str(img), str(img), "--out", str(picture)]) == 0
    assert picture.stat().st_size > 1000


def test_bad_values_stop_before_any_work_with_a_message(tmp_path, capsys):
    def error(*argv):
        assert main(list(argv)) == 2
        return capsys.readouterr().err

    err = error("pretrain", "--objective", "mea", "--out", str(tmp_path / "x"))
    assert "unknown value 'mea'" in err and "mae" in err
    assert "does not exist" in error("pretrain", "--data", f"imagefolder:{tmp_path / 'missing'}",
                                     "--out", str(tmp_path / "y"))
    err = error("pretrain", "--set", "objective.decoder_width=3", "--out", str(tmp_path / "z"))
    assert "decoder_width" in err and "allowed" in err
    assert "mask_ratio must be in [0, 1)" in error("pretrain", "--mask-ratio", "1.5", "--out", str(tmp_path / "w"))
    assert "--set 'decoder_depth': expected KEY=VALUE" in error("pretrain", "--set", "decoder_depth")
    assert "config file" in error("pretrain", "--config", str(tmp_path / "nope.yaml"))
    for name in "xyzw":  # nothing was started, so no run directory was left behind
        assert not (tmp_path / name).exists()
    result = run_cli("pretrain", "--objective", "mea")  # the command line: one line, no traceback
    assert result.returncode == 2 and result.stderr.startswith("mimaim: error:") and "Traceback" not in result.stderr


def test_yaml_preset_with_command_line_override(tmp_path, image_folder):
    preset = tmp_path / "p.yaml"
    preset.write_text("objective: mae\nmodel: vit_micro\nimg_size: 16\npatch_size: 4\nepochs: 3\nbatch_size: 4\n"
                      "objective_options: {decoder_depth: 1, decoder_embed_dim: 32, decoder_num_heads: 2}\n")
    run = tmp_path / "run"
    assert main(["pretrain", "--config", str(preset), "--epochs", "1", "--data", f"imagefolder:{image_folder}",
                 "--no-progress", "--out", str(run)]) == 0
    text = (run / "config.yaml").read_text()
    assert "epochs: 1" in text and "decoder_depth: 1" in text


def test_probe_and_resume_refuse_what_does_not_fit(tmp_path, image_folder, capsys):
    def error(*argv):
        assert main(list(argv)) == 2
        return capsys.readouterr().err

    run = tmp_path / "run"
    assert main(["pretrain", "--data", f"imagefolder:{image_folder}", *TINY, "--out", str(run)]) == 0
    assert "does not match the run being resumed" in error("pretrain", "--resume", str(run), "--model", "vit_tiny")
    err = error("pretrain", "--data", f"imagefolder:{image_folder}", *TINY, "--out", str(run))
    assert "already holds a run" in err and "--resume" in err
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in (image_folder / "a").iterdir():
        (flat / p.name).write_bytes(p.read_bytes())
    assert "has no labels" in error("probe", str(run), "--data", f"imagefolder:{flat}")
    assert "does not exist" in error("probe", str(tmp_path / "not-a-run"))
    # weights of another architecture under this run's config
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("model: vit_micro", "model: vit_tiny"))
    for record in (run / "checkpoints").glob("step-*/run.json"):  # the checkpoint's own record wins
        record.write_text(record.read_text().replace('"vit_micro"', '"vit_tiny"'))
    assert "does not fit this model" in error("probe", str(run))


@pytest.mark.parametrize("argv, norm", [([], None), (["--norm"], True), (["--no-norm"], False)])
def test_probe_norm_flag_is_the_protocol_unless_given(argv, norm, capsys):
    from mimaim.cli import build_parser
    args = build_parser().parse_args(["probe", "RUN", *argv])
    assert getattr(args, "norm", None) is norm
    with pytest.raises(SystemExit):
        build_parser().parse_args(["probe", "--help"])
    help_text = capsys.readouterr().out
    assert "(default: None)" not in help_text and "--no-norm" in help_text


def test_reconstruct_draws_training_images_when_none_are_held_out(tmp_path, capsys):
    """3 images per class: val_fraction 0.2 holds none out, so the picture (at the end of the run and from
    `mimaim reconstruct`) shows training images and says so."""
    from conftest import check_picture, make_image_folder

    data, run = make_image_folder(tmp_path / "small", per_class=3), tmp_path / "run"
    assert main(["pretrain", "--data", f"imagefolder:{data}", *TINY, "--out", str(run)]) == 0
    assert "the picture shows training images" in capsys.readouterr().err
    check_picture(run / "reconstruction.png", columns=4, rows=2)  # one per class
    assert main(["reconstruct", str(run), "--out", str(tmp_path / "again.png")]) == 0
    out = capsys.readouterr()
    assert "holds no images out" in out.err and "training images" in out.err and "again.png" in out.out
    check_picture(tmp_path / "again.png", columns=4, rows=2)
