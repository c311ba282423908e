"""``mimaim pretrain --init SOURCE``: start a new run from existing weights.

``initialize_from(objective, source)`` copies into a freshly built objective whatever ``source`` holds of it and
reports the rest as initialised:

* a mimaim run directory or checkpoint folder of the same objective: everything (encoder, heads, a fitted codebook);
* a local HuggingFace folder (``config.json`` + weights, e.g. ``facebook/vit-mae-base`` saved with
  ``save_pretrained``): ``vit_mae`` (encoder and decoder: MAE), ``beit`` (encoder, mask token, ``lm_head``: BEiT),
  ``vit`` / ``swin`` (SimMIM's plain ViT or Swin, with its head when the folder is a ``*ForMaskedImageModeling``),
  ``ijepa`` (``facebook/ijepa_*``: the encoder, which I-JEPA's context encoder copies);
* a timm checkpoint: a hub folder (``mimaim export --to timm`` writes one) or a file (``.safetensors``, ``.pth``,
  ``.pt``, ``.bin``) holding a timm ``VisionTransformer`` / ``Beit`` / ``SwinTransformer`` state dict, optionally
  under ``"model"`` or ``"state_dict"`` (the official MAE checkpoints: their ``decoder_*`` and ``mask_token`` too).

The encoder must come whole: a missing block, another width, patch or image size, or another flavour (e.g. q/v-only
bias) is a ValueError naming the source's and the run's values. Weights of a head the run does not have (a
classifier, another objective's decoder) are skipped and listed. The report notes the settings of an HF
``config.json`` that the run does not take, with both values, and a source's frozen position table that is not the
fixed sin-cos one (zeros, say): the run keeps its own.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..engine.runs import read_checkpoint_weights, read_record, resolve_checkpoint
from ..models.layers import sincos_2d
from . import hf_beit, hf_ijepa, hf_mae, hf_simmim

__all__ = ["InitReport", "initialize_from", "read_source"]

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors")


@dataclass
class InitReport:
    source: str
    kind: str  # what the source was read as, e.g. "HF vit_mae folder"
    loaded: list[str] = field(default_factory=list)  # objective state-dict names taken from the source
    initialised: list[str] = field(default_factory=list)  # names left at their fresh initialisation
    skipped: list[str] = field(default_factory=list)  # source names the objective has no place for
    notes: list[str] = field(default_factory=list)  # source settings this run does not take

    def summary(self) -> str:
        def groups(names):
            counts = Counter(n.split(".")[0] for n in names)
            return ", ".join(f"{k} ({v})" for k, v in sorted(counts.items())) or "nothing"

        def first(names):
            return ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")

        lines = [f"init from {self.source} ({self.kind}): loaded {len(self.loaded)} tensors: {groups(self.loaded)}",
                 f"  initialised {len(self.initialised)}: {groups(self.initialised)}"
                 + (f" [{first(self.initialised)}]" if self.initialised else "")]
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)} source tensors with no place in this run: "
                         f"{first(self.skipped)}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


# --------------------------------------------------------------------------- reading sources
def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    if path.suffix not in (".pth", ".pt", ".bin"):
        raise ValueError(f"--init {path}: unknown weight file type {path.suffix!r}; pass a .safetensors, .pth, "
                         ".pt or .bin file, a mimaim run directory, or a HuggingFace/timm folder")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "module"):  # official MAE/BEiT checkpoints, Lightning
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"--init {path}: the file holds no state dict of tensors")
    return state


def _folder_weights(folder: Path) -> dict[str, torch.Tensor]:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return _read_file(folder / name)
    shards = sorted(folder.glob("model-*.safetensors"))
    if shards:
        out = {}
        for shard in shards:
            out.update(_read_file(shard))
        return out
    raise ValueError(f"--init {folder}: config.json but no model.safetensors / pytorch_model.bin beside it")


def _from_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ViT/Beit/Swin (and official MAE) names -> our objective's names."""
    out = {}
    for key, value in state.items():
        if key.startswith(("decoder", "mask_token")):  # official MAE's decoder: our MAE's own names
            out[key] = value
            continue
        key = key.replace("patch_embed.norm.", "patch_norm.")  # AIM's patch LayerNorm (Swin: undone below)
        key = key.replace(".gamma_1", ".ls1.gamma").replace(".gamma_2", ".ls2.gamma")
        out["encoder." + key] = value
    return out


