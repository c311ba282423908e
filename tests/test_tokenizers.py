"""Visual tokenizers: one contract (images -> ids, vocabulary known), the DALL-E file loader, bad files."""

import json

import pytest
import torch

from mimaim.objectives import build_objective
from mimaim.tokenizers import DalleTokenizer, KMeansTokenizer, TrainedTokenizer, build_tokenizer
from mimaim.tokenizers.dvae import DiscreteVAE, DVAEConfig, codebook_usage, save_dvae

dall_e = pytest.importorskip("dall_e")


def small_dalle_encoder(vocab_size=512):
    torch.manual_seed(0)
    # the package's own architecture (its validators allow n_hid >= 64, vocab >= 512)
    return dall_e.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=vocab_size)


@pytest.fixture
def dalle_pickle(tmp_path):
    path = tmp_path / "encoder.pkl"
    enc = small_dalle_encoder()
    torch.save(enc, path)  # as OpenAI distributes encoder.pkl: a pickled module
    return path, enc


@pytest.fixture
def dvae_dir(tmp_path):
    torch.manual_seed(0)
    model = DiscreteVAE(DVAEConfig(vocab_size=32, downsample=4, hidden=8, codebook_dim=8))
    return save_dvae(model, tmp_path / "dvae", {"note": "untrained"}), model


def test_contract(dalle_pickle, dvae_dir):
    images = torch.randn(2, 3, 32, 32)  # ImageNet-normalised, as the engine feeds them
    grid = (8, 8)
    kmeans = KMeansTokenizer(patch_size=4, vocab_size=16)
    for tok in (kmeans, DalleTokenizer(dalle_pickle[0]), TrainedTokenizer(dvae_dir[0])):
        ids = tok.tokenize(images, grid)
        assert ids.shape == (2, 8, 8) and ids.dtype == torch.long
        assert 0 <= int(ids.min()) and int(ids.max()) < tok.vocab_size
        assert tok.input_size(grid) == (8 * tok.downsample, 8 * tok.downsample)
        if tok.has_decoder:
            pix = tok.decode(ids, tok.to_input(images, grid))
            assert pix.shape == (2, 3, 8 * tok.downsample, 8 * tok.downsample)
            assert 0 <= float(pix.min()) and float(pix.max()) <= 1
    assert DalleTokenizer(dalle_pickle[0]).input_size((14, 14)) == (112, 112)  # BEiT's 112-px view


def test_dalle_tokens_are_argmax_of_the_encoder_on_map_pixels(dalle_pickle):
    path, enc = dalle_pickle
    tok = DalleTokenizer(path)
    assert tok.vocab_size == 512
    pixels = torch.rand(2, 3, 64, 64)
    expected = enc(0.8 * pixels + 0.1).argmax(1)  # map_pixels: (1 - 2 * 0.1) x + 0.1
    assert torch.equal(tok.encode(pixels), expected)


def test_dalle_state_dict_file_is_read_safely(tmp_path, dalle_pickle):
    _, enc = dalle_pickle
    path = tmp_path / "encoder_state.pt"
    torch.save(enc.state_dict(), path)
    tok = DalleTokenizer(path)
    pixels = torch.rand(1, 3, 32, 32)
    assert torch.equal(tok.encode(pixels), enc(0.8 * pixels + 0.1).argmax(1))


def test_beit_with_dalle_tokenizer(dalle_pickle):
    obj = build_objective("beit", "vit_tiny", 32, 4, {"tokenizer": f"dalle:{dalle_pickle[0]}", "drop_path": 0.0},
                          depth=1)
    assert obj.vocab_size == 512 and obj.lm_head.out_features == 512
    assert not any(k.startswith("tokenizer") for k in obj.state_dict())  # the user's file is not copied
    images = torch.randn(2, 3, 32, 32)
    out = obj(images, obj.draw_masking(2, torch.Generator().manual_seed(0)))
    assert torch.isfinite(out.loss)
    cols = obj.reconstruct(images, obj.draw_masking(2, torch.Generator().manual_seed(0)))
    assert "tokenizer ids" in cols and "predicted ids (masked)" in cols  # no decoder: colour-coded ids


# --------------------------------------------------------------------------- bad input
def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pkl.*does not exist.*dalle:PATH"):
        build_tokenizer(f"dalle:{tmp_path / 'nope.pkl'}", 4)
    with pytest.raises(FileNotFoundError, match="does not exist.*mimaim tokenizer train"):
        build_tokenizer(str(tmp_path / "no_dir"), 4)
    with pytest.raises(ValueError, match="dalle:PATH"):
        build_tokenizer("dalle", 4)


def test_corrupt_files(tmp_path, dvae_dir):
    bad = tmp_path / "encoder.pkl"
    bad.write_bytes(b"not a pickle at all" * 10)
    with pytest.raises(ValueError, match="encoder.pkl.*corrupt"):
        build_tokenizer(f"dalle:{bad}", 4)
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a DALL-E encoder"):
        build_tokenizer(f"dalle:{tmp_path / 'other.pt'}", 4)
    folder, _ = dvae_dir
    (folder / "tokenizer.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="corrupt.*mimaim tokenizer train"):
        build_tokenizer(str(folder), 4)
    (folder / "config.json").write_text(json.dumps({"kind": "something else"}))
    with pytest.raises(ValueError, match="not a mimaim dVAE config"):
        build_tokenizer(str(folder), 4)


def test_vocabulary_mismatch(dalle_pickle, dvae_dir):
    with pytest.raises(ValueError, match="vocabulary of 512 ids, but vocab_size=8192"):
        build_tokenizer(f"dalle:{dalle_pickle[0]}", 4, vocab_size=8192)
    with pytest.raises(ValueError, match="vocabulary of 32 ids, but vocab_size=64"):
        build_objective("beit", "vit_tiny", 32, 4, {"tokenizer": str(dvae_dir[0]), "vocab_size": 64}, depth=1)


def test_codebook_usage():
    ids = torch.tensor([0, 0, 1, 1])
    usage = codebook_usage(ids, 8)
    assert usage["codes_used"] == 2 and usage["share_used"] == 0.25
    assert abs(usage["perplexity"] - 2.0) < 1e-6


def test_dvae_training_step_reduces_loss():
    from mimaim.tokenizers.dvae import train_dvae

    images = (torch.rand(8, 3, 8, 8) * 255).to(torch.uint8)
    cfg = DVAEConfig(vocab_size=16, downsample=4, hidden=8, codebook_dim=8)
    model, info = train_dvae(images, cfg, steps=15, batch_size=8, lr=3e-3, progress=False)
    assert info["train_steps"] == 15
    x = images.float() / 255
    with torch.no_grad():
        _, recon_after, _ = model(x, 1.0, 0.0)
        _, recon_before, _ = DiscreteVAE(cfg)(x, 1.0, 0.0)
    assert recon_after < recon_before
