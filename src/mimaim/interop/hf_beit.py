"""Our BEiT objective <-> HuggingFace ``BeitForMaskedImageModeling``, both ways.

The two hold the same weights under other names (docs/methods.md section 9):

==========================================  ======================================================
mimaim                                      transformers (5.x names; 4.x names in brackets)
==========================================  ======================================================
mask_token, encoder.cls_token               beit.embeddings.mask_token, .cls_token
encoder.patch_embed.proj                    beit.embeddings.patch_embeddings.projection
encoder.pos_embed (rel_pos_bias=False)      beit.embeddings.position_embeddings
encoder.rel_pos_bias.relative_position_     beit.shared_position_bias.relative_position_bias_table
bias_table                                  [beit.encoder.relative_position_bias....]
blocks.N.norm1 / norm2                      beit.layers.N.layernorm_before / layernorm_after
blocks.N.attn.qkv (thirds q, k, v)          .attention.{q,k,v}_proj [.attention.attention.{query,key,value}]
blocks.N.attn.q_bias / v_bias               .attention.q_proj.bias / v_proj.bias (k has no bias)
blocks.N.attn.proj                          .attention.o_proj [.attention.output.dense]
blocks.N.ls1.gamma / ls2.gamma              .lambda_1 / lambda_2
blocks.N.mlp.fc1 / fc2                      .mlp.fc1 / fc2 [.intermediate.dense / .output.dense]
encoder.norm, lm_head                       layernorm (top level), lm_head
==========================================  ======================================================

Quirks: set ``layer_norm_eps=1e-6`` (HF's default is 1e-12); HF's ``labels`` are the ids at
the masked positions only (a 1-D tensor), and its ``logits`` cover every patch.
The tokenizer (e.g. the k-means codebook) has no HF counterpart and is not converted.
"""

from __future__ import annotations

import torch