def _swin_patch_norm_fix(ours: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """timm Swin keeps ``patch_embed.norm``: undo the rename made for ViTs with a patch LayerNorm."""
    for k in [k for k in ours if k.startswith("encoder.patch_norm.")]:
        swin_key = k.replace("encoder.patch_norm.", "encoder.patch_embed.norm.")
        if swin_key in expected and k not in expected:
            ours[swin_key] = ours.pop(k)


def _hf_state(folder: Path, config: dict) -> dict[str, torch.Tensor]:
    """The folder's weights as its ``transformers`` class holds them (the installed version's key names)."""
    import transformers

    names = config.get("architectures") or ["AutoModel"]
    cls = getattr(transformers, names[0], None)
    if cls is None:
        raise ValueError(f"--init {folder}: transformers has no class {names[0]!r} (config.json architectures)")
    return cls.from_pretrained(str(folder), local_files_only=True).state_dict()


#: model_type -> the prefix of its base model in the task model, then the task model's own keys
_HF_BASES = {"vit_mae": ("vit.", "decoder."), "vit": ("vit.", "decoder."), "swin": ("swin.", "decoder."),
             "beit": ("beit.", "lm_head.", "layernorm."), "ijepa": ("ijepa.",)}


def _from_hf(folder: Path, config: dict, state: dict[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]]:
    """An HF folder's weights under our names; a base model's keys (no ``vit.``/``beit.``/``swin.`` prefix)
    are read as its task model's, and a classifier or pooler is left out."""
    model_type = config.get("model_type")
    kind = f"HF {config.get('architectures', [model_type])[0]} folder"
    if model_type not in _HF_BASES:
        raise ValueError(f"--init {folder}: HF model_type {model_type!r} is not one mimaim can read; supported: "
                         "vit_mae (MAE), beit (BEiT), vit and swin (SimMIM), ijepa (I-JEPA)")
    own = _HF_BASES[model_type]
    state = {(k if k.startswith(own) else own[0] + k): v for k, v in state.items()
             if not k.startswith(("pooler.", "classifier.", "beit.pooler."))}
    if model_type == "beit":  # a classifier without mean pooling keeps the final norm in its base model
        state = {k.removeprefix("beit.") if k.startswith("beit.layernorm.") else k: v for k, v in state.items()}
        return kind, hf_beit.from_hf_state_dict(state)
    if model_type == "vit_mae":
        return kind, hf_mae.mae_state_dict_from_hf(state)
    if model_type == "ijepa":
        return kind, hf_ijepa.from_hf_state_dict(state)
    return kind, hf_simmim.simmim_state_dict_from_hf(state)


def read_source(source: str | Path) -> tuple[str, dict[str, torch.Tensor], dict | None, dict | None]:
    """-> (kind, weights under our objective's names, mimaim run record or None, HF config.json or None)."""
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--init {source}: no such file or folder; pass a mimaim run directory or "
                                "checkpoint, a local HuggingFace folder, or a timm checkpoint file")
    if path.is_file():
        state = _read_file(path)
        if any(k.startswith(("vit.", "beit.", "swin.")) for k in state):
            raise ValueError(f"--init {path}: this file holds HuggingFace transformers weights; pass the folder "
                             "with its config.json instead")
        return f"timm checkpoint file {path.suffix}", _from_timm(state), None, None
    if (path / "config.yaml").is_file() or (path / "checkpoints").is_dir() or (path / "run.json").is_file() or \
            (path / "state.pt").is_file():
        ckpt = resolve_checkpoint(path)
        return f"mimaim checkpoint {ckpt.name}", read_checkpoint_weights(ckpt), read_record(ckpt), None
    if (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text())
        if "architecture" in config:  # timm's hub format
            return f"timm hub folder ({config['architecture']})", _from_timm(_folder_weights(path)), None, None
        try:
            return (*_from_hf(path, config, _hf_state(path, config)), None, config)
        except KeyError as err:  # a key the converters do not know: another architecture
            raise ValueError(f"--init {path}: the HF weights do not map onto mimaim's model: {err}") from None
    raise ValueError(f"--init {path}: not a mimaim run (no config.yaml or checkpoints/), nor a HuggingFace/timm "
                     "folder (no config.json)")


