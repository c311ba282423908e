"""A fifth objective is one file: defined here, trained through `mimaim pretrain` with no package edit.

``TinyEMA`` is a two-view objective with an EMA target encoder, the shape of data2vec/I-JEPA
style methods: the online encoder sees view 1 and predicts the target encoder's mean token of
view 2; the target follows the online encoder by an exponential moving average after each
optimiser step (the ``after_optimizer_step`` hook).
"""

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from mimaim.cli import main
from mimaim.engine.checkpoint import latest_checkpoint
from mimaim.objectives import Objective, ObjectiveOutput


class TinyEMA(Objective):
    name = "tiny-ema"
    num_views = 2

    @dataclass
    class Options:
        momentum: float = 0.5

    def __init__(self, encoder, options):
        super().__init__(encoder, options)
        self.target = copy.deepcopy(encoder).requires_grad_(False)
        self.predictor = nn.Linear(encoder.embed_dim, encoder.embed_dim)
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))

    def forward(self, images, masking=None):
        assert images.ndim == 5 and images.shape[1] == 2, f"expected (B, 2, 3, H, W), got {tuple(images.shape)}"
        pred = self.predictor(self.encoder.forward_features(images[:, 0]).mean(1))  # (B, D)
        with torch.no_grad():
            target = self.target.forward_features(images[:, 1]).mean(1)  # (B, D)
        return ObjectiveOutput(loss=F.mse_loss(F.normalize(pred, dim=-1), F.normalize(target, dim=-1)))

    @torch.no_grad()
    def after_optimizer_step(self, step):
        for t, o in zip(self.target.parameters(), self.encoder.parameters()):
            t.lerp_(o, 1 - self.options.momentum)
        self.ema_updates += 1


def test_an_objective_defined_in_a_test_file_trains_end_to_end_through_the_cli(tmp_path, image_folder):
    run = tmp_path / "run"
    args = ["pretrain", "--objective", f"{__name__}:TinyEMA", "--set", "objective.momentum=0.9", "--data",
            f"imagefolder:{image_folder}", "--model", "vit_micro", "--img-size", "16", "--patch-size", "4",
            "--batch-size", "4", "--epochs", "2", "--warmup-epochs", "1", "--blr", "0.05", "--num-workers", "0",
            "--no-progress", "--log-every", "1", "--out", str(run)]
    assert main(args) == 0
    w = load_file(str(latest_checkpoint(run) / "model.safetensors"))
    assert int(w["ema_updates"]) == 4  # the hook ran after each of the 2 x 2 optimiser steps
    first = torch.load(latest_checkpoint(run) / "state.pt", weights_only=True)["step"]
    assert first == 4
    name = "blocks.0.attn.qkv.weight"
    online, target = w[f"encoder.{name}"], w[f"target.{name}"]
    assert not torch.equal(online, target)
    torch.manual_seed(0)  # the target moved from its start, and more slowly than the online encoder
    from mimaim.objectives import build_objective
    fresh = build_objective(f"{__name__}:TinyEMA", "vit_micro", 16, 4, {"momentum": 0.9})
    start = fresh.state_dict()[f"target.{name}"]
    assert not torch.equal(target, start)
    assert (target - start).norm() < (online - start).norm()  # the EMA moves slower than the online weights


def test_plugins_register_from_an_entry_point_or_mimaim_plugins(monkeypatch):
    import importlib.metadata
    import sys
    import types

    from mimaim.objectives import base

    class Plugin(TinyEMA):
        name = ""  # an entry point names it

    class EntryPoint:
        name, value = "from-entry-point", "somepkg.objective:Plugin"

        def load(self):
            return Plugin

    module = types.ModuleType("mimaim_test_plugin_module")
    exec("from mimaim.objectives import register_objective\n"
         "from test_plugin_objective import TinyEMA\n"
         "@register_objective\nclass FromEnv(TinyEMA):\n    name = 'from-env'\n", module.__dict__)
    monkeypatch.setitem(sys.modules, "mimaim_test_plugin_module", module)
    monkeypatch.setenv("MIMAIM_PLUGINS", "mimaim_test_plugin_module")
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group=None: [EntryPoint()] if group == base.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(base, "_plugins_loaded", False)
    monkeypatch.setattr(base, "_OBJECTIVES", dict(base._OBJECTIVES))
    names = base.list_objectives()
    assert {"mae", "from-entry-point", "from-env"} <= set(names)
    assert base.get_objective_class("from-entry-point") is Plugin
