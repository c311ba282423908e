"""I-JEPA: the multi-block sampler, the EMA schedule, the target encoder as ``encoder``, and the peer test.

Peer: lightly's timm I-JEPA (``lightly.models.modules.ijepa_timm.IJEPAPredictorTIMM``, lightly's
``MaskedVisionTransformerTIMM`` around a timm ViT without cls token as the context and target encoder) trained
as lightly's ``examples/pytorch/ijepa.py`` does (layer-normed target features gathered with lightly's
``apply_masks`` / ``repeat_interleave_batch``, ``nn.SmoothL1Loss``, its momentum generator and EMA loop).
Same weights, images and masks, an identical AdamW on both: equal losses every step for 20 steps and equal
weights (context encoder, predictor, EMA target encoder) after them, fp32 (atol = rtol = 1e-5).
Not lightly's torchvision ``IJEPABackbone``: it prepends a class token and indexes the token sequence with the
collator's patch indices (index 0 is the class token), which the official ViT (no class token) does not; and
its predictor ties the blocks' MLP width to the encoder width. The timm path departs from the official code
only where weights are initialised (they are loaded here), so no difference needs pinning.
The sampler's pieces are compared with lightly's ``IJEPAMaskCollator`` (a copy of the official collator) on
the same random stream: block sizes and placed blocks are identical.
"""

import copy

import pytest
import torch

pytest.importorskip("lightly")

from lightly.data.ijepa_collate import IJEPAMaskCollator  # noqa: E402
from lightly.models import utils as lightly_utils  # noqa: E402
from lightly.models.modules.ijepa_timm import IJEPAPredictorTIMM  # noqa: E402
from lightly.models.modules.masked_vision_transformer_timm import MaskedVisionTransformerTIMM  # noqa: E402
from timm.models.vision_transformer import VisionTransformer as TimmViT  # noqa: E402

import mimaim  # noqa: E402
from mimaim.config import make_config  # noqa: E402
from mimaim.engine.build import SHARED_TRUNK, build_run_objective  # noqa: E402
from mimaim.engine.optim import build_optimizer  # noqa: E402
from mimaim.masking import ijepa_block_size, ijepa_multiblock, ijepa_place_block  # noqa: E402
from mimaim.objectives import build_objective  # noqa: E402
from tiny_runs import images, make_run  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)
QUICK = {"predictor_embed_dim": 32, "predictor_depth": 2, "predictor_num_heads": 2, "min_keep": 4}


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread):
    """Tiny models: one thread beats two on a shared CPU (conftest.one_torch_thread)."""


def tiny_ijepa(**options):
    torch.manual_seed(0)
    return build_objective("ijepa", "vit_micro", 32, 4, {**QUICK, **options}, class_token=False, depth=2)


# --------------------------------------------------------------------------- the sampler
@pytest.mark.parametrize("grid, scale, aspect", [(8, (0.15, 0.2), (0.75, 1.5)), (14, (0.15, 0.2), (0.75, 1.5)),
                                                 (14, (0.85, 1.0), (1.0, 1.0))])
def test_block_size_is_the_official_collators(grid, scale, aspect):
    collator = IJEPAMaskCollator(input_size=grid * 16, patch_size=16)
    for seed in range(200):
        theirs = collator._sample_block_size(torch.Generator().manual_seed(seed), scale, aspect)
        u = torch.rand(1, generator=torch.Generator().manual_seed(seed)).item()
        assert ijepa_block_size(u, (grid, grid), scale, aspect) == theirs


@pytest.mark.parametrize("min_keep, context_size", [(4, (12, 12)), (11, (5, 5))])  # (5, 5): the context often
def test_placed_blocks_are_the_official_collators(min_keep, context_size):  # keeps too little: regions dropped
    collator = IJEPAMaskCollator(input_size=14 * 16, patch_size=16, min_keep=min_keep)
    for seed in range(50):
        torch.manual_seed(seed)
        targets = [collator._sample_block_mask((4, 3)) for _ in range(4)]
        context = collator._sample_block_mask(context_size, acceptable_regions=[c for _, c in targets])[0]
        torch.manual_seed(seed)  # ours, on the same global stream
        blocks = [ijepa_place_block((4, 3), (14, 14), min_keep)[1] for _ in range(4)]
        kept = ijepa_place_block(context_size, (14, 14), min_keep, [~b for b in blocks])[0]
        for (theirs, _), ours in zip(targets, blocks):
            assert torch.equal(theirs, ours.flatten().nonzero().squeeze())
        assert torch.equal(context, kept.flatten().nonzero().squeeze())


