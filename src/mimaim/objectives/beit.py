"""BEiT: BERT Pre-Training of Image Transformers (Bao et al., 2106.08254).

Section 2 of the paper, as unilm ``beit/`` implements it: a visual tokenizer gives one id per patch
(2.1.2), blockwise masking (Algorithm 1) hides ~40% of the patches behind a learned [M] token, and a
Linear head on the masked positions is trained with cross-entropy against the ids (eq. 1). Backbone,
recipe and departures (the default tokenizer is a k-means codebook): docs/methods.md sections 3 and 6.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from ..data import IMAGENET_MEAN, IMAGENET_STD
from ..masking import blockwise_mask
from ..models.layers import patch_mask_to_pixels
from ..tokenizers import build_tokenizer, id_colours
from .base import Augmentation, Objective, ProbeProtocol, ObjectiveOutput, register_objective


@dataclass
class BEiTOptions:
    tokenizer: str = "kmeans"  # kmeans | dalle:PATH | PATH of a `mimaim tokenizer train` folder
    vocab_size: int = 0  # 0: the tokenizer's own (DALL-E 8192, k-means 256); else it must match the file
    mask_ratio: float = 0.4  # budget int(ratio * N); the official code fixes 75 of 196 (num_mask_patches)
    num_mask_patches: int = 0  # > 0: the budget itself, as the official --num_mask_patches 75
    min_block_patches: int = 16
    max_block_patches: int = 0  # 0: up to the remaining budget
    min_aspect: float = 0.3  # block aspect ratio in [min_aspect, 1 / min_aspect]
    layer_scale: float = 0.1  # --layer_scale_init_value: 0.1 for Base, 1e-5 for Large; 0 disables it
    rel_pos_bias: bool = True  # shared relative position bias, zero at init (False: --disable_rel_pos_bias)
    abs_pos_emb: bool = False  # --abs_pos_emb: a learned absolute table (always there without rel_pos_bias)
    drop_path: float = 0.1

    def validate(self):
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"beit.mask_ratio must be in (0, 1), got {self.mask_ratio}; the paper uses 0.4")
        if self.vocab_size < 0:
            raise ValueError(f"beit.vocab_size must be >= 0 (0 = the tokenizer's own), got {self.vocab_size}")
        if self.min_block_patches < 1:
            raise ValueError(f"beit.min_block_patches must be at least 1, got {self.min_block_patches}")
        if not 0.0 < self.min_aspect <= 1.0:
            raise ValueError(f"beit.min_aspect must be in (0, 1], got {self.min_aspect}; the paper uses 0.3")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"beit.drop_path must be in [0, 1), got {self.drop_path}")


@register_objective
class BEiT(Objective):
    """Masked image modeling with visual tokens: ``--tokenizer`` kmeans | dalle:PATH | PATH."""

    name = "beit"
    Options = BEiTOptions
    # ColorJitter(0.4) + flip + RandomResizedCrop(scale (0.08, 1)) (DataAugmentationForBEiT)
    augmentation = Augmentation(crop_scale=(0.08, 1.0), color_jitter=0.4)
    #: the cls output never enters BEiT's loss; the paper probes mean-pooled patch tokens
    probe_protocol = ProbeProtocol(pool="mean", layers=None, norm=True,
                                   source="BEiT paper, linear probing on mean-pooled patch tokens (the official "
                                          "run_linear_eval.py concatenates cls and mean per block and reports the "
                                          "best block: not reproduced, docs/methods.md section 7)")
    #: ``recipe: quick``: fewer epochs (BEiT runs the trunk over all tokens, MAE over a quarter) and the released
    #: BEiT-base flags (--abs_pos_emb --disable_rel_pos_bias --layer_scale_init_value 0): positions from step 0,
    #: where a relative bias starting at zero stays near zero over a run of minutes
    quick_options = {"abs_pos_emb": True, "rel_pos_bias": False, "layer_scale": 0.0}
    quick_epochs = 8

    @classmethod
    def backbone_kwargs(cls, options):
        absolute = options.abs_pos_emb or not options.rel_pos_bias
        return dict(class_token=True, pos_embed="learned" if absolute else "none", qkv_bias="qv",
                    rel_pos_bias=options.rel_pos_bias, init_values=options.layer_scale or None,
                    drop_path_rate=options.drop_path, weight_init="trunc_normal")

    def __init__(self, encoder: nn.Module, options: BEiTOptions):
        super().__init__(encoder, options)
        H, W = encoder.grid_size
        # the budget int(ratio * N) (the official code passes 75 of 196 as --num_mask_patches)
        self.num_masking_patches = options.num_mask_patches or int(options.mask_ratio * H * W)
        if not 0 < self.num_masking_patches < H * W:
            raise ValueError(f"beit: a budget of {self.num_masking_patches} masked patches does not fit a {H}x{W} "
                             "patch grid; choose --mask-ratio or --set objective.num_mask_patches between 1 and "
                             f"{H * W - 1}")
        if options.min_block_patches > (H - 1) * (W - 1):
            raise ValueError(f"beit.min_block_patches {options.min_block_patches} cannot fit a {H}x{W} patch grid "
                             f"(blocks must be smaller than the grid, at most {(H - 1) * (W - 1)} patches); lower "
                             f"--set objective.min_block_patches or raise --img-size / lower --patch-size")
        tokenizer = build_tokenizer(options.tokenizer, encoder.patch_size, options.vocab_size)
        if tokenizer.in_checkpoint:
            self.tokenizer = tokenizer  # the k-means codebook is fitted in the run: saved with it
        else:
            # frozen weights from the user's file, named in the run's config: kept out of the module
            # tree, so checkpoints, the optimiser and DDP never carry them; moved to the batch's device
            object.__setattr__(self, "tokenizer", tokenizer)
        self.vocab_size = tokenizer.vocab_size
        D = encoder.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.lm_head = nn.Linear(D, self.vocab_size)
        # modeling_pretrain.py: truncated normal std 0.02 clipped at +-0.02, zero bias
        trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)
        trunc_normal_(self.lm_head.weight, std=0.02, a=-0.02, b=0.02)
        nn.init.zeros_(self.lm_head.bias)

    def no_weight_decay(self):
        """The official skip list (``VisionTransformerForMaskedImageModeling.no_weight_decay``): the cls token
        and absolute table; the relative position bias table and mask token are decayed (docs/methods.md 3)."""
        return {"encoder.cls_token", "encoder.pos_embed"}

    def sample_masking(self, generator):
        o = self.options
        return blockwise_mask(self.encoder.grid_size, self.num_masking_patches, o.min_block_patches,
                              o.max_block_patches or None, o.min_aspect, generator=generator)  # (N,) bool

    @torch.no_grad()
    def visual_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, N) token ids, in float32 and without gradients."""
        tok = self.tokenizer
        first = next(iter(tok.parameters()), None) if not tok.in_checkpoint else None
        if first is not None and first.device != images.device:
            tok.to(images.device)
        with torch.autocast(images.device.type, enabled=False):
            ids = tok.tokenize(images.float(), self.encoder.grid_size)  # (B, h, w)
        return ids.flatten(1)

    def forward_encoder(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """All patches, masked ones replaced by [M] -> (B, N, D) after the final LayerNorm."""
        x = self.encoder.embed(images, mask=mask, mask_token=self.mask_token)  # (B, N, D)
        return self.encoder.forward_tokens(x)[:, self.encoder.num_prefix_tokens:]  # (B, N, D)

    def forward_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the masked positions' logits (M, V) against their ids (M,)."""
        return F.cross_entropy(logits.float(), targets)

    def forward(self, images, masking=None):
        mask = self.masking_or_draw(images, masking).bool()  # (B, N)
        ids = self.visual_tokens(images)  # (B, N)
        x = self.forward_encoder(images, mask)
        logits = self.lm_head(x[mask])  # (M, V), masked positions only
        target = ids[mask]  # (M,)
        loss = self.forward_loss(logits, target)
        accuracy = (logits.argmax(-1) == target).float().mean()
        return ObjectiveOutput(loss=loss, pred=logits, target=ids, mask=mask.float(),
                               extras={"accuracy": accuracy.detach()})

    @staticmethod
    def _to_image(pixels: torch.Tensor, size) -> torch.Tensor:
        """[0, 1] pixels -> normalised input space at ``size``."""
        if tuple(pixels.shape[-2:]) != tuple(size):
            pixels = F.interpolate(pixels, size=size, mode="bicubic", antialias=True).clamp(0, 1)
        mean = torch.tensor(IMAGENET_MEAN, device=pixels.device).view(1, 3, 1, 1)
        return (pixels - mean) / torch.tensor(IMAGENET_STD, device=pixels.device).view(1, 3, 1, 1)

    @torch.no_grad()
    def reconstruct(self, images, masking=None):
        """Original, masked input, then the tokenizer's ids and the predicted ids (visible patches pasted back),
        decoded when the tokenizer has a decoder (the best the objective can reach, and what it reached),
        else colour-coded (DALL-E's encoder alone)."""
        mask = self.masking_or_draw(images, masking).bool()  # (B, N)
        B = images.shape[0]
        H, W = self.encoder.grid_size
        ids = self.visual_tokens(images)  # (B, N)
        pred = self.lm_head(self.forward_encoder(images, mask)).argmax(-1)  # (B, N)
        filled = torch.where(mask, pred, ids)  # predictions where masked, the true ids elsewhere
        visible = patch_mask_to_pixels((~mask).float(), self.encoder.patch_size, (H, W))
        size = images.shape[-2:]
        columns = {"original": images, "masked": images * visible}
        tok = self.tokenizer
        if tok.has_decoder:
            reference = tok.to_input(images, (H, W))
            target_img = self._to_image(tok.decode(ids.view(B, H, W), reference), size)
            pred_img = self._to_image(tok.decode(filled.view(B, H, W), reference), size)
            columns["tokenizer ids decoded"] = target_img
            columns["predicted ids decoded + visible"] = images * visible + pred_img * (1 - visible)
        else:
            columns["tokenizer ids"] = self._to_image(id_colours(ids.view(B, H, W), self.vocab_size, size), size)
            pred_img = self._to_image(id_colours(filled.view(B, H, W), self.vocab_size, size), size)
            columns["predicted ids (masked)"] = pred_img * (1 - visible) + images * visible
        return columns