# --------------------------------------------------------------------------- matching
def _describe(objective: nn.Module) -> str:
    enc = objective.encoder
    return (f"this run's {objective.name} encoder (width {enc.embed_dim}, {enc.depth} blocks, patch "
            f"{enc.patch_size}, image {enc.img_size} px)")


def _shape_hint(key: str, theirs: tuple, ours: tuple) -> str:
    if key.endswith("patch_embed.proj.weight"):
        return (f"width {theirs[0]} and patch {theirs[-1]} in the source vs width {ours[0]} and patch {ours[-1]} "
                "in this run")
    if key.endswith("pos_embed"):
        return f"{theirs[1]} position rows in the source vs {ours[1]} here (another image or patch size)"
    if not key.startswith("encoder."):
        return (f"the source's {key.split('.')[0]} has {key} of shape {theirs}, this run's {ours}: another head "
                "size; give the run the source's objective options "
                "(e.g. --recipe paper or --set objective.decoder_...)")
    return f"{key}: source {theirs} vs this run {ours}"


@torch.no_grad()
def _eps_effect(encoder: nn.Module, eps: float) -> float:
    """How far (max abs) the encoder's features of a fixed noise image move when its LayerNorms use ``eps``."""
    norms = [m for m in encoder.modules() if isinstance(m, nn.LayerNorm)]
    ours, was_training = [m.eps for m in norms], encoder.training
    size, p = encoder.img_size, next(encoder.parameters())
    x = torch.randn(1, encoder.in_chans, size, size, generator=torch.Generator().manual_seed(0)).to(p.device, p.dtype)
    encoder.eval()
    try:
        here = encoder.forward_features(x)
        for m in norms:
            m.eps = eps
        return (encoder.forward_features(x) - here).abs().max().item()
    finally:
        for m, e in zip(norms, ours):
            m.eps = e
        encoder.train(was_training)


def _setting_notes(objective: nn.Module, config: dict | None) -> list[str]:
    """An HF source's settings this run does not take from it, with both values. ``norm_pix_loss`` is an
    objective option: the run's config decides what is trained. ``layer_norm_eps`` is fixed by mimaim's
    models (ViT: 1e-6, as MAE's and BEiT's code); the note gives how far it moves the features."""
    notes = []
    theirs, ours = (config or {}).get("norm_pix_loss"), getattr(objective.options, "norm_pix_loss", None)
    if theirs is not None and ours is not None and bool(theirs) != ours:
        notes.append(f"norm_pix_loss={bool(theirs)} in the source, {ours} in this run (the run's setting is "
                     f"trained); to train the source's: --set objective.norm_pix_loss={str(bool(theirs)).lower()}")
    eps = (config or {}).get("layer_norm_eps")
    ours_eps = sorted({m.eps for m in objective.encoder.modules() if isinstance(m, nn.LayerNorm)})
    if eps is not None and ours_eps and ours_eps != [eps]:
        notes.append(f"layer_norm_eps={eps:g} in the source, {'/'.join(f'{e:g}' for e in ours_eps)} in this run "
                     f"(fixed by mimaim's {type(objective.encoder).__name__}): encoder features of a noise image "
                     f"differ by up to {_eps_effect(objective.encoder, eps):.1e}")
    return notes