def test_multiblock_rules():
    """4 equal rectangular target blocks of an official size, a context that keeps more than min_keep patches,
    disjoint from every target, on the paper's 14x14 grid (ViT-H/16 at 224)."""
    grid, sizes = (14, 14), {ijepa_block_size(i / 1000, (14, 14), (0.15, 0.2), (0.75, 1.5)) for i in range(1001)}
    g, contexts = torch.Generator().manual_seed(0), []
    for _ in range(200):
        code = ijepa_multiblock(grid, generator=g).view(grid)
        shapes = set()
        for k in range(4):
            rows, cols = ((code >> k) & 1).bool().nonzero().unbind(1)
            h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
            assert len(rows) == h * w and (h, w) in sizes  # a whole rectangle
            assert rows.max() < 13 and cols.max() < 13  # official randint: a block never touches the last row
            shapes.add((h, w))
        assert len(shapes) == 1  # one size for the image's target blocks
        context = ((code >> 4) & 1).bool()
        assert int(context.sum()) > 10 and not (context & (code & 0b1111).bool()).any()
        contexts.append(int(context.sum()))
    assert min(contexts) < max(contexts)
    assert 0.15 * 196 * 0.8 < min(h * w for h, w in sizes) and max(h * w for h, w in sizes) < 0.2 * 196 * 1.2


def test_block_indices_cut_every_block_to_the_batch_smallest_in_raster_order():
    obj = tiny_ijepa()
    code = obj.draw_masking(6, torch.Generator().manual_seed(3))
    context_idx, target_idx = obj.block_indices(code)
    members = [((code >> k) & 1).bool() for k in range(5)]
    assert context_idx.shape == (6, int(members[4].sum(1).min()))
    assert target_idx.shape[0] == 24 and target_idx.shape[1] == min(int(m.sum(1).min()) for m in members[:4])
    for b in range(6):
        assert torch.equal(context_idx[b], members[4][b].nonzero().squeeze(1)[:context_idx.shape[1]])
        for k in range(4):
            assert torch.equal(target_idx[k * 6 + b], members[k][b].nonzero().squeeze(1)[:target_idx.shape[1]])


def test_min_keep_that_a_block_cannot_exceed_is_refused():
    with pytest.raises(ValueError, match="min_keep"):
        tiny_ijepa(min_keep=10)  # a 3x3 target on the 8x8 grid


# --------------------------------------------------------------------------- EMA, encoders, optimiser
def test_ema_schedule_endpoints():
    obj = tiny_ijepa()
    with pytest.raises(ValueError, match="total_steps"):
        obj.momentum(1)
    obj.total_steps = 100
    assert obj.momentum(1) == 0.996  # the official generator's first value
    assert obj.momentum(100) == pytest.approx(0.996 + 0.004 * 99 / 100)
    assert obj.momentum(101) == 1.0 and obj.momentum(1000) == 1.0


def test_encoder_is_the_frozen_target_and_the_optimiser_skips_it():
    obj = tiny_ijepa()
    assert not any(p.requires_grad for p in obj.encoder.parameters())
    trained = {id(p) for g in build_optimizer(obj, 1e-3, 0.05).param_groups for p in g["params"]}
    assert not trained & {id(p) for p in obj.encoder.parameters()}
    assert {id(p) for p in obj.context_encoder.parameters() if p.requires_grad} <= trained
    for a, b in zip(obj.encoder.state_dict().values(), obj.context_encoder.state_dict().values()):
        assert torch.equal(a, b)  # target = deepcopy(encoder) at init


def test_shared_trunk_starts_both_encoders_from_its_weights():
    cfg = make_config(objective="ijepa", model="vit_micro", img_size=32, patch_size=4, trunk="shared")
    obj = build_run_objective(cfg)
    torch.manual_seed(cfg.seed)  # the shared trunk's random-init weights, as build_run_objective draws them
    trunk = mimaim.models.create_model("vit_micro", img_size=32, patch_size=4, **SHARED_TRUNK).state_dict()
    for key, value in trunk.items():
        assert torch.equal(obj.encoder.state_dict()[key], value)
        assert torch.equal(obj.context_encoder.state_dict()[key], value)


