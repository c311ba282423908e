"""``mimaim export RUN_DIR --to timm|hf --out DIR``: a run's encoder for other libraries."""

from __future__ import annotations

import argparse
import sys

from ..options import DefaultsHelpFormatter


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="write a run's encoder as a timm or HuggingFace transformers folder",
        description="--to timm: config.json + model.safetensors in timm's hub format; load it with "
                    "timm.create_model('local-dir:DIR', pretrained=True) (num_classes 0: the model returns the "
                    "objective's probe features), publish it with timm.models.push_to_hf_hub. "
                    "--to hf: a transformers folder (MAE: ViTMAEForPreTraining, BEiT: BeitForMaskedImageModeling, "
                    "SimMIM: ViT/SwinForMaskedImageModeling, or BeitModel for its BEiT-style ViT); load it with "
                    "from_pretrained(DIR).",
        formatter_class=DefaultsHelpFormatter)
    p.add_argument("run_dir", help="a `mimaim pretrain` run directory or one of its checkpoints/step-N folders")
    p.add_argument("--to", choices=["timm", "hf"], default="timm", help="target library")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--checkpoint", default=None, help="checkpoint name or path (default: the newest)")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    if args.to == "timm":
        from .timm_export import export_timm

        out = export_timm(args.run_dir, args.out, args.checkpoint)
        print(f"wrote {out}: load it with timm.create_model('local-dir:{out}', pretrained=True)")
    else:
        from .hf_export import export_hf

        out = export_hf(args.run_dir, args.out, args.checkpoint)
        print(f"wrote {out}: load it with transformers' from_pretrained('{out}')")
    print(f"files: {', '.join(sorted(f.name for f in out.iterdir()))}", file=sys.stderr)
    return 0
