"""BEiT: blockwise masking, the masked-only loss, the k-means tokenizer in checkpoints, the CLI end to end."""

import math
import pytest
import torch
import torch.nn.functional as F

from mimaim.engine.checkpoint import load_weights, save_checkpoint
from mimaim.masking import blockwise_mask
from mimaim.objectives import build_objective


def tiny_beit(**options):
    torch.manual_seed(0)
    return build_objective("beit", "vit_tiny", 32, 4, {"drop_path": 0.0, **options}, depth=2)


# --------------------------------------------------------------------------- masking
@pytest.mark.parametrize("grid,budget", [((14, 14), 75), ((8, 8), 25)])
def test_blockwise_mask_budget_blocks_and_aspects(grid, budget):
    H, W = grid
    g = torch.Generator().manual_seed(0)
    counts = []
    for _ in range(400):
        blocks = []
        mask = blockwise_mask(grid, budget, min_num_patches=16, min_aspect=0.3, generator=g, blocks=blocks)
        assert mask.shape == (H * W,) and mask.dtype == torch.bool
        n = int(mask.sum())
        counts.append(n)
        assert 0 < n <= budget  # never over the budget
        assert sum(b["added"] for b in blocks) == n
        for b in blocks:
            # the drawn area is U(16, remaining) (below 16 only when less than 16 remain)
            assert min(16, b["remaining"]) - 1e-9 <= b["area"] <= max(16, b["remaining"]) + 1e-9
            assert 0.3 - 1e-9 <= b["aspect"] <= 1 / 0.3 + 1e-9
            assert b["h"] < H and b["w"] < W  # strictly smaller than the grid
            assert b["h"] == round(math.sqrt(b["area"] * b["aspect"]))
            assert b["w"] == round(math.sqrt(b["area"] / b["aspect"]))
            assert 0 < b["added"] <= b["remaining"]
        # the first block is drawn from the whole budget (>= 16): a real block
        assert blocks[0]["area"] >= 16 and blocks[0]["h"] * blocks[0]["w"] >= 9
    mean = sum(counts) / len(counts)
    assert 0.9 * budget <= mean <= budget  # ~40% of the patches on average, as the code (ends under, not over)