@torch.no_grad()
def _fixed_tables(objective: nn.Module, take: dict[str, torch.Tensor]) -> list[str]:
    """A frozen position table is the fixed sin-cos one: a source's other table (e.g. the zeros of a transformers
    5.x ``ViTMAEForPreTraining`` built from a config) is left out of ``take``, the run's re-derived, with a note."""
    notes, grid = [], objective.encoder.grid_size
    for name, param in objective.named_parameters():
        if name in take and name.endswith("pos_embed") and not param.requires_grad:
            table = sincos_2d(param.shape[-1], grid, param.shape[1] - grid[0] * grid[1])[None].to(param.dtype)
            gap = (take[name].float() - table.float()).abs().max().item()
            if gap > 1e-3:
                param.copy_(table)
                what = "is zeros" if not take.pop(name).any() else f"differs from the fixed sin-cos table by {gap:.2g}"
                notes.append(f"the source's position table {name} {what}: kept the run's sin-cos table")
    return notes


def initialize_from(objective: nn.Module, source: str | Path) -> InitReport:
    """Load what ``source`` holds of ``objective`` (in place); see the module docstring."""
    kind, weights, record, config = read_source(source)
    expected = objective.state_dict()
    if record is not None and record.get("objective") != objective.name:
        raise ValueError(f"--init {source}: that run was trained with objective {record.get('objective')!r} "
                         f"({record['backbone']['name']}), this run is {objective.name!r}; start from a "
                         f"{objective.name} run, or export its encoder (`mimaim export --to timm`) and pass that")
    _swin_patch_norm_fix(weights, expected)
    wrong = [(k, tuple(weights[k].shape), tuple(expected[k].shape)) for k in weights
             if k in expected and weights[k].shape != expected[k].shape]
    if wrong:
        k, theirs, ours = next((w for w in wrong if w[0].endswith("patch_embed.proj.weight")), wrong[0])
        raise ValueError(f"--init {source} ({kind}) does not fit {_describe(objective)}: "
                         f"{_shape_hint(k, theirs, ours)} ({len(wrong)} tensors of another shape, e.g. {k})")
    enc_missing = sorted(k for k in expected if k.startswith("encoder.") and k not in weights)
    enc_extra = sorted(k for k in weights if k.startswith("encoder.") and k not in expected
                       and not k.endswith(("relative_position_index", "k_bias", "attn_mask"))
                       and not k.startswith(("encoder.head.", "encoder.fc_norm.")))
    if enc_missing or enc_extra:
        detail = []
        if enc_missing:
            detail.append(f"the source lacks {len(enc_missing)} encoder tensors (e.g. {', '.join(enc_missing[:3])})")
        if enc_extra:
            detail.append(f"it has {len(enc_extra)} this encoder has no place for (e.g. {', '.join(enc_extra[:3])})")
        raise ValueError(f"--init {source} ({kind}) does not fit {_describe(objective)}: " + "; ".join(detail) +
                         ". It is probably another depth or ViT flavour (biases, layer scale, cls token, "
                         "relative position bias); build the run with the source's --model and --objective")
    take = {k: v.to(expected[k].dtype) for k, v in weights.items() if k in expected}
    tables = _fixed_tables(objective, take)
    objective.load_state_dict(take, strict=False)
    return InitReport(source=str(source), kind=kind, loaded=sorted(take),
                      initialised=sorted(k for k in expected if k not in take),
                      skipped=sorted(k for k in weights if k not in expected),
                      notes=tables + _setting_notes(objective, config))


def initializer(source: str | None):
    """What the trainer calls on a new run's objective for ``--init SOURCE`` (None without one): it loads
    the weights and returns the report the run prints."""
    return (lambda objective: initialize_from(objective, source).summary()) if source else None
