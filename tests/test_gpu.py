"""CUDA-only checks (skipped without a GPU): the paths the CPU suite cannot reach.

Run on a GPU machine with ``python -m pytest -q -m gpu tests/test_gpu.py`` (part of
``benchmarks/gpu_suite.sh``).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from mimaim.objectives import build_objective

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CUDA = torch.device("cuda")


def tiny_aim(kernel: str):
    torch.manual_seed(0)
    return build_objective("aim", "vit_small", 64, 8, {"attention_kernel": kernel, "head_width": 256,
                                                       "head_depth": 2}, depth=4).to(CUDA)


@pytest.fixture
def process_group():
    """A one-process NCCL group, as torchrun would give rank 0 of 1."""
    if not dist.is_initialized():
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=CUDA)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("compiled", [False, True])
def test_flex_block_mask_equals_dense_sdpa_mask(compiled):
    """AIM's prefix-causal attention through flex_attention (BlockMask) = dense boolean SDPA, loss and gradients."""
    flex, dense = tiny_aim("flex"), tiny_aim("sdpa")
    g = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, 64, 64, generator=g).to(CUDA)
    prefix = flex.draw_masking(8, g).to(CUDA)  # drawn on the CPU like the loader, moved like the trainer
    grads = []
    for model in (flex, dense):
        run = torch.compile(model) if compiled else model
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = run(images, prefix).loss
        loss.backward()
        grads.append((loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()
                                              if p.grad is not None}))
    (l1, g1), (l2, g2) = grads
    torch.testing.assert_close(l1, l2, rtol=2e-2, atol=2e-3)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=5e-2, atol=5e-3, msg=name)


@pytest.mark.parametrize("checkpointing,compiled", [(False, False), (True, True)])
def test_fsdp_bf16_step_keeps_fp32_master_weights(process_group, checkpointing, compiled):
    """FSDP2 with bf16 all-gathers and fp32 reduction: one step runs, master weights stay fp32 and move."""
    from mimaim.engine.fsdp import shard_objective
    from mimaim.engine.optim import build_optimizer

    torch.manual_seed(0)
    obj = build_objective("mae", "vit_small", 64, 8, {"decoder_embed_dim": 128, "decoder_depth": 2,
                                                      "decoder_num_heads": 4}, depth=4).to(CUDA)
    before = {n: p.detach().clone() for n, p in obj.named_parameters()}
    shard_objective(obj, CUDA, "bf16", activation_checkpointing=checkpointing, compile=compiled)
    opt = build_optimizer(obj, 1e-3, 0.05, (0.9, 0.95), obj.no_weight_decay())
    g = torch.Generator().manual_seed(0)
    images = torch.randn(16, 3, 64, 64, generator=g).to(CUDA)
    noise = obj.draw_masking(16, g).to(CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = obj(images, noise).loss
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(obj.parameters(), 1.0).full_tensor()  # as the trainer clips
    opt.step()
    assert torch.isfinite(loss) and torch.isfinite(norm) and norm > 0
    for name, p in obj.named_parameters():
        assert p.dtype == torch.float32, name
        if p.requires_grad:
            assert not torch.equal(p.full_tensor(), before[name]), f"{name} did not move"


def test_dry_run_estimate_is_close_to_the_measured_peak():
    """The --dry-run total for one GPU against torch.cuda.max_memory_allocated (MAE ViT-B/16, batch 64)."""
    from mimaim.engine.estimate import estimate

    torch.manual_seed(0)
    obj = build_objective("mae", "vit_base", 224, 16, {})
    est = estimate(obj, "ddp", "bf16", batch_per_gpu=64, world_size=1)
    obj = obj.to(CUDA).train()
    opt = torch.optim.AdamW(obj.parameters(), lr=1e-4, fused=True)
    images = torch.randn(64, 3, 224, 224, device=CUDA)
    noise = torch.rand(64, 196, device=CUDA)
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):  # the second step has the AdamW state allocated
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = obj(images, noise).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - images.numel() * 4 - noise.numel() * 4
    ratio = measured / est["total_bytes"]
    print(f"MAE-B/16 batch 64 bf16: measured peak {measured / 2**30:.2f} GiB, estimate "
          f"{est['total_bytes'] / 2**30:.2f} GiB (ratio {ratio:.2f})")
    assert 0.7 < ratio < 1.5


def test_pretrain_on_cuda_with_compile_and_loader_masks(tmp_path):
    """The whole trainer on CUDA: masks drawn in loader workers, bf16, compile; loss finite, checkpoint written."""
    from conftest import finished_run_rows, make_image_folder
    from safetensors.torch import load_file

    from mimaim.engine.checkpoint import latest_checkpoint
    from mimaim.cli.pretrain import pretrain_command

    data = make_image_folder(tmp_path / "images", per_class=16, size=32)
    for objective in ("mae", "aim"):
        out = tmp_path / objective
        pretrain_command({"objective": objective, "data": f"imagefolder:{data}", "img_size": 32, "patch_size": 4,
                          "batch_size": 8, "epochs": 1, "max_steps": 3, "device": "cuda", "precision": "bf16",
                          "compile": True, "num_workers": 2, "out": str(out), "progress": False})
        finished_run_rows(out, 3)
        ckpt = latest_checkpoint(out)
        assert ckpt.name == "step-00000003"
        assert all(torch.isfinite(w).all() for w in load_file(str(ckpt / "model.safetensors")).values())
