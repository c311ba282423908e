"""AIM (2401.08541): prefix-causal attention, next-patch loss, variants, options, CLI end to end."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from mimaim.models.layers import Attention, patchify, pixel_targets
from mimaim.objectives import build_objective, parse_options
from mimaim.objectives.aim import AIM, prefix_causal_block_mask, prefix_causal_mask


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread):
    """These models are tiny: one thread beats two on a shared CPU (conftest.one_torch_thread)."""


N = 16  # 16 px images, patch 4


def tiny_aim(**options):
    torch.manual_seed(0)
    opts = {"head_depth": 1, "head_width": 32, **options}
    return build_objective("aim", "vit_micro", 16, 4, opts, depth=2)


def images(batch=3, seed=1):
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- the mask
def test_prefix_causal_mask_is_bidirectional_in_prefix_and_causal_after():
    S = torch.tensor([3, 1])
    mask = prefix_causal_mask(S, 6)  # (B, 1, N, N) [query, key]
    assert mask.shape == (2, 1, 6, 6) and mask.dtype == torch.bool
    m = mask[0, 0]
    for q in range(6):
        for k in range(6):
            expected = k < 3 or k <= q  # every query sees the prefix; otherwise causal
            assert m[q, k].item() == expected, (q, k)
    assert m[:3, :3].all()  # bidirectional inside the prefix
    assert not m[:3, 3:].any()  # the prefix never sees what follows it
    assert torch.equal(mask[1, 0], torch.ones(6, 6).tril().bool())  # S = 1 is plain causal


def test_trunk_outputs_depend_only_on_allowed_patches():
    aim = tiny_aim().eval()
    x = images(1)
    S = torch.tensor([5])
    with torch.no_grad():
        base = aim.forward_trunk(x, S)  # (1, N, D)
        for patch in (2, 9):  # one inside the prefix, one after it
            y = x.clone()
            r, c = divmod(patch, 4)
            y[:, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4] += 3.0
            changed = (aim.forward_trunk(y, S) - base).abs().amax(dim=-1)[0] > 1e-5  # (N,)
            if patch < 5:
                assert changed.all()  # a prefix patch is seen by every position
            else:
                assert not changed[:patch].any() and changed[patch:].all()  # causal after the prefix


def test_flex_block_mask_matches_dense_sdpa_on_cpu():
    torch.manual_seed(0)
    attn = Attention(32, 4, qkv_bias="none", proj_bias=False).eval()
    x = torch.randn(3, N, 32)
    S = torch.tensor([1, 6, 15])
    with torch.no_grad():
        dense = attn(x, attn_mask=prefix_causal_mask(S, N))
        flex = attn(x, attn_mask=prefix_causal_block_mask(S, N))
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)
    # and the whole objective through both kernels
    sdpa_aim, flex_aim = tiny_aim(attention_kernel="sdpa"), tiny_aim(attention_kernel="flex")
    flex_aim.load_state_dict(sdpa_aim.state_dict())
    with torch.no_grad():
        a, b = sdpa_aim(images(), S), flex_aim(images(), S)
    torch.testing.assert_close(b.pred, a.pred, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.loss, a.loss, atol=1e-6, rtol=1e-6)


def test_flex_training_on_cpu_is_refused_clearly():
    aim = tiny_aim(attention_kernel="flex")
    with pytest.raises(ValueError, match="flex trains only on CUDA"):
        aim(images(), torch.tensor([2, 3, 4]))


# --------------------------------------------------------------------------- the loss
def test_loss_is_next_patch_mse_on_non_prefix_patches_only():
    aim = tiny_aim()
    x = images()
    S = torch.tensor([1, 7, 15])
    out = aim(x, S)
    assert torch.equal(out.mask, (torch.arange(N)[None] >= S[:, None]).float())
    with torch.no_grad():
        head_out = aim.head(aim.forward_trunk(x, S))  # output k predicts patch k+1
        target = pixel_targets(x, 4, aim.options.norm_pix_loss)
        terms = [((head_out[b, t - 1] - target[b, t]) ** 2).mean() for b in range(3) for t in range(S[b], N)]
        expected = torch.stack(terms).mean()
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.target, target)
    torch.testing.assert_close(out.pred, head_out)
    # target is the per-patch normalised pixels (unbiased variance, eps 1e-6)
    patches = patchify(x, 4)
    torch.testing.assert_close(target, (patches - patches.mean(-1, keepdim=True)) /
                               (patches.var(-1, keepdim=True) + 1e-6).sqrt())
    raw = tiny_aim(norm_pix_loss=False)
    with torch.no_grad():
        raw_out = raw.head(raw.forward_trunk(x, S))
        terms = [((raw_out[b, t - 1] - patches[b, t]) ** 2).mean() for b in range(3) for t in range(S[b], N)]
    torch.testing.assert_close(raw(x, S).loss, torch.stack(terms).mean())


def test_loss_gradient_reaches_only_outputs_that_predict_non_prefix_patches():
    aim = tiny_aim()
    x = images(1)
    S = torch.tensor([6])
    grads = {}

    def keep_grad(module, inputs, output):
        output.register_hook(lambda g: grads.setdefault("g", g))

    handle = aim.head.register_forward_hook(keep_grad)
    aim(x, S).loss.backward()
    handle.remove()
    got = grads["g"][0].abs().sum(-1) > 0  # (N,) which head outputs the loss touches
    expected = torch.zeros(N, dtype=torch.bool)
    expected[S.item() - 1:N - 1] = True  # outputs S-1 .. N-2 predict patches S .. N-1
    assert torch.equal(got, expected)


def test_prefix_length_is_drawn_in_range_per_sample():
    aim = tiny_aim()
    draws = torch.stack([aim.sample_masking(torch.Generator().manual_seed(s)) for s in range(400)])
    assert draws.dtype == torch.long and draws.shape == (400,)
    assert draws.min() == 1 and draws.max() == N - 1  # S ~ U[1, N-1]
    assert len(draws.unique()) == N - 1
    narrow = tiny_aim(min_prefix=4, max_prefix=6)
    draws = {narrow.sample_masking(torch.Generator().manual_seed(s)).item() for s in range(100)}
    assert draws == {4, 5, 6}
    # same generator seed, same draw: reproducible in the data pipeline
    assert aim.sample_masking(torch.Generator().manual_seed(3)) == aim.sample_masking(torch.Generator().manual_seed(3))


def test_causal_option_is_prefix_one_with_loss_on_every_later_patch():
    aim = tiny_aim(attention="causal")
    assert aim.sample_masking(torch.Generator().manual_seed(0)).item() == 1
    masking = aim.draw_masking(3)
    out = aim(images(), masking)
    assert torch.equal(out.mask, torch.cat([torch.zeros(3, 1), torch.ones(3, N - 1)], dim=1))
    assert torch.equal(aim.attention_mask(masking)[0, 0], torch.ones(N, N).tril().bool())


def test_masked_variant_is_bidirectional_with_a_mask_token_and_own_patch_targets():
    aim = tiny_aim(mode="masked", mask_ratio=0.5)
    assert aim.mask_token is not None
    mask = aim.sample_masking(torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.sum() == N // 2
    masking = aim.draw_masking(3, torch.Generator().manual_seed(0))
    x = images()
    out = aim(x, masking)
    assert torch.equal(out.mask, masking.float())
    with torch.no_grad():
        pred = aim.head(aim.forward_trunk(x, mask=masking))  # each position predicts itself
        per = ((pred - pixel_targets(x, 4)) ** 2).mean(-1)
    torch.testing.assert_close(out.loss, (per * masking).sum() / masking.sum())
    # bidirectional: the first position's output depends on the last visible patch
    aim.eval()
    visible_last = torch.zeros(1, N, dtype=torch.bool)
    with torch.no_grad():
        y = x[:1].clone()
        y[:, :, 12:, 12:] += 3.0
        a = aim.forward_trunk(x[:1], mask=visible_last)[0, 0]
        b = aim.forward_trunk(y, mask=visible_last)[0, 0]
    assert (a - b).abs().max() > 1e-5


# --------------------------------------------------------------------------- the head, as ml-l3m has it
# A reference written from apple/ml-l3m @ e6376a3017293641bd39fb2dae66546f102fb75f:
# src/l3m/model/heads/simple_decoder.py (SimpleDecoder), src/l3m/model/trunks/transformer.py (Block),
# src/l3m/model/layers/ffn.py (MLP), src/l3m/model/layers/misc.py (GenericIdentity),
# src/l3m/model/preprocessors/pos_embed/sinusoidal.py, with configs/aimv1/001_aim_v1_600M.yaml's head settings
# (attn_target GenericIdentity, use_bias false, norm_layer LayerNorm eps 1e-5, mlp_ratio 4).
def l3m_2d_sincos(embed_dim, grid):
    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gw, gh = np.meshgrid(np.arange(grid[1], dtype=np.float32), np.arange(grid[0], dtype=np.float32))  # w first
    return np.concatenate([one_d(embed_dim // 2, gw), one_d(embed_dim // 2, gh)], axis=1)


class L3MMLP(nn.Module):
    def __init__(self, dim, hidden, use_bias):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=use_bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, bias=use_bias)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class L3MBlock(nn.Module):
    def __init__(self, dim, hidden, eps, use_bias):
        super().__init__()
        self.attn = nn.Identity()  # GenericIdentity: "No Attention - MLP only"
        self.norm_1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = L3MMLP(dim, hidden, use_bias)
        self.norm_2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x):
        x = x + self.attn(self.norm_1(x))
        return x + self.mlp(self.norm_2(x))


class L3MSimpleDecoder(nn.Module):
    def __init__(self, input_dim, embed_dim, output_dim, num_layers, patch_size, image_size, mlp_ratio=4,
                 eps=1e-5, use_bias=False):
        super().__init__()
        grid = (image_size // patch_size, image_size // patch_size)
        self.decoder_projection = nn.Linear(input_dim, embed_dim, bias=True)
        self.decoder_pos_embed = nn.Parameter(torch.from_numpy(l3m_2d_sincos(embed_dim, grid)).float().unsqueeze(0),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList([L3MBlock(embed_dim, int(mlp_ratio * embed_dim), eps, use_bias)
                                             for _ in range(num_layers)])
        self.decoder_norm = nn.LayerNorm(embed_dim, eps=eps)
        self.decoder_pred = nn.Linear(embed_dim, output_dim, bias=True)

    def forward(self, x):  # x: the trunk output after its final norm (postprocessor Identity)
        x = self.decoder_projection(x)
        x = x + self.decoder_pos_embed[:, :x.shape[1]]
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))


def test_head_matches_l3m_simple_decoder_layout_and_output():
    aim = tiny_aim(head_depth=2, head_width=64)
    ref = L3MSimpleDecoder(input_dim=aim.encoder.embed_dim, embed_dim=64, output_dim=4 * 4 * 3, num_layers=2,
                           patch_size=4, image_size=16)
    ours = aim.head.state_dict()
    # the same layer layout: every name and shape, biases where l3m has them and nowhere else
    assert {k: tuple(v.shape) for k, v in ref.state_dict().items()} == {k: tuple(v.shape) for k, v in ours.items()}
    assert [type(m) for m in ref.modules() if isinstance(m, (nn.Linear, nn.LayerNorm))] == \
        [type(m) for m in aim.head.modules() if isinstance(m, (nn.Linear, nn.LayerNorm))]
    assert all(m.eps == 1e-5 for m in aim.head.modules() if isinstance(m, nn.LayerNorm))
    # the sin-cos table at the head's width, fixed
    torch.testing.assert_close(aim.head.decoder_pos_embed, ref.decoder_pos_embed, atol=1e-6, rtol=0)
    assert not aim.head.decoder_pos_embed.requires_grad
    # the same output on the same (perturbed) weights, as the objective runs its head
    with torch.no_grad():
        for p in aim.head.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    ref.load_state_dict(aim.head.state_dict())
    features = aim.forward_trunk(images(), torch.tensor([1, 5, 9]))
    with torch.no_grad():
        torch.testing.assert_close(aim.head(features), ref(features), atol=1e-5, rtol=1e-5)


def test_head_and_trunk_init_as_l3m():
    aim = tiny_aim(head_depth=2, head_width=64)
    for name, m in aim.head.named_modules():
        if isinstance(m, nn.Linear):  # xavier-uniform, zero bias (decoder_pred too: l3m's apply pass redraws it)
            bound = math.sqrt(6.0 / (m.in_features + m.out_features))
            assert m.weight.abs().max() <= bound and m.weight.abs().max() > 0.9 * bound, name
            assert m.bias is None or not m.bias.any(), name
        elif isinstance(m, nn.LayerNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any()
    D = aim.encoder.embed_dim
    for blk in aim.encoder.blocks:  # l3m: separate q, k, v Linears, each xavier over (D, D)
        w = blk.attn.qkv.weight
        assert w.abs().max() <= math.sqrt(6.0 / (2 * D)) and w.abs().max() > math.sqrt(6.0 / (4 * D))
    conv = aim.encoder.patch_embed.proj  # l3m leaves the conv bias at PyTorch's default
    assert conv.bias.abs().max() > 0 and conv.bias.abs().max() <= 1 / math.sqrt(conv.weight[0].numel())


# --------------------------------------------------------------------------- options
def test_trunk_is_the_aim_flavour():
    enc = tiny_aim().encoder
    assert enc.cls_token is None and enc.num_prefix_tokens == 0
    assert enc.pos_embed.requires_grad is False  # fixed sin-cos
    assert isinstance(enc.patch_norm, torch.nn.LayerNorm) and enc.patch_norm.eps == 1e-6
    assert enc.patch_embed.proj.bias is not None  # ml-aim's Conv2d keeps its bias
    for blk in enc.blocks:
        for lin in (blk.attn.qkv, blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2):
            assert lin.bias is None
    aug = AIM.augmentation  # l3m aimv1: crop (0.4, 1) bicubic, flip, ColorJitter(0.4, 0.4, 0.2, 0.1) with p 0.8
    assert (aug.crop_scale, aug.interpolation, aug.hflip) == ((0.4, 1.0), "bicubic", True)
    assert (aug.jitter, aug.jitter_prob, aug.jitter_first) == ((0.4, 0.4, 0.2, 0.1), 0.8, False)


def decay_split(objective):
    """(decayed, undecayed) parameter names of the optimiser groups the engine builds for ``objective``."""
    from mimaim.engine.optim import param_groups_weight_decay

    names = {id(p): n for n, p in objective.named_parameters()}
    groups = param_groups_weight_decay(objective, 0.05, objective.no_weight_decay())
    return {names[id(p)] for p in groups[1]["params"]}, {names[id(p)] for p in groups[0]["params"]}


def test_weight_decay_as_l3m_wd_exclude():
    """l3m aimv1 wd_exclude ['*bias*', '*pos_embed*', '*norm*', '*gamma*'] (fnmatch on parameter names)."""
    from fnmatch import fnmatch

    for aim in (tiny_aim(), tiny_aim(mode="masked")):
        decayed, undecayed = decay_split(aim)
        trainable = {n for n, p in aim.named_parameters() if p.requires_grad}
        l3m_excluded = {n for n in trainable if any(fnmatch(n, pat) for pat in ("*bias*", "*pos_embed*", "*norm*",
                                                                                "*gamma*"))}
        assert undecayed == l3m_excluded and decayed == trainable - l3m_excluded
    assert "mask_token" in decayed


def test_paper_defaults():
    opts = parse_options(AIM, {})
    assert (opts.mode, opts.attention, opts.head_depth, opts.head_width, opts.head_mlp_ratio,
            opts.norm_pix_loss) == ("autoregressive", "prefix", 12, 2048, 4.0, True)


@pytest.mark.parametrize("options, message", [
    ({"attention": "bogus"}, r"aim.attention: unknown value 'bogus'; choose one of prefix, causal"),
    ({"mode": "mim"}, r"aim.mode: unknown value 'mim'; choose one of autoregressive, masked"),
    ({"attention_kernel": "xla"}, r"aim.attention_kernel: unknown value 'xla'"),
    ({"min_prefix": 0}, r"aim.min_prefix must be at least 1"),
    ({"min_prefix": 5, "max_prefix": 3}, r"aim.max_prefix 3 is below aim.min_prefix 5"),
    ({"max_prefix": 16}, r"aim.max_prefix 16 leaves nothing to predict: the image has 16 patches"),
    ({"min_prefix": 15, "max_prefix": 0, "attention": "causal"}, r"no effect with attention=causal"),
    ({"mask_ratio": 0.75}, r"only applies to the masked variant; add --set objective.mode=masked"),
    ({"mode": "masked", "mask_ratio": 1.0}, r"aim.mask_ratio must be in \(0, 1\)"),
    ({"head_depth": -1}, r"need head_depth >= 0"),
    ({"head_style": "lightly"}, r"unknown option\(s\) head_style for objective 'aim'"),
    ({"head_width": 30}, r"aim.head_width 30 must be divisible by 4"),
    ({"unknown": 1}, r"unknown option\(s\) unknown for objective 'aim'"),
])
def test_bad_options_name_value_and_fix(options, message):
    with pytest.raises(ValueError, match=message):
        tiny_aim(**options)


def test_cli_rejects_bad_attention_before_training(tmp_path, capsys):
    from mimaim.cli import main

    rc = main(["pretrain", "--objective", "aim", "--attention", "sideways", "--out", str(tmp_path / "run")])
    assert rc == 2
    assert "aim.attention: unknown value 'sideways'; choose one of prefix, causal" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


# --------------------------------------------------------------------------- learning
def test_a_few_cpu_steps_lower_the_loss():
    aim = tiny_aim()
    x = images(8)
    masking = aim.draw_masking(8, torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(aim.parameters(), lr=2e-3)
    losses = []
    for _ in range(8):
        loss = aim(x, masking).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_reconstruct_columns():
    aim = tiny_aim().eval()
    x = images(2)
    S = torch.tensor([4, 10])
    cols = aim.reconstruct(x, S)
    assert list(cols) == ["original", "prefix seen", "next-patch predictions", "predictions + prefix"]
    for v in cols.values():
        assert v.shape == x.shape
    # the prefix is shown as-is and the rest blanked; predictions fill only the rest
    prefix_px = torch.zeros(2, 1, 16, 16)
    for b, s in enumerate(S.tolist()):
        for patch in range(s):
            r, c = divmod(patch, 4)
            prefix_px[b, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4] = 1
    torch.testing.assert_close(cols["prefix seen"], x * prefix_px)
    assert (cols["next-patch predictions"] * prefix_px).abs().max() == 0
    torch.testing.assert_close(cols["predictions + prefix"] * prefix_px, x * prefix_px)
    masked_cols = tiny_aim(mode="masked").reconstruct(x)
    assert list(masked_cols) == ["original", "masked", "reconstruction", "reconstruction + visible"]


# --------------------------------------------------------------------------- end to end
def test_cli_pretrain_probe_reconstruct(image_folder, tmp_path, capsys):
    from mimaim.cli import main

    run = tmp_path / "aim-run"
    common = ["--data", f"imagefolder:{image_folder}", "--model", "vit_micro", "--img-size", "16",
              "--patch-size", "4", "--batch-size", "4", "--epochs", "2", "--no-progress"]
    assert main(["pretrain", "--objective", "aim", *common, "--max-steps", "3", "--set", "objective.head_depth=1",
                 "--set", "objective.head_width=32", "--out", str(run)]) == 0
    assert (run / "summary.json").exists() and (run / "reconstruction.png").exists()
    assert main(["probe", str(run), "--probes", "linear,knn,attentive", "--layers=-2,-1",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "attentive top-1" in out and "trunk run bidirectionally" in out
    assert main(["reconstruct", str(run), "--out", str(tmp_path / "r.png")]) == 0
    assert (tmp_path / "r.png").exists()
    # a resumed run keeps going with the same objective
    assert main(["pretrain", "--resume", str(run), "--max-steps", "4", "--no-progress"]) == 0


@pytest.mark.parametrize("name", ["aim_600m", "aim_vit_base"])
def test_presets_load(name):
    from pathlib import Path

    from mimaim.config import load_yaml, make_config
    from mimaim.engine.build import resolved_objective_options

    cfg = make_config(load_yaml(Path(__file__).parent.parent / "configs" / f"{name}.yaml"))
    assert (cfg.objective, cfg.recipe, cfg.lr, cfg.batch_size, tuple(cfg.betas)) == ("aim", "paper", 1e-3, 4096,
                                                                                     (0.9, 0.95))
    opts = parse_options(AIM, resolved_objective_options(cfg))
    assert (opts.attention, opts.head_depth, opts.head_width) == ("prefix", 12, 2048)
    # ml-l3m configs/aimv1/001_aim_v1_600M.yaml: grad_clip 1.0, warm-up over 2.5% of the iterations, cosine to 0
    assert (cfg.clip_grad, cfg.schedule, cfg.min_lr, cfg.weight_decay) == (1.0, "cosine", 0.0, 0.05)
    assert cfg.warmup_epochs == pytest.approx(0.025 * cfg.epochs)