def hf_beit_config(objective):
    """A ``BeitConfig`` with our BEiT objective's shape and flavour."""
    from transformers import BeitConfig

    enc = objective.encoder
    blk = enc.blocks[0]
    # HF builds lambda_1/2 only for a positive init value; their values are loaded afterwards
    layer_scale = 0.1 if hasattr(blk.ls1, "gamma") else 0.0
    return BeitConfig(
        image_size=enc.img_size, patch_size=enc.patch_size, num_channels=enc.in_chans,
        hidden_size=enc.embed_dim, num_hidden_layers=enc.depth, num_attention_heads=enc.num_heads,
        intermediate_size=blk.mlp.fc1.out_features, vocab_size=objective.vocab_size, hidden_act="gelu",
        layer_norm_eps=1e-6, use_mask_token=True, use_absolute_position_embeddings=enc.pos_embed is not None,
        use_relative_position_bias=False, use_shared_relative_position_bias=enc.rel_pos_bias is not None,
        layer_scale_init_value=layer_scale,
        drop_path_rate=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _names(layout: str, i: int) -> dict[str, str]:
    L = f"beit.layers.{i}." if layout == "v5" else f"beit.encoder.layer.{i}."
    if layout == "v5":
        att = {"q": L + "attention.q_proj", "k": L + "attention.k_proj", "v": L + "attention.v_proj",
               "o": L + "attention.o_proj", "fc1": L + "mlp.fc1", "fc2": L + "mlp.fc2"}
    else:
        att = {"q": L + "attention.attention.query", "k": L + "attention.attention.key",
               "v": L + "attention.attention.value", "o": L + "attention.output.dense",
               "fc1": L + "intermediate.dense", "fc2": L + "output.dense"}
    return {**att, "norm1": L + "layernorm_before", "norm2": L + "layernorm_after",
            "ls1": L + "lambda_1", "ls2": L + "lambda_2"}


def _rel_key(layout: str) -> str:
    return ("beit.shared_position_bias.relative_position_bias_table" if layout == "v5"
            else "beit.encoder.relative_position_bias.relative_position_bias_table")


def hf_layout(hf_keys) -> str:
    """"v5" (transformers 5.x: beit.layers.N.attention.q_proj) or "v4" (beit.encoder.layer.N...)."""
    return "v5" if any(k.startswith("beit.layers.") for k in hf_keys) else "v4"


def to_hf_state_dict(objective, layout: str = "v5") -> dict[str, torch.Tensor]:
    """Our objective's weights under ``BeitForMaskedImageModeling`` names."""
    sd = {k: v.detach() for k, v in objective.state_dict().items()}
    enc = objective.encoder
    out = {
        "beit.embeddings.mask_token": sd["mask_token"],
        "beit.embeddings.cls_token": sd["encoder.cls_token"],
        "beit.embeddings.patch_embeddings.projection.weight": sd["encoder.patch_embed.proj.weight"],
        "beit.embeddings.patch_embeddings.projection.bias": sd["encoder.patch_embed.proj.bias"],
        "layernorm.weight": sd["encoder.norm.weight"], "layernorm.bias": sd["encoder.norm.bias"],
        "lm_head.weight": sd["lm_head.weight"], "lm_head.bias": sd["lm_head.bias"],
    }
    if enc.pos_embed is not None:
        out["beit.embeddings.position_embeddings"] = sd["encoder.pos_embed"]
    if enc.rel_pos_bias is not None:
        out[_rel_key(layout)] = sd["encoder.rel_pos_bias.relative_position_bias_table"]
    for i in range(enc.depth):
        p, n = f"encoder.blocks.{i}.", _names(layout, i)
        q, k, v = sd[p + "attn.qkv.weight"].chunk(3, dim=0)
        out[n["q"] + ".weight"], out[n["k"] + ".weight"], out[n["v"] + ".weight"] = q, k, v
        if p + "attn.q_bias" in sd:
            out[n["q"] + ".bias"], out[n["v"] + ".bias"] = sd[p + "attn.q_bias"], sd[p + "attn.v_bias"]
        for ours, theirs in (("attn.proj", "o"), ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2"), ("norm1", "norm1"),
                             ("norm2", "norm2")):
            out[n[theirs] + ".weight"] = sd[p + ours + ".weight"]
            out[n[theirs] + ".bias"] = sd[p + ours + ".bias"]
        if p + "ls1.gamma" in sd:
            out[n["ls1"]], out[n["ls2"]] = sd[p + "ls1.gamma"], sd[p + "ls2.gamma"]
    return out


def from_hf_state_dict(hf_state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """``BeitForMaskedImageModeling`` weights -> our objective's names (without the tokenizer)."""
    layout = hf_layout(hf_state)
    s = hf_state
    out = {
        "mask_token": s["beit.embeddings.mask_token"], "encoder.cls_token": s["beit.embeddings.cls_token"],
        "encoder.patch_embed.proj.weight": s["beit.embeddings.patch_embeddings.projection.weight"],
        "encoder.patch_embed.proj.bias": s["beit.embeddings.patch_embeddings.projection.bias"],
        "encoder.norm.weight": s["layernorm.weight"], "encoder.norm.bias": s["layernorm.bias"],
        "lm_head.weight": s["lm_head.weight"], "lm_head.bias": s["lm_head.bias"],
    }
    if "beit.embeddings.position_embeddings" in s:
        out["encoder.pos_embed"] = s["beit.embeddings.position_embeddings"]
    if _rel_key(layout) in s:
        out["encoder.rel_pos_bias.relative_position_bias_table"] = s[_rel_key(layout)]
    for i in range(depth):
        p, n = f"encoder.blocks.{i}.", _names(layout, i)
        out[p + "attn.qkv.weight"] = torch.cat([s[n[x] + ".weight"] for x in ("q", "k", "v")], dim=0)
        if n["q"] + ".bias" in s:
            out[p + "attn.q_bias"], out[p + "attn.v_bias"] = s[n["q"] + ".bias"], s[n["v"] + ".bias"]
        for ours, theirs in (("attn.proj", "o"), ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2"), ("norm1", "norm1"),
                             ("norm2", "norm2")):
            out[p + ours + ".weight"] = s[n[theirs] + ".weight"]
            out[p + ours + ".bias"] = s[n[theirs] + ".bias"]
        if n["ls1"] in s:
            out[p + "ls1.gamma"], out[p + "ls2.gamma"] = s[n["ls1"]], s[n["ls2"]]
    return out


def to_hf(objective):
    """A ``BeitForMaskedImageModeling`` in eval mode holding our objective's weights."""
    from transformers import BeitForMaskedImageModeling

    hf = BeitForMaskedImageModeling(hf_beit_config(objective))
    expected = hf.state_dict()
    weights = to_hf_state_dict(objective, hf_layout(expected))
    missing = [k for k in expected if k not in weights and "relative_position_index" not in k]
    unexpected = [k for k in weights if k not in expected]
    if missing or unexpected:
        raise ValueError(f"BEiT -> HF conversion does not fit this transformers version: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    hf.load_state_dict(weights, strict=False)
    return hf.eval()


def load_from_hf(objective, hf_model) -> None:
    """Copy a ``BeitForMaskedImageModeling``'s weights into our objective (tokenizer untouched)."""
    weights = from_hf_state_dict(hf_model.state_dict(), objective.encoder.depth)
    missing, unexpected = objective.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.startswith("tokenizer.")]
    if missing or unexpected:
        raise ValueError(f"HF -> BEiT conversion: missing {missing[:4]}, unexpected {unexpected[:4]}")