def test_load_backbone_and_export_give_the_target_encoder(tmp_path):
    run, obj = make_run(tmp_path / "run", "ijepa")  # randomises the trained (context) weights only
    encoder, x = mimaim.load_backbone(run), images()
    with torch.no_grad():
        ours = encoder.forward_features(x)
        torch.testing.assert_close(ours, obj.encoder.forward_features(x), rtol=0, atol=0)
        assert not torch.allclose(ours, obj.context_encoder.forward_features(x))
    import timm
    from mimaim.cli import main
    assert main(["export", str(run), "--to", "timm", "--out", str(tmp_path / "timm")]) == 0
    model = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), ours, **TOL)
        torch.testing.assert_close(model(x), ours.mean(dim=1), **TOL)  # global_pool avg: the probe protocol


@pytest.mark.parametrize("trunk", ["paper", "shared"])
def test_export_to_hf_is_an_ijepa_model_with_the_target_encoders_features(tmp_path, trunk):
    """``export --to hf``: ``AutoModel`` opens an ``IJepaModel`` (facebook/ijepa_* on the Hub) whose
    ``last_hidden_state`` is the target encoder's ``forward_features`` and whose token mean is the probe feature;
    the image pipeline gives the same tokens."""
    transformers = pytest.importorskip("transformers")
    from mimaim.cli import main
    from PIL import Image

    run, obj = make_run(tmp_path / "run", "ijepa", trunk=trunk)
    encoder, x = mimaim.load_backbone(run), images()
    out = tmp_path / "hf"
    assert main(["export", str(run), "--to", "hf", "--out", str(out)]) == 0
    model = transformers.AutoModel.from_pretrained(str(out)).eval()
    assert type(model).__name__ == "IJepaModel"
    with torch.no_grad():
        ours = encoder.forward_features(x)
        hidden = model(pixel_values=x).last_hidden_state
    torch.testing.assert_close(hidden, ours, rtol=0, atol=1e-5)
    torch.testing.assert_close(hidden.mean(dim=1), obj.encoder.forward_features(x).mean(dim=1), rtol=0, atol=1e-5)
    picture = Image.fromarray((torch.rand(40, 40, 3) * 255).to(torch.uint8).numpy())
    extractor = transformers.pipeline("image-feature-extraction", model=str(out))
    features = torch.tensor(extractor(picture, return_tensors=False)).squeeze(0)
    assert features.shape == ours.shape[1:]