def test_blockwise_mask_is_reproducible_from_the_generator():
    a = blockwise_mask((8, 8), 25, generator=torch.Generator().manual_seed(3))
    b = blockwise_mask((8, 8), 25, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_sample_masking_uses_the_paper_budget():
    obj = tiny_beit()
    assert obj.num_masking_patches == int(0.4 * 64)
    m = obj.sample_masking(torch.Generator().manual_seed(0))
    assert m.shape == (64,) and 0 < int(m.sum()) <= 25
    assert tiny_beit(num_mask_patches=20).num_masking_patches == 20


# --------------------------------------------------------------------------- loss
def test_loss_is_cross_entropy_on_masked_positions_only(monkeypatch):
    obj = tiny_beit().eval()
    images = torch.randn(4, 3, 32, 32)
    mask = obj.draw_masking(4, torch.Generator().manual_seed(0))
    ids = torch.randint(0, obj.vocab_size, (4, 64), generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(obj, "visual_tokens", lambda x: ids)
    out = obj(images, mask)
    x = obj.forward_encoder(images, mask)  # (B, N, D)
    expected = F.cross_entropy(obj.lm_head(x)[mask], ids[mask])
    assert torch.allclose(out.loss, expected, atol=1e-6)
    assert out.pred.shape == (int(mask.sum()), obj.vocab_size)

    changed = ids.clone()
    changed[~mask] = (changed[~mask] + 1) % obj.vocab_size  # visible targets do not matter
    monkeypatch.setattr(obj, "visual_tokens", lambda x: changed)
    assert torch.allclose(obj(images, mask).loss, out.loss, atol=1e-6)
    changed[mask] = (changed[mask] + 1) % obj.vocab_size  # masked targets do
    assert not torch.allclose(obj(images, mask).loss, out.loss, atol=1e-4)


def test_masked_patches_get_the_mask_token():
    obj = tiny_beit().eval()
    images = torch.randn(2, 3, 32, 32)
    mask = obj.draw_masking(2, torch.Generator().manual_seed(0))
    x = obj.encoder.embed(images, mask=mask, mask_token=obj.mask_token)
    assert torch.allclose(x[mask], obj.mask_token[0].expand(int(mask.sum()), -1))
    # the encoder sees masked content only through [M]: changing masked pixels changes nothing
    p = 4
    pix_mask = mask.view(2, 1, 8, 8).float().repeat_interleave(p, 2).repeat_interleave(p, 3)
    other = images + 5 * pix_mask * torch.randn_like(images)
    assert torch.allclose(obj.forward_encoder(images, mask), obj.forward_encoder(other, mask), atol=1e-5)


def test_backbone_flavour():
    obj = tiny_beit()
    enc = obj.encoder
    assert enc.pos_embed is None and enc.rel_pos_bias is not None and enc.cls_token is not None
    assert enc.blocks[0].attn.q_bias is not None and enc.blocks[0].attn.qkv.bias is None
    assert torch.allclose(enc.blocks[0].ls1.gamma, torch.full((192,), 0.1))
    assert obj.augmentation.crop_scale == (0.08, 1.0) and obj.augmentation.color_jitter == 0.4
    assert tiny_beit(rel_pos_bias=False).encoder.pos_embed is not None


def test_absolute_positions_combine_with_the_relative_bias_as_the_official_flags():
    """--abs_pos_emb adds a learned table (trunc normal std 0.02 clipped at +-std, modeling_pretrain.py) beside
    the shared relative bias; the quick recipe is the released BEiT-base's --abs_pos_emb --disable_rel_pos_bias
    --layer_scale_init_value 0."""
    from mimaim.objectives.beit import BEiT

    enc = tiny_beit(abs_pos_emb=True).encoder
    assert enc.pos_embed is not None and enc.rel_pos_bias is not None and hasattr(enc.blocks[0].ls1, "gamma")
    assert enc.pos_embed.requires_grad and 0 < enc.pos_embed.abs().max() <= 0.02
    enc = tiny_beit(**BEiT.quick_options).encoder
    assert enc.pos_embed is not None and enc.rel_pos_bias is None and not hasattr(enc.blocks[0].ls1, "gamma")


def decay_split(objective):
    """(decayed, undecayed) parameter names of the optimiser groups the engine builds for ``objective``."""
    from mimaim.engine.optim import param_groups_weight_decay

    names = {id(p): n for n, p in objective.named_parameters()}
    groups = param_groups_weight_decay(objective, 0.05, objective.no_weight_decay())
    return {names[id(p)] for p in groups[1]["params"]}, {names[id(p)] for p in groups[0]["params"]}


def test_weight_decay_as_the_official_skip_list():
    """unilm beit: skip = model.no_weight_decay() = {pos_embed, cls_token}; the shared relative position
    bias table and the mask token are 2-D and decayed; layer-scale gammas are 1-D and not."""
    decayed, undecayed = decay_split(tiny_beit())
    assert {"encoder.rel_pos_bias.relative_position_bias_table", "mask_token", "lm_head.weight"} <= decayed
    assert {"encoder.cls_token", "encoder.blocks.0.ls1.gamma", "encoder.blocks.0.attn.q_bias"} <= undecayed
    decayed, undecayed = decay_split(tiny_beit(rel_pos_bias=False))
    assert "encoder.pos_embed" in undecayed


def test_bad_masking_options_fail_at_construction():
    with pytest.raises(ValueError, match="min_block_patches 16 cannot fit a 4x4"):
        build_objective("beit", "vit_tiny", 16, 4, {}, depth=1)
    with pytest.raises(ValueError, match="mask_ratio"):
        tiny_beit(mask_ratio=1.5)


# --------------------------------------------------------------------------- k-means
def test_kmeans_fits_once_and_round_trips_through_a_checkpoint(tmp_path, monkeypatch):
    obj = tiny_beit()
    assert not bool(obj.tokenizer.fitted)
    images = torch.randn(8, 3, 32, 32)
    mask = obj.draw_masking(8, torch.Generator().manual_seed(0))
    obj(images, mask)
    assert bool(obj.tokenizer.fitted)
    ids = obj.visual_tokens(images)
    assert ids.shape == (8, 64) and ids.max() < 256
    assert len(ids.unique()) > 32  # the codebook is used, not collapsed
    ckpt = save_checkpoint(tmp_path / "ckpt", 1, obj, {"step": 1})

    import mimaim.tokenizers.kmeans as km
    monkeypatch.setattr(km, "kmeans_fit", lambda *a, **k: pytest.fail("a loaded codebook must not be refitted"))
    fresh = tiny_beit()
    load_weights(fresh, ckpt)
    assert bool(fresh.tokenizer.fitted)
    assert torch.equal(fresh.tokenizer.codebook, obj.tokenizer.codebook)
    assert torch.equal(fresh.visual_tokens(images), ids)


def test_reconstruct_columns():
    obj = tiny_beit()
    images = torch.randn(3, 3, 32, 32)
    cols = obj.reconstruct(images, obj.draw_masking(3, torch.Generator().manual_seed(0)))
    assert list(cols) == ["original", "masked", "tokenizer ids decoded", "predicted ids decoded + visible"]
    assert all(v.shape == images.shape and torch.isfinite(v).all() for v in cols.values())


# --------------------------------------------------------------------------- CLI
def _mimaim(capsys, *args):
    from mimaim.cli import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    return captured.out


@pytest.mark.slow
def test_cli_pretrain_probe_reconstruct_and_tokenizer(image_folder, tmp_path, capsys):
    data = f"imagefolder:{image_folder}"
    tok = tmp_path / "tok"
    out = _mimaim(capsys, "tokenizer", "train", "--data", data, "--out", tok, "--img-size", 32, "--steps", 3,
                  "--batch-size", 4, "--vocab-size", 16, "--hidden", 8, "--codebook-dim", 8, "--no-progress")
    assert "codes used" in out and (tok / "tokenizer.safetensors").exists()
    assert (tok / "reconstruction.png").exists() and (tok / "config.json").exists()

    for name, extra in (("km", []), ("dvae", ["--tokenizer", tok])):
        run = tmp_path / name
        _mimaim(capsys, "pretrain", "--objective", "beit", "--model", "vit_micro", "--data", data,
                "--batch-size", 8, "--epochs", 1, "--max-steps", 3 if name == "km" else 1, "--out", run,
                "--no-progress", *extra)
        assert (run / "summary.json").exists() and (run / "reconstruction.png").exists()
    run = tmp_path / "km"
    probe = _mimaim(capsys, "probe", run, "--probes", "knn", "--no-progress")
    assert "pre-trained" in probe and "random init" in probe
    _mimaim(capsys, "reconstruct", run, "--out", tmp_path / "r.png")
    assert (tmp_path / "r.png").exists()


def test_cli_pretrain_beit_starts_at_chance_and_saves_its_fitted_codebook(image_folder, tmp_path, capsys):
    """The default BEiT run: cross-entropy over the 256 k-means codes starts at ln(256) (the lm_head is
    initialised near zero, so every code is about equally likely), and the codebook fitted on the first
    batch is saved with the weights, fitted, with distinct codes."""
    import json

    from safetensors.torch import load_file

    run = tmp_path / "run"
    _mimaim(capsys, "pretrain", "--objective", "beit", "--model", "vit_micro", "--data",
            f"imagefolder:{image_folder}", "--batch-size", 8, "--epochs", 1, "--max-steps", 2, "--out", run,
            "--no-progress")
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["objective"], summary["steps"]) == ("beit", 1)  # 10 training images, batch 8: one step
    assert summary["final_loss"] == pytest.approx(math.log(256), abs=0.1)
    (ckpt,) = (run / "checkpoints").iterdir()
    weights = load_file(ckpt / "model.safetensors")
    assert bool(weights["tokenizer.fitted"])
    codebook = weights["tokenizer.codebook"]
    assert codebook.shape == (256, 4 * 4 * 3) and weights["lm_head.weight"].shape == (256, 128)
    assert len(torch.unique(codebook, dim=0)) > 128  # fitted centroids, not a constant or empty codebook
