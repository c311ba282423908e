"""``mimaim probe``, ``reconstruct``, ``finetune`` and ``export``: a trained run, read through its checkpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..eval.recipes import FinetuneConfig
from .options import DefaultsHelpFormatter, add_fields, given


def add_parser(sub) -> None:
    p = sub.add_parser("probe", help="linear and k-NN probes of a run's frozen encoder vs random init",
                       description="Freeze the encoder of RUN_DIR, extract features once (cached in "
                                   "RUN_DIR/features), and report top-1 accuracy on the held-out split for each "
                                   "probe, beside the same architecture at random initialisation.",
                       formatter_class=DefaultsHelpFormatter)
    p.add_argument("run_dir", help="a `mimaim pretrain` run directory")
    p.add_argument("--data", help="labelled data to probe on (default: the run's own data)")
    p.add_argument("--probes", default="linear,attentive,knn", help="comma-separated probes")
    p.add_argument("--layers", help="comma-separated block indices to average (e.g. -6,-5,-4,-3,-2,-1; stages for "
                                    "a Swin); default: the objective's declared protocol (printed above the table)")
    p.add_argument("--pool", default="auto", choices=["auto", "cls", "mean"],
                   help="auto: the objective's declared protocol (printed above the table); cls: the cls token; "
                        "mean: the mean of patch tokens")
    p.add_argument("--norm", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                   help="apply the final LayerNorm to the blocks read (default: the objective's protocol)")
    p.add_argument("--no-random-init", action="store_true", help="skip the random-initialisation row")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("reconstruct", help="draw the objective's reconstruction picture for a run",
                       description="Write a PNG grid: for MAE the original, the masked input, the reconstruction, "
                                   "and the reconstruction with the visible patches pasted back.",
                       formatter_class=DefaultsHelpFormatter)
    p.add_argument("run_dir", help="a `mimaim pretrain` run directory")
    p.add_argument("--images", nargs="+", help="image files (default: held-out images of the run's data)")
    p.add_argument("--out", help="PNG path (default RUN_DIR/reconstruction-<checkpoint>.png)")
    p.add_argument("--seed", type=int, default=0, help="seed of the mask drawn for the picture")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser(
        "finetune", help="fine-tune a run's encoder end to end (MAE/BEiT recipe) and report held-out top-1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune the pre-trained encoder of RUN_DIR end to end as MAE's main_finetune.py: layer-wise "
                    "lr decay (timm groups), drop path, trainable position table, AdamW (0.9, 0.999), cosine "
                    "schedule with warm-up; mean-pooled patch tokens -> fc_norm -> head. --recipe quick (default) "
                    "is sized for small data (BatchNorm before the head, blr 1e-2, 10 epochs, no mixup/cutmix/"
                    "RandAugment); --recipe paper is MAE's ImageNet recipe. Reports top-1 on the held-out split "
                    "(the last --val-fraction of each class, as `mimaim probe`) and writes "
                    "RUN_DIR/finetune[-<size>px][-random].json.",
        epilog="examples:\n  mimaim finetune runs/mae-cifar --data imagefolder:/tmp/cifar/train --epochs 20\n"
               "  mimaim finetune runs/mae-cifar --epochs 20 --img-size 48     # position tables resized\n"
               "  mimaim finetune runs/mae-cifar --epochs 20 --init random     # the from-scratch baseline")
    p.add_argument("run_dir", help="a `mimaim pretrain` run directory")
    p.set_defaults(func=cmd_finetune, fields=add_fields(p, FinetuneConfig))

    p = sub.add_parser(
        "export", help="write a run's encoder as a timm or HuggingFace transformers folder",
        description="--to timm: config.json + model.safetensors in timm's hub format; load it with "
                    "timm.create_model('local-dir:DIR', pretrained=True) (num_classes 0: the model returns the "
                    "objective's probe features), publish it with timm.models.push_to_hf_hub. "
                    "--to hf: a transformers folder (MAE: ViTMAEForPreTraining, BEiT: BeitForMaskedImageModeling "
                    "weights, SimMIM: ViT/SwinForMaskedImageModeling, or BeitModel for its BEiT-style ViT, I-JEPA: "
                    "IJepaModel, the target encoder) with a "
                    "preprocessor_config.json; AutoModel.from_pretrained(DIR) and pipeline('image-feature-"
                    "extraction', model=DIR) give the encoder's features (MAE: pass mask_ratio=0.0; BEiT's MIM "
                    "head: BeitForMaskedImageModeling.from_pretrained(DIR, use_mean_pooling=True)). Both exports "
                    "preprocess as mimaim's probes (shorter side to size/0.875, bicubic, centre crop).",
        formatter_class=DefaultsHelpFormatter)
    p.add_argument("run_dir", help="a `mimaim pretrain` run directory or one of its checkpoints/step-N folders")
    p.add_argument("--to", choices=["timm", "hf"], default="timm", help="target library")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--checkpoint", default=None, help="checkpoint name or path (default: the newest)")
    p.set_defaults(func=cmd_export)


def cmd_probe(args) -> int:
    from ..eval.probe_run import format_table, probe_run

    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    rows = probe_run(args.run_dir, data=args.data, probes=args.probes.split(","), layers=layers, pool=args.pool,
                     norm=getattr(args, "norm", None), random_init=not args.no_random_init, device=args.device,
                     progress=not args.no_progress)
    r = rows[0]
    print(f"\nprobes on {r['data']}: {r['train_images']} train / {r['val_images']} held-out images "
          f"(checkpoint {r['checkpoint']}; trunk run bidirectionally, no masking)")
    print(format_table(rows))
    return 0


def cmd_reconstruct(args) -> int:
    from ..engine.runs import load_run
    from ..eval.pictures import load_images, reconstruction_figure

    cfg, objective, ckpt = load_run(args.run_dir, device=args.device)
    images = load_images(args.images, cfg.img_size) if args.images else None
    out = args.out or str(Path(args.run_dir) / f"reconstruction-{ckpt.name}.png")
    path = reconstruction_figure(objective, cfg, out, images=images, device=args.device, seed=args.seed)
    print(f"wrote {path}")
    return 0


def cmd_finetune(args) -> int:
    from ..eval.finetune import finetune

    fcfg = FinetuneConfig(**given(args, args.fields))
    result = finetune(args.run_dir, fcfg)
    print(f"top-1 {result['top1']:.2f}% on {result['val_images']} held-out images of {result['data']} "
          f"({result['objective']} {result['model']}, {fcfg.init} weights, "
          f"{result['img_size']}px, {result['steps']} steps, {result['wall_time_s']:.1f}s)")
    return 0


def cmd_export(args) -> int:
    if args.to == "timm":
        from ..interop.timm_export import export_timm

        out = export_timm(args.run_dir, args.out, args.checkpoint)
        print(f"wrote {out}: load it with timm.create_model('local-dir:{out}', pretrained=True)")
    else:
        from ..interop.hf_export import export_hf

        out = export_hf(args.run_dir, args.out, args.checkpoint)
        print(f"wrote {out}: load it with transformers' AutoModel.from_pretrained('{out}') or "
              f"pipeline('image-feature-extraction', model='{out}')")
    print(f"files: {', '.join(sorted(f.name for f in out.iterdir()))}", file=sys.stderr)
    return 0
