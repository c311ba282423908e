"""Our AIM vs lightly's (``MaskedCausalVisionTransformer`` + ``AIMPredictionHead``) with the same weights.

Same images, same prefix mask -> equal trunk features, equal predictions and equal loss.
Tolerance: float32, atol = rtol = 1e-5 (both run the same SDPA kernel with the same
boolean mask, so in practice the outputs agree exactly).

The loss on lightly's side is AIM's next-patch loss assembled from lightly's own
``patchify`` / ``normalize_mean_var`` (``aim_loss_from_lightly``); lightly's example
regresses every output onto its own patch instead. The lightly-style AIM and the converters
live beside this test (tests/lightly_aim.py): mimaim itself trains ml-l3m's head.
"""

import pytest
import torch

pytest.importorskip("lightly")

from lightly_aim import (aim_loss_from_lightly, aim_to_lightly, build_lightly_aim, lightly_forward,  # noqa: E402
                         lightly_prefix_mask, lightly_style_aim, lightly_to_aim)


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread):
    """These models are tiny: one thread beats two on a shared CPU (conftest.one_torch_thread)."""


TOL = dict(atol=1e-5, rtol=1e-5)


def perturbed_aim(**options):
    torch.manual_seed(0)
    aim = lightly_style_aim(16, 4, {"head_depth": 2, "head_width": 64, **options}, depth=2)
    with torch.no_grad():  # move every trainable weight off its init (LayerNorms, zero biases) to test them all
        for p in aim.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return aim.eval()


@pytest.mark.parametrize("prefix", [[1, 4, 9, 15], [1, 1, 1, 1]])  # prefix-causal; and causal (S = 1)
def test_same_weights_same_features_predictions_and_loss(prefix):
    aim = perturbed_aim()
    backbone, head = build_lightly_aim(aim)
    backbone.eval()
    head.eval()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    S = torch.tensor(prefix)
    mask = lightly_prefix_mask(S, 16)  # True = non-prefix, lightly's convention
    with torch.no_grad():
        ours = aim(x, S)
        features = aim.forward_trunk(x, S)
        predictions = aim.head(features)
        l_features, l_predictions = lightly_forward(backbone, head, x, mask)
        l_loss = aim_loss_from_lightly(l_predictions, x, mask, 4)
    torch.testing.assert_close(features, l_features, **TOL)
    torch.testing.assert_close(predictions, l_predictions, **TOL)
    torch.testing.assert_close(ours.loss, l_loss, **TOL)


def test_bidirectional_downstream_features_match():
    aim = perturbed_aim()
    backbone, _ = build_lightly_aim(aim)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(aim.encoder.forward_features(x), backbone.eval().forward_features(x, mask=None),
                                   **TOL)


def test_round_trip_is_lossless_and_loads_lightly_weights():
    aim = perturbed_aim()
    state = aim.state_dict()
    converted = aim_to_lightly(state)
    back = lightly_to_aim(converted["backbone"], converted["head"])
    assert set(back) == set(state)
    assert all(torch.equal(back[k], v) for k, v in state.items())
    # weights made on lightly's side load into a fresh mimaim AIM
    torch.manual_seed(5)
    backbone, head = build_lightly_aim(aim, load_weights=False)
    fresh = lightly_style_aim(16, 4, {"head_depth": 2, "head_width": 64}, depth=2)
    fresh.load_state_dict(lightly_to_aim(backbone.state_dict(), head.state_dict()))
    assert torch.equal(fresh.head.pred.weight, head.blocks[-1].weight)
    assert torch.equal(fresh.encoder.patch_norm.weight, backbone.patch_embed.norm.weight)


def test_masked_variant_has_no_lightly_layout():
    with pytest.raises(ValueError, match="mode=masked"):
        aim_to_lightly(perturbed_aim(mode="masked").state_dict())
