"""NEPA: Next-Embedding Prediction Makes Strong Vision Learners (Xu et al., 2512.16922).

Next-embedding predictive autoregression as the authors' ``SihanXU/nepa`` trains it: the patch embeddings
z = f(x) (the patch projection alone, no positions) run through a causal ViT h, output k (after the final
norm) predicts z_{k+1}, and the loss is the negative cosine against the detached target (stop-gradient):
no decoder, no EMA target, no tokenizer. A cls token, where the trunk has one, is the first token of the
sequence, so its output predicts patch 1 and every patch is a target. Probes read the trunk bidirectional.

Departures (docs/methods.md section 12): 2-D sin-cos positions added to the input instead of RoPE
(theta 100, coordinate rescale 2.0), still kept out of the target; no QK-norm; LayerNorm eps 1e-6, not 1e-12;
GELU MLP as the released configs (the paper's SwiGLU is not offered); ImageNet mean/std, not 0.5/0.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import trunc_normal_

from ..data import IMAGENET_MEAN, IMAGENET_STD
from ..models.layers import patch_mask_to_pixels, patchify, unpatchify
from .aim import prefix_causal_mask
from .base import Augmentation, Objective, ObjectiveOutput, ProbeProtocol, register_objective


@dataclass
class NEPAOptions:
    layer_scale: float = 1e-5  # LayerScale's initial value on both residual branches (configs: layerscale_value)

    def validate(self):
        if self.layer_scale < 0:
            raise ValueError(f"nepa.layer_scale must be >= 0 (0: no LayerScale), got {self.layer_scale}")


def next_embedding_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The paper's ``D``: minus the cosine of each prediction (B, M, D) with its target (B, M, D), detached
    (stop-gradient), averaged over positions and images; in float32."""
    pred, target = F.normalize(pred.float(), dim=-1), F.normalize(target.detach().float(), dim=-1)
    return -(pred * target).sum(dim=-1).mean()


@register_objective
class NEPA(Objective):
    name = "nepa"
    Options = NEPAOptions
    #: run_nepa.py with the released preprocessor: RandomResizedCrop (torchvision defaults: scale (0.08, 1),
    #: bilinear) and a flip, nothing else
    augmentation = Augmentation(crop_scale=(0.08, 1.0), interpolation="bilinear")
    #: the authors evaluate by fine-tuning (no linear probe released): ViTNepaForImageClassification with
    #: add_pooling_layer reads the mean of the patch tokens after the final norm, attention bidirectional
    probe_protocol = ProbeProtocol(pool="mean", layers=None, norm=True,
                                   source="SihanXU/nepa ViTNepaForImageClassification (mean of patch tokens, "
                                          "final norm; bidirectional: configs/finetune is_causal false)")
    #: ``recipe: quick``: see ``quick_epochs``; the paper's LayerScale 1e-5 leaves the blocks all but shut in a
    #: minute of training, so the quick run opens them at 0.1 (docs/methods.md section 12)
    quick_options = {"layer_scale": 0.1}
    quick_epochs = 8
    loss_floor = -1.0  #: -cosine: scale fits 1 - cos

    @classmethod
    def backbone_kwargs(cls, options):
        # configs/pretrain: a cls token in front, qkv and every Linear with bias, LayerScale on both branches
        return dict(class_token=True, pos_embed="sincos", qkv_bias="all", bias=True,
                    init_values=options.layer_scale or None, weight_init="xavier")

    def __init__(self, encoder: nn.Module, options: NEPAOptions):
        super().__init__(encoder, options)
        if encoder.num_prefix_tokens + encoder.num_patches < 2:
            raise ValueError("NEPA needs at least 2 tokens to predict a next one; use a smaller --patch-size")
        self._init_trunk_as_official()

    @torch.no_grad()
    def _init_trunk_as_official(self):
        """``ViTNepaPreTrainedModel._init_weights``: Linear and patch Conv2d weights N(0, 0.02) (truncated at
        +-2, i.e. hardly), zero biases, the cls token N(0, 0.02); LayerNorms (1, 0), LayerScale its value."""
        for m in self.encoder.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.encoder.cls_token is not None:
            trunc_normal_(self.encoder.cls_token, std=0.02)

    def forward_trunk(self, images: torch.Tensor, causal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (the trunk's outputs (B, T, D) after the final norm, causal over [cls,] patches in raster order;
        the embeddings z = f(x) (B, N, D), patch projection only: the target has no position, as with RoPE)."""
        enc = self.encoder
        z = enc.patch_norm(enc.patch_embed(images))  # (B, N, D)
        x = z if enc.pos_embed is None else z + enc.pos_embed[:, enc.num_prefix_tokens:]
        T = enc.num_prefix_tokens + z.shape[1]
        mask = prefix_causal_mask(torch.ones(1, dtype=torch.long, device=z.device), T) if causal else None
        return enc.forward_tokens(x, attn_mask=mask), z  # a prefix of one token: plain causal attention

    def next_pairs(self, h: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Outputs and embeddings -> (pred, target), each (B, M, D): output k against token k + 1's embedding
        (``prediction_loss(shift=True)``); M = N with a cls token (it predicts patch 1), else N - 1."""
        return h[:, :-1], z[:, 1 - self.encoder.num_prefix_tokens:]

    def forward(self, images, masking=None):
        pred, target = self.next_pairs(*self.forward_trunk(images))
        return ObjectiveOutput(loss=next_embedding_loss(pred, target), pred=pred, target=target.detach())

    def no_weight_decay(self):
        """None: the authors exempt biases, norms and LayerScale (1-D here, undecayed anyway) and decay the
        cls token; the sin-cos table is frozen."""
        return set()

    @torch.no_grad()
    def reconstruct(self, images, masking=None):
        """A latent objective has no pixels to show: each patch is drawn as the patch of the batch whose
        embedding lies nearest (cosine) to what the trunk predicted for it from the patches before it, next to
        a map of that prediction's cosine with the true next embedding (white 1, black -1). Without a cls
        token nothing predicts patch 0: it stays blank (the mean colour) in both."""
        h, z = self.forward_trunk(images)
        pred, target = self.next_pairs(h, z)
        (B, N, _), p, grid = z.shape, self.encoder.patch_size, self.encoder.grid_size
        skip = N - pred.shape[1]
        pred = F.normalize(pred.float(), dim=-1)
        bank = F.normalize(z.float().flatten(0, 1), dim=-1)  # (B*N, D): every patch of the batch
        pixels = patchify(images, p)  # (B, N, p*p*C)
        nearest, shade = torch.zeros_like(pixels), torch.zeros(B, N, device=images.device)
        nearest[:, skip:] = pixels.flatten(0, 1)[(pred @ bank.T).argmax(-1)]
        shade[:, skip:] = ((pred * F.normalize(target.float(), dim=-1)).sum(-1) + 1) / 2  # cosine -> [0, 1]
        shown = torch.ones(B, N, device=images.device)
        shown[:, :skip] = 0
        mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
        shade = (patch_mask_to_pixels(shade, p, grid) - mean) / std * patch_mask_to_pixels(shown, p, grid)
        return {"original": images,
                "nearest batch patch to each prediction": unpatchify(nearest, p, grid, images.shape[1]),
                "cosine with the true next embedding": shade.to(images.dtype)}
