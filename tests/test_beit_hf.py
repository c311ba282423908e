"""Our BEiT vs HuggingFace ``BeitForMaskedImageModeling`` holding the same weights."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mimaim.interop.hf_beit import from_hf_state_dict, load_from_hf, to_hf, to_hf_state_dict  # noqa: E402
from mimaim.objectives import build_objective  # noqa: E402


def randomised_beit(**options):
    """A small BEiT whose zero-initialised parts (biases, rel-pos table, layer scale) are random too."""
    torch.manual_seed(0)
    obj = build_objective("beit", "vit_tiny", 32, 4, {"drop_path": 0.0, **options}, depth=2).eval()
    with torch.no_grad():
        for name, p in obj.named_parameters():
            if name.endswith((".bias", "q_bias", "v_bias", "gamma", "relative_position_bias_table", "pos_embed")):
                p.normal_(0, 0.3)
    return obj


@pytest.mark.parametrize("rel_pos_bias", [True, False])
def test_same_logits_and_loss_as_hf(rel_pos_bias):
    obj = randomised_beit(rel_pos_bias=rel_pos_bias)
    hf = to_hf(obj)
    assert hf.config.layer_norm_eps == 1e-6 and hf.config.use_mask_token
    assert hf.config.use_shared_relative_position_bias == rel_pos_bias
    assert hf.config.use_absolute_position_embeddings == (not rel_pos_bias)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mask = obj.draw_masking(3, torch.Generator().manual_seed(2))  # (B, N) bool, blockwise
    ids = obj.visual_tokens(images)  # (B, N) k-means ids, fitted on these images
    with torch.no_grad():
        ours = obj(images, mask)
        # HF's labels are the ids at the masked positions only (1-D), its logits cover every patch
        theirs = hf(pixel_values=images, bool_masked_pos=mask, labels=ids[mask])
    torch.testing.assert_close(ours.pred, theirs.logits[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-6, atol=1e-6)


def test_round_trip_from_hf():
    obj = randomised_beit()
    hf = to_hf(obj)
    back = from_hf_state_dict(hf.state_dict())
    ours = {k: v for k, v in obj.state_dict().items() if not k.startswith("tokenizer.")
            and "relative_position_index" not in k}
    assert set(back) == set(ours)
    assert all(torch.equal(back[k], ours[k]) for k in ours)
    other = build_objective("beit", "vit_tiny", 32, 4, {"drop_path": 0.0}, depth=2).eval()
    load_from_hf(other, hf)
    other.tokenizer.load_state_dict(obj.tokenizer.state_dict())
    images = torch.randn(2, 3, 32, 32)
    mask = obj.draw_masking(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(other(images, mask).pred, obj(images, mask).pred)


def test_transformers_4_names_are_understood():
    obj = randomised_beit()
    v4 = to_hf_state_dict(obj, new_layout=False)
    assert "beit.encoder.layer.0.attention.attention.query.weight" in v4
    back = from_hf_state_dict(v4)
    assert torch.equal(back["encoder.blocks.1.attn.qkv.weight"], obj.state_dict()["encoder.blocks.1.attn.qkv.weight"])
