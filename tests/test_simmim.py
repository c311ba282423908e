"""SimMIM (objectives/simmim.py, masking.simmim_mask): masking, loss, errors, training, CLI."""

import math

import pytest
import torch

from mimaim.cli import main
from mimaim.masking import simmim_mask
from mimaim.objectives import build_objective


def _tiny_vit(**opts):
    torch.manual_seed(0)
    return build_objective("simmim", "vit_tiny", 32, 4, {"mask_patch_size": 8, "drop_path_rate": 0.0, **opts},
                           embed_dim=48, depth=2, num_heads=3)


def _tiny_swin(**opts):
    torch.manual_seed(0)
    return build_objective("simmim", "swin_tiny", 32, 4,
                           {"mask_patch_size": 8, "window_size": 4, "drop_path_rate": 0.0, **opts},
                           embed_dim=12, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4))


# --------------------------------------------------------------------------- masking
@pytest.mark.parametrize("img, cell, patch, masked_cells", [
    (224, 32, 16, 30),  # the paper's ViT: 7x7 cells, ceil(49 * 0.6) = 30, each 2x2 tokens
    (192, 32, 4, 22),   # the paper's Swin: 6x6 cells, ceil(36 * 0.6) = 22, each 8x8 tokens
    (32, 8, 4, 10),     # quick: 4x4 cells, ceil(16 * 0.6) = 10
])
def test_mask_count_and_cell_structure_over_many_draws(img, cell, patch, masked_cells):
    g = torch.Generator().manual_seed(0)
    side, scale = img // cell, cell // patch
    draws = torch.stack([simmim_mask(img, cell, patch, 0.6, g) for _ in range(600)])  # (D, N)
    assert draws.dtype == torch.bool and draws.shape[1] == (img // patch) ** 2
    assert (draws.sum(1) == masked_cells * scale ** 2).all()  # exactly ceil(cells * ratio) cells every time
    grid = draws.view(-1, side, scale, side, scale)
    assert (grid == grid[:, :, :1, :, :1]).all()  # every cell is all masked or all visible
    per_cell = grid[:, :, 0, :, 0].float().mean(0)  # how often each cell is masked
    expected = masked_cells / side ** 2
    assert (per_cell - expected).abs().max() < 0.1  # uniform over cells
    assert math.isclose(per_cell.mean().item(), expected, rel_tol=1e-6)


def test_sample_masking_is_reproducible_from_the_generator():
    objective = _tiny_vit()
    a = objective.sample_masking(torch.Generator().manual_seed(3))
    b = objective.sample_masking(torch.Generator().manual_seed(3))
    c = objective.sample_masking(torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and a.shape == (64,) and not torch.equal(a, c)
    swin = _tiny_swin()
    assert swin.sample_masking(torch.Generator()).shape == (64,)  # Swin patch 4: an 8x8 token grid


# --------------------------------------------------------------------------- loss
def test_loss_counts_only_masked_pixels_with_the_official_normaliser():
    objective = _tiny_vit().eval()
    images = torch.randn(2, 3, 32, 32)
    mask = objective.draw_masking(2, torch.Generator().manual_seed(0))
    pixel_mask = objective.pixel_mask(mask)  # (B, 1, H, W)
    assert pixel_mask.shape == (2, 1, 32, 32)
    pred = torch.randn(2, 3, 32, 32)
    loss = objective.forward_loss(images, pred, mask)
    by_hand = ((pred - images).abs() * pixel_mask).sum() / (pixel_mask.sum() + 1e-5) / 3
    torch.testing.assert_close(loss, by_hand)
    # changing the prediction on visible pixels changes nothing
    visible = ~pixel_mask.bool()
    other = torch.where(visible, pred + 100.0, pred)
    torch.testing.assert_close(objective.forward_loss(images, other, mask), loss)
    # a perfect prediction of the masked pixels gives zero whatever the visible ones are
    perfect = torch.where(visible, pred, images)
    assert objective.forward_loss(images, perfect, mask).item() == 0.0


@pytest.mark.parametrize("make", [_tiny_vit, _tiny_swin], ids=["vit", "swin"])
def test_encoder_sees_mask_tokens_and_head_reaches_pixels(make):
    objective = make().eval()
    images = torch.randn(2, 3, 32, 32)
    mask = objective.draw_masking(2, torch.Generator().manual_seed(0))
    out = objective(images, mask)
    assert out.pred.shape == images.shape and out.mask.shape == (2, 64)
    # the visible pixels of masked patches never reach the encoder: changing them changes nothing
    pm = objective.pixel_mask(mask).bool().expand_as(images)
    changed = torch.where(pm, images + torch.randn_like(images), images)
    with torch.no_grad():
        z1 = objective.forward_encoder(images, mask)
        z2 = objective.forward_encoder(changed, mask)
    torch.testing.assert_close(z1, z2)
    stride = 4 if make is _tiny_vit else 32
    assert objective.decoder[0].out_channels == stride ** 2 * 3 and objective.decoder[1].upscale_factor == stride
    cols = objective.reconstruct(images, mask)
    assert list(cols) == ["original", "masked", "reconstruction", "reconstruction + visible"]
    assert all(v.shape == images.shape for v in cols.values())
    keep = ~pm
    torch.testing.assert_close(cols["reconstruction + visible"][keep], images[keep])
    assert (cols["masked"][pm] == 0).all()


def decay_split(objective):
    """(decayed, undecayed) parameter names of the optimiser groups the engine builds for ``objective``."""
    from mimaim.engine.optim import param_groups_weight_decay

    names = {id(p): n for n, p in objective.named_parameters()}
    groups = param_groups_weight_decay(objective, 0.05, objective.no_weight_decay())
    return {names[id(p)] for p in groups[1]["params"]}, {names[id(p)] for p in groups[0]["params"]}


def test_vit_flavours_and_weight_decay_follow_the_official_code():
    beit = _tiny_vit()
    enc = beit.encoder
    assert enc.rel_pos_bias is not None and enc.pos_embed is None and enc.cls_token is not None
    assert enc.blocks[0].attn.q_bias is not None and torch.allclose(enc.blocks[0].ls1.gamma, torch.tensor(0.1))
    assert beit.mask_token.abs().max() <= 0.02 + 1e-7  # trunc normal clipped at +-std
    # the official ViT's skip list is {pos_embed, cls_token}: the mask token and the shared relative
    # position bias table are decayed (optimizer.py get_pretrain_param_groups)
    decayed, undecayed = decay_split(beit)
    assert {"mask_token", "encoder.rel_pos_bias.relative_position_bias_table"} <= decayed
    assert "encoder.cls_token" in undecayed
    # MODEL.VIT.USE_APE: a learned table clipped at +-std as the rest (VisionTransformerForSimMIM._trunc_normal_),
    # beside the shared relative bias; USE_SHARED_RPB off or INIT_VALUES 0 (layer_scale) as the official flags
    ape = _tiny_vit(use_ape=True).encoder
    assert ape.pos_embed_kind == "learned" and ape.rel_pos_bias is not None and 0 < ape.pos_embed.abs().max() <= 0.02
    bare = _tiny_vit(use_ape=True, rel_pos_bias=False, layer_scale=0.0).encoder
    assert bare.rel_pos_bias is None and not hasattr(bare.blocks[0].ls1, "gamma")
    assert "encoder.pos_embed" in decay_split(_tiny_vit(use_ape=True))[1]
    plain = _tiny_vit(vit_flavour="plain")
    assert plain.encoder.rel_pos_bias is None and plain.encoder.pos_embed_kind == "learned"
    assert plain.encoder.blocks[0].attn.q_bias is None
    assert "encoder.pos_embed" in decay_split(plain)[1]
    # the official Swin keeps its mask token and every relative position bias table out of decay
    decayed, undecayed = decay_split(_tiny_swin())
    assert "mask_token" in undecayed and not any("relative_position_bias_table" in n for n in decayed)
    assert any("relative_position_bias_table" in n for n in undecayed)


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("opts, match", [
    ({"mask_patch_size": 12}, r"mask_patch_size 12 does not divide the image size 32.*one of 4, 8, 16, 32"),
    ({"mask_patch_size": 2}, r"mask_patch_size 2 is not a multiple of the model patch size 4"),
    ({"mask_ratio": 1.0}, r"mask_ratio must be in \(0, 1\)"),
    ({"vit_flavour": "deit"}, r"vit_flavour: unknown value 'deit'; choose one of beit, plain"),
])
def test_bad_options_are_named_with_the_fix(opts, match):
    with pytest.raises(ValueError, match=match):
        _tiny_vit(**opts)


def test_bad_swin_window_and_mask_cell_are_named():
    with pytest.raises(ValueError, match=r"window_size 7 does not fit image size 32.*window_size=4"):
        _tiny_swin(window_size=7)
    with pytest.raises(ValueError, match=r"mask_patch_size 6 does not divide the image size 32"):
        _tiny_swin(mask_patch_size=6)


def test_cli_stops_before_training_with_the_message(tmp_path, image_folder, capsys):
    code = main(["pretrain", "--objective", "simmim", "--model", "swin_tiny", "--set", "objective.window_size=7",
                 "--data", f"imagefolder:{image_folder}", "--out", str(tmp_path / "run"), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "window_size 7 does not fit image size 32" in err and "--set objective.window_size=4" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


# --------------------------------------------------------------------------- training
@pytest.mark.parametrize("make", [_tiny_vit, _tiny_swin], ids=["vit", "swin"])
def test_a_few_cpu_steps_lower_the_loss(make):
    objective = make().train()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 32, 32, generator=g)
    images = torch.nn.functional.avg_pool2d(images, 5, 1, 2)  # smooth images: learnable from context
    mask = objective.draw_masking(8, g)
    opt = torch.optim.AdamW(objective.parameters(), lr=2e-3)
    losses = []
    for _ in range(15):
        loss = objective(images, mask).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("model_args", [
    ["--model", "vit_micro", "--img-size", "16", "--set", "objective.mask_patch_size=8"],
    pytest.param(["--model", "swin_tiny", "--img-size", "32"],  # quick recipe: 8-px mask cells, window 4
                 marks=pytest.mark.slow),  # a full 28M-parameter Swin-T, built three times: ~50 s
], ids=["vit", "swin"])
def test_pretrain_probe_reconstruct_end_to_end(tmp_path, image_folder, capsys, model_args):
    run = tmp_path / "run"
    assert main(["pretrain", "--objective", "simmim", *model_args, "--patch-size", "4", "--batch-size", "4",
                 "--max-steps", "3", "--data", f"imagefolder:{image_folder}", "--out", str(run),
                 "--no-progress"]) == 0
    assert list((run / "checkpoints").glob("step-*/model.safetensors"))
    assert (run / "reconstruction.png").stat().st_size > 1000
    assert main(["probe", str(run), "--probes", "linear,knn", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| pre-trained |" in out and "| random init |" in out
    picture = tmp_path / "recon.png"
    assert main(["reconstruct", str(run), "--out", str(picture)]) == 0
    assert picture.stat().st_size > 1000


@pytest.mark.parametrize("name", ["simmim_vit_base", "simmim_swin_base"])
def test_presets_load_and_fit_their_sizes(name):
    from pathlib import Path

    from mimaim.config import load_yaml, make_config
    from mimaim.engine.build import resolved_objective_options
    from mimaim.masking import check_simmim_mask_sizes
    from mimaim.models.swin import check_swin_sizes
    from mimaim.objectives import get_objective_class, parse_options

    cfg = make_config(load_yaml(Path(__file__).parents[1] / "configs" / f"{name}.yaml"))
    opts = parse_options(get_objective_class("simmim"), resolved_objective_options(cfg))
    assert cfg.recipe == "paper" and cfg.objective == "simmim"
    assert math.isclose(cfg.effective_lr(), 1e-4 * cfg.batch_size / 512)  # SimMIM's batch/512 rule
    assert (opts.mask_ratio, opts.mask_patch_size) == (0.6, 32)
    # the official 800-epoch recipes: multi-step, x0.1 at epoch 700 (configs/*__800ep/*pretrain*.yaml)
    assert (cfg.schedule, tuple(cfg.milestones), cfg.lr_gamma, cfg.epochs, cfg.clip_grad) == (
        "multistep", (700,), 0.1, 800, 5.0)
    check_simmim_mask_sizes(cfg.img_size, opts.mask_patch_size, cfg.patch_size)
    if cfg.model.startswith("swin"):
        check_swin_sizes(cfg.img_size, cfg.patch_size, opts.window_size, 4)
        assert (cfg.img_size, opts.window_size, opts.drop_path_rate) == (192, 6, 0.0)


def test_multistep_schedule_drives_a_run(tmp_path, image_folder):
    """SimMIM's schedule through the engine: warm-up, flat peak, x0.1 from the milestone (lr_scheduler.py)."""
    import csv

    run = tmp_path / "run"
    assert main(["pretrain", "--objective", "simmim", "--model", "vit_micro", "--img-size", "16", "--patch-size", "4",
                 "--set", "objective.mask_patch_size=8", "--data", f"imagefolder:{image_folder}", "--batch-size", "5",
                 "--epochs", "3", "--warmup-epochs", "1", "--schedule", "multistep", "--milestones", "2",
                 "--lr", "1e-3", "--log-every", "1", "--out", str(run), "--no-progress"]) == 0
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    lrs = {int(r["step"]): float(r["lr"]) for r in rows}  # 10 training images, batch 5: 2 steps per epoch
    # the lr logged with step s was set from epoch (s - 1) / 2
    assert lrs[1] == 0.0 and lrs[2] == pytest.approx(5e-4)  # warm-up over epoch 1
    assert [lrs[s] for s in (3, 4)] == pytest.approx([1e-3] * 2)  # flat peak, no cosine decay
    assert [lrs[s] for s in (5, 6)] == pytest.approx([1e-4] * 2)  # x0.1 from epoch 2
