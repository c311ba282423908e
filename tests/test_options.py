"""Options declared once: flags generated from dataclass fields, one KEY=VALUE syntax, one resolver."""

import dataclasses

import pytest

from mimaim.cli import build_parser, main
from mimaim.config import ConfigError
from mimaim.options import OptionError, add_dataclass_arguments, given, parse_assignments


def parse(*argv):
    return build_parser().parse_args(list(argv))


def test_finetune_flags_are_the_finetune_config_fields():
    from mimaim.eval.finetune import FinetuneConfig

    args = parse("finetune", "RUN", "--epochs", "2", "--hflip", "false", "--crop-scale", "0.5,1", "--no-progress",
                 "--init", "random")
    cfg = FinetuneConfig(**given(args, args.finetune_fields))
    assert (cfg.epochs, cfg.hflip, cfg.crop_scale, cfg.progress, cfg.init) == (2, False, (0.5, 1), False, "random")
    assert cfg.blr is not None  # fields not typed come from the recipe, not from a parser default
    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    assert set(args.finetune_fields) == names


def test_compare_shares_pretrain_fields_and_the_fine_tuning_recipe():
    args = parse("compare", "--objectives", "mae", "--data", "digits", "--out", "x", "--epochs", "3",
                 "--ft-blr", "1e-3", "--ft-hflip", "true", "--set", "precision=fp32")
    assert args.epochs == 3 and not hasattr(args, "batch_size")
    assert given(args, args.finetune_fields, "ft_") == {"blr": 1e-3, "hflip": True}
    from mimaim.eval.commands import _base
    assert _base(args, "vit_tiny") == {"model": "vit_tiny", "data": "digits", "epochs": 3, "precision": "fp32"}


def test_a_bad_value_in_a_grid_stops_before_any_cell(tmp_path, capsys):
    rc = main(["scale", "--objective", "mae", "--models", "vit_micro", "--data", "digits", "--out",
               str(tmp_path / "s"), "--set", "precision=fp8"])
    assert rc == 2 and "precision: unknown value 'fp8'" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_one_key_value_syntax():
    assert parse_assignments(["decoder-depth=2", "a = b=c"], "--opt") == {"decoder_depth": "2", "a": "b=c"}
    with pytest.raises(OptionError, match="--set 'oops': expected KEY=VALUE"):
        parse_assignments(["oops"], "--set")


def test_generated_arguments_leave_untyped_fields_out():
    import argparse

    @dataclasses.dataclass
    class Settings:
        steps: int = dataclasses.field(default=3, metadata={"help": "how many"})
        ratio: tuple = (0.1, 0.2)
        verbose: bool = False

    p = argparse.ArgumentParser()
    dests = add_dataclass_arguments(p, Settings)
    assert given(p.parse_args([]), dests) == {}
    assert given(p.parse_args(["--steps", "5", "--ratio", "1,2", "--verbose"]), dests) == \
        {"steps": 5, "ratio": (1, 2), "verbose": True}
    assert "how many (default 3)" in p.format_help()
    with pytest.raises(SystemExit):
        p.parse_args(["--steps", "many"])


def test_pretrain_resume_refuses_a_config_that_is_not_the_run_s(tmp_path):
    from mimaim.config import make_config, save_config
    from mimaim.launch import resolve_pretrain

    (tmp_path / "run").mkdir()
    save_config(make_config(out=str(tmp_path / "run"), lr=1e5), tmp_path / "run" / "config.yaml")
    cfg, cont = resolve_pretrain({"blr": 1e-4}, resume=str(tmp_path / "run"))
    assert cont and cfg.lr is None and cfg.blr == 1e-4  # a new --blr replaces the recorded --lr
    with pytest.raises(ConfigError, match="--out .* and --resume .* name different folders"):
        resolve_pretrain({"out": str(tmp_path / "other")}, resume=str(tmp_path / "run"))