def test_init_from_an_hf_ijepa_folder_starts_both_encoders_from_it(tmp_path):
    """``--init`` from an ``IJepaModel`` folder (``facebook/ijepa_vith14_1k`` saved locally has this layout): the
    target encoder and the context encoder both hold its weights; the predictor is initialised."""
    pytest.importorskip("transformers")
    from mimaim.cli import main
    from mimaim.interop.init import initialize_from

    run, obj = make_run(tmp_path / "run", "ijepa")
    assert main(["export", str(run), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    fresh = build_objective("ijepa", "vit_micro", 32, 4, QUICK)
    report = initialize_from(fresh, tmp_path / "hf")
    assert report.kind == "HF IJepaModel folder" and all(k.startswith("encoder.") for k in report.loaded)
    assert any(k.startswith("predictor.") for k in report.initialised)
    for key, value in obj.encoder.state_dict().items():
        torch.testing.assert_close(fresh.encoder.state_dict()[key], value, rtol=0, atol=0)
        torch.testing.assert_close(fresh.context_encoder.state_dict()[key], value, rtol=0, atol=0)


# --------------------------------------------------------------------------- peer: lightly's timm I-JEPA
class LightlyIJEPA(torch.nn.Module):
    """lightly's examples/pytorch/ijepa.py model, with lightly's timm encoder and predictor."""

    def __init__(self, obj):
        super().__init__()
        enc = obj.context_encoder
        vit = TimmViT(img_size=enc.img_size, patch_size=enc.patch_size, embed_dim=enc.embed_dim, depth=enc.depth,
                      num_heads=enc.num_heads, class_token=False, global_pool="", num_classes=0, qkv_bias=True)
        vit.pos_embed.requires_grad_(False)  # the official fixed sin-cos table (timm's is learned)
        self.encoder = MaskedVisionTransformerTIMM(vit=vit)
        pred = obj.predictor
        self.predictor = IJEPAPredictorTIMM(num_patches=enc.num_patches, depth=len(pred.predictor_blocks),
                                            mlp_dim=enc.embed_dim, predictor_embed_dim=pred.mask_token.shape[-1],
                                            num_heads=pred.predictor_blocks[0].attn.num_heads)
        self.target_encoder = copy.deepcopy(self.encoder)
        self.encoder.vit.load_state_dict(obj.context_encoder.state_dict())
        self.target_encoder.vit.load_state_dict(obj.encoder.state_dict())
        self.predictor.load_state_dict(predictor_to_lightly(pred.state_dict()))

    def forward(self, imgs, masks_enc, masks_pred):
        with torch.no_grad():  # forward_target
            h = self.target_encoder(imgs)
            h = torch.nn.functional.layer_norm(h, (h.size(-1),))
            B = len(h)
            h = lightly_utils.apply_masks(h, masks_pred)
            h = lightly_utils.repeat_interleave_batch(h, B, repeat=len(masks_enc))
        z = self.encoder(imgs, idx_keep=masks_enc[0])  # forward_context (one context block)
        return self.predictor(z, masks_enc, masks_pred), h

    def update_target_encoder(self, m):
        with torch.no_grad():
            for param_q, param_k in zip(self.encoder.parameters(), self.target_encoder.parameters()):
                param_k.data.mul_(m).add_((1.0 - m) * param_q.detach().data)


def predictor_to_lightly(state):
    names = {"predictor_blocks.": "decoder.blocks.", "predictor_norm.": "decoder.norm.",
             "mask_token": "decoder.mask_token", "predictor_pos_embed": "decoder.pos_embed"}
    out = {}
    for key, value in state.items():
        for ours, theirs in names.items():
            if key.startswith(ours):
                key = theirs + key[len(ours):]
        out[key] = value
    return out


def test_twenty_steps_with_the_ema_equal_lightlys():
    obj = tiny_ijepa()
    with torch.no_grad():  # move every weight off its init, the target away from the context encoder
        for p in obj.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    peer = LightlyIJEPA(obj)
    start = {k: v.clone() for k, v in obj.state_dict().items()}
    steps, ema, max_diff = 20, (0.996, 1.0), 0.0
    obj.total_steps = steps
    momentum = (ema[0] + i * (ema[1] - ema[0]) / steps for i in range(steps + 1))  # ipe * epochs = 20
    ours_opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.05)
    trained = [p for p in (*peer.encoder.vit.parameters(), *peer.predictor.parameters()) if p.requires_grad]
    theirs_opt = torch.optim.AdamW(trained, lr=1e-3, weight_decay=0.05)
    criterion, g = torch.nn.SmoothL1Loss(), torch.Generator().manual_seed(0)
    for step in range(1, steps + 1):
        x = torch.randn(4, 3, 32, 32, generator=g)
        code = obj.draw_masking(4, g)
        context_idx, target_idx = obj.block_indices(code)
        masks_enc, masks_pred = [context_idx], list(target_idx.split(4))
        loss = obj(x, code).loss
        z, h = peer(x, masks_enc, masks_pred)
        peer_loss = criterion(z, h)
        torch.testing.assert_close(loss, peer_loss, **TOL)
        max_diff = max(max_diff, (loss - peer_loss).abs().item())
        for o, ls in ((ours_opt, loss), (theirs_opt, peer_loss)):
            ls.backward()
            o.step()
            o.zero_grad()
        obj.after_optimizer_step(step)
        peer.update_target_encoder(next(momentum))
    for ours, theirs in ((obj.context_encoder, peer.encoder.vit), (obj.encoder, peer.target_encoder.vit),
                         (obj.predictor, peer.predictor)):
        theirs_state = theirs.state_dict()
        mine = ours.state_dict() if ours is not obj.predictor else predictor_to_lightly(ours.state_dict())
        for key, value in mine.items():
            torch.testing.assert_close(value, theirs_state[key], **TOL)
            max_diff = max(max_diff, (value - theirs_state[key]).abs().max().item())
    for part in ("context_encoder.blocks.0.attn.qkv.weight", "encoder.blocks.0.attn.qkv.weight",
                 "predictor.predictor_proj.weight"):  # trained, EMA'd, trained: the comparison is not vacuous
        assert (obj.state_dict()[part] - start[part]).abs().max() > 1e-4
    print(f"max abs difference (losses, final weights): {max_diff:.2e}")


def test_pretrain_runs_end_to_end(tmp_path):
    from mimaim.cli import main
    out = tmp_path / "run"
    assert main(["pretrain", "--objective", "ijepa", "--max-steps", "2", "--batch-size", "8", "--no-progress",
                 "--out", str(out), "--set", "objective.predictor_depth=1"]) == 0
    assert (out / "summary.json").exists() and (out / "reconstruction.png").exists()
    encoder = mimaim.load_backbone(out)
    assert not any(k.startswith(("context_encoder", "predictor")) for k in encoder.state_dict())
