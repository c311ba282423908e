"""``--dry-run``: the estimate's exact parts (parameters, weights, gradients, AdamW state) and its measured parts."""

from __future__ import annotations

import pytest
import torch

from mimaim.engine.estimate import GiB, build_on_meta, dry_run, estimate, estimate_choices, format_estimate
from mimaim.objectives import build_objective, list_objectives

MAE_TINY = dict(options={"decoder_embed_dim": 32, "decoder_depth": 2, "decoder_num_heads": 2},
                backbone=dict(embed_dim=64, depth=3, num_heads=2))


def tiny_mae():
    torch.manual_seed(0)
    return build_objective("mae", "vit_micro", 32, 4, MAE_TINY["options"], **MAE_TINY["backbone"])


def test_weights_gradients_and_optimizer_follow_the_real_parameter_count():
    model = tiny_mae()
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable < params  # MAE's sin-cos tables are frozen parameters
    est = estimate(model, "ddp", "fp32", batch_per_gpu=2, world_size=4)
    assert (est["parameters"], est["trainable_parameters"]) == (params, trainable)
    assert est["encoder_parameters"] == sum(p.numel() for p in model.encoder.parameters())
    b = est["bytes"]
    assert (b["weights"], b["gradients"], b["optimizer"]) == (4 * params, 4 * trainable, 8 * trainable)
    assert next(model.parameters()).device.type == "cpu"  # the caller's model is left alone

    sharded = estimate(model, "fsdp", "fp32", batch_per_gpu=2, world_size=4)
    for key in ("weights", "gradients", "optimizer"):
        assert sharded["bytes"][key] == b[key] / 4
    assert sharded["bytes"]["activations"] == b["activations"]  # activations are per GPU either way


def test_meta_build_has_the_same_parameters_as_the_real_one():
    real = tiny_mae()
    meta = build_on_meta(tiny_mae)
    assert {n: p.shape for n, p in real.named_parameters()} == {n: p.shape for n, p in meta.named_parameters()}
    assert all(p.device.type == "meta" for p in meta.parameters())


def test_activations_scale_with_the_batch_and_shrink_with_checkpointing():
    model = build_on_meta(tiny_mae)
    one, two = (estimate(model, "ddp", "bf16", batch_per_gpu=b)["bytes"]["activations"] for b in (8, 16))
    assert 1.9 < two / one < 2.05
    fp32 = estimate(model, "ddp", "fp32", batch_per_gpu=8)["bytes"]["activations"]
    assert 1.6 < fp32 / one <= 2.0  # bf16 halves most saved tensors (loss-side ones stay fp32)
    choices = estimate_choices(model, "bf16", 8, 2)
    plain, ckpt = choices[("ddp", False)], choices[("ddp", True)]
    assert ckpt["bytes"]["activations"] < 0.6 * plain["bytes"]["activations"]
    assert ckpt["flops_per_image"] > plain["flops_per_image"]  # the recompute
    assert choices[("fsdp", True)]["total_bytes"] < ckpt["total_bytes"]


def test_flops_per_image_match_a_real_step_counted_the_same_way():
    """The meta trace counts what FlopCounterMode counts on a real CPU step, plus attention.

    FlopCounterMode has no formula for the CPU's fused SDPA kernel, so on CPU it counts the
    Linears and the patch conv only; the trace runs attention as CUDA's fused kernel, which
    it counts: 4 * B * T^2 * D per attention forward (QK^T and AV).
    """
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_mae()
    B = 4
    images = torch.randn(B, 3, 32, 32)
    noise = model.draw_masking(B, torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as forward:
        loss = model(images, noise).loss
    with FlopCounterMode(display=False) as backward:
        loss.backward()
    est = estimate(model, "ddp", "fp32", batch_per_gpu=B)
    visible = 1 + int(64 * (1 - 0.75))  # cls + 16 of the 64 patches
    attention = 4 * B * (3 * visible ** 2 * 64 + 2 * 65 ** 2 * 32)  # 3 encoder blocks (D 64), 2 decoder (D 32)
    assert est["trace"]["forward_flops"] == forward.get_total_flops() + attention
    # backward: the fused attention backward recomputes the scores, 2.5x its forward
    assert est["trace"]["flops"] == forward.get_total_flops() + backward.get_total_flops() + 3.5 * attention
    assert est["flops_per_image"] == est["trace"]["flops"] / B


def test_dry_run_report_for_a_config():
    from mimaim.config import make_config

    cfg = make_config(objective="aim", model="vit_micro", img_size=32, patch_size=4, batch_size=64, accum_steps=2)
    text = dry_run(cfg, world_size=2, show=False)
    assert "batch 16 per GPU (global 32)" in text and "global batch 64 = 2 GPU(s) x 2 accumulation x 16" in text
    assert "fsdp" in text and "GFLOP" in text
    big = estimate(build_on_meta(tiny_mae), "ddp", "fp32", batch_per_gpu=8)
    assert "warning" in format_estimate(big, gpu_memory_gib=big["total_bytes"] / GiB)


def test_gpus_plans_the_dry_run_for_that_many_gpus_and_needs_dry_run(capsys):
    from mimaim.cli import main

    args = ["pretrain", "--objective", "aim", "--model", "vit_micro", "--img-size", "32", "--patch-size", "4",
            "--batch-size", "64", "--strategy", "fsdp", "--out", "unused"]
    assert main(args + ["--dry-run", "--gpus", "4"]) == 0
    assert "global batch 64 = 4 GPU(s) x 1 accumulation x 16" in capsys.readouterr().out
    assert main(args + ["--gpus", "4"]) == 2  # training on N GPUs is torchrun's job
    assert "torchrun --nproc_per_node=N" in capsys.readouterr().err


@pytest.mark.parametrize("objective", list_objectives())
def test_every_objective_traces_on_meta(objective):
    """Index arithmetic that reads sizes back (I-JEPA cuts its blocks to the batch's smallest) runs on the CPU
    masking; only the weights and activations are meta. The dry run and the online probe's FLOPs use this."""
    from mimaim.config import make_config

    cfg = make_config(objective=objective, model="vit_micro", img_size=32, patch_size=4)
    est = estimate(cfg, "ddp", "fp32", batch_per_gpu=4)
    assert est["flops_per_image"] > 0 and est["bytes"]["activations"] > 0
    assert dry_run(cfg, world_size=1, show=False).count("GFLOP") >= 1
