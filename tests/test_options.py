"""Settings declared once: flags generated from dataclass fields, one dotted KEY=VALUE syntax, one converter."""

import argparse
import dataclasses

import pytest

from mimaim.cli import build_parser, main
from mimaim.cli.options import add_fields, given
from mimaim.config import ConfigError, PretrainConfig, convert, make_config, parse_overrides


def parse(*argv):
    return build_parser().parse_args(list(argv))


def test_finetune_flags_are_the_finetune_config_fields():
    from mimaim.eval.recipes import FinetuneConfig

    args = parse("finetune", "RUN", "--epochs", "2", "--hflip", "false", "--crop-scale", "0.5,1", "--no-progress",
                 "--init", "random")
    cfg = FinetuneConfig(**given(args, args.fields))
    assert (cfg.epochs, cfg.hflip, cfg.crop_scale, cfg.progress, cfg.init) == (2, False, (0.5, 1), False, "random")
    assert cfg.blr is not None  # fields not typed come from the recipe, not from a parser default
    assert set(args.fields) == {f.name for f in dataclasses.fields(FinetuneConfig)}


def test_one_dotted_override_for_settings_objective_options_and_augmentation():
    sets = parse_overrides(["warmup-epochs=5", "objective.decoder_depth=8", "objective.attention=causal",
                            "augmentation.crop_scale=0.4,1", "a = b=c"])
    assert sets == {"warmup_epochs": "5", "objective_options": {"decoder_depth": 8, "attention": "causal"},
                    "augmentation": {"crop_scale": "0.4,1"}, "a": "b=c"}
    for bad in ("oops", "=1", "decoder.depth=8"):
        with pytest.raises(ConfigError, match="--set"):
            parse_overrides([bad])
    sets.pop("a")
    cfg = make_config(**sets)
    assert cfg.warmup_epochs == 5.0 and cfg.augmentation == {"crop_scale": (0.4, 1)}
    assert cfg.objective_options == {"decoder_depth": 8, "attention": "causal"}  # recorded typed, not '8'


def test_the_one_converter_reads_fields_and_option_defaults_alike():
    fields = {f.name: f for f in dataclasses.fields(PretrainConfig)}
    assert convert("1e-4", fields["lr"], "lr") == 1e-4 and convert("none", fields["lr"], "lr") is None
    assert convert("off", fields["compile"], "compile") is False
    assert convert("0.9,0.99", fields["betas"], "betas") == (0.9, 0.99)
    assert convert("3", 0.5, "mae.mask_ratio") == 3.0 and isinstance(convert("3", 0.5, "x"), float)
    assert convert("8", None, "x") == 8 and convert("kmeans", "dalle", "x") == "kmeans"
    with pytest.raises(ConfigError, match="blr: cannot read 'fast' as float"):
        convert("fast", fields["blr"], "blr")


def test_compare_shares_pretrain_fields_and_the_fine_tuning_recipe():
    from mimaim.cli.studies import _base

    args = parse("compare", "--objectives", "mae", "--data", "digits", "--out", "x", "--epochs", "3",
                 "--set", "finetune.blr=1e-3", "--set", "finetune.hflip=true", "--set", "precision=fp32")
    assert args.epochs == 3 and not hasattr(args, "batch_size")
    base, finetune = _base(args, "vit_tiny")
    assert base == {"model": "vit_tiny", "data": "digits", "epochs": 3, "precision": "fp32"}
    assert finetune == {"blr": 1e-3, "hflip": True}


def test_a_bad_value_in_a_grid_stops_before_any_cell(tmp_path, capsys):
    rc = main(["scale", "--objective", "mae", "--models", "vit_micro", "--data", "digits", "--out",
               str(tmp_path / "s"), "--set", "precision=fp8"])
    assert rc == 2 and "precision: unknown value 'fp8'" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_generated_arguments_leave_untyped_fields_out():
    @dataclasses.dataclass
    class Settings:
        steps: int = dataclasses.field(default=3, metadata={"help": "how many"})
        ratio: tuple = (0.1, 0.2)
        verbose: bool = False
        hidden: int = dataclasses.field(default=1, metadata={"flag": False})

    p = argparse.ArgumentParser()
    dests = add_fields(p, Settings)
    assert dests == ["steps", "ratio", "verbose"]
    assert given(p.parse_args([]), dests) == {}
    assert given(p.parse_args(["--steps", "5", "--ratio", "1,2", "--verbose"]), dests) == \
        {"steps": 5, "ratio": (1, 2), "verbose": True}
    assert "how many (default 3)" in p.format_help()
    with pytest.raises(SystemExit):
        p.parse_args(["--steps", "many"])


def test_pretrain_resume_refuses_a_config_that_is_not_the_run_s(tmp_path):
    from mimaim.cli.pretrain import resolve_pretrain
    from mimaim.engine.runs import save_config

    (tmp_path / "run").mkdir()
    save_config(make_config(out=str(tmp_path / "run"), lr=1e5), tmp_path / "run" / "config.yaml")
    cfg, cont = resolve_pretrain({"blr": 1e-4}, resume=str(tmp_path / "run"))
    assert cont and cfg.lr is None and cfg.blr == 1e-4  # a new --blr replaces the recorded --lr
    with pytest.raises(ConfigError, match="--out .* and --resume .* name different folders"):
        resolve_pretrain({"out": str(tmp_path / "other")}, resume=str(tmp_path / "run"))


def test_building_the_parser_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys, mimaim.cli as c; c.build_parser(); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'timm', 'numpy', 'torchvision'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
