"""``mimaim shards``, ``mimaim tokenizer train`` and ``mimaim list``."""

from __future__ import annotations

import json
import sys

from ..config import DATA_HELP
from .options import DefaultsHelpFormatter


def add_parser(sub) -> None:
    p = sub.add_parser(
        "shards", help="write WebDataset tar shards from an image folder, or index existing ones",
        usage="mimaim shards [-h] [options] SOURCE OUT\n       mimaim shards index SHARDS",
        description="Write SOURCE as WebDataset shards OUT/<prefix>-000000.tar, ... and OUT/index.json (each "
                    "shard's sample count and labels). Images are copied byte for byte in an order shuffled once "
                    "from --seed; a class sub-folder becomes the sample's `cls` label (for probes). Train from "
                    "them with `mimaim pretrain --data wds:OUT` or `--data wds:OUT/train-{000000..000127}.tar`. "
                    "`mimaim shards index SHARDS` scans tars written by another tool (webdataset's ShardWriter: "
                    "an image as jpg/png/webp/..., an integer `cls` if labelled) and writes the index.json beside "
                    "them; `--data wds:` does the same on first read when the index is missing.",
        formatter_class=DefaultsHelpFormatter)
    p.add_argument("source", help="imagefolder:PATH (or digits); or `index` to index existing shards")
    p.add_argument("out", help="output folder (new, or without an index.json); after `index`: the shards, a folder "
                               "or 'DIR/train-{000000..000009}.tar'")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--prefix", default="train", help="shard file name prefix")
    p.add_argument("--seed", type=int, default=0, help="seed of the write order")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=cmd_shards)

    p = sub.add_parser("tokenizer", help="train a visual tokenizer for BEiT (`mimaim tokenizer train`)")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    t = tsub.add_parser(
        "train", help="train a Gumbel-softmax discrete VAE on your images",
        description="Train a discrete VAE (DALL-E's kind, small) whose argmax ids become BEiT's targets. Writes "
                    "OUT/tokenizer.safetensors, OUT/config.json (with reconstruction error and codebook usage) "
                    "and OUT/reconstruction.png. Use it with `mimaim pretrain --objective beit --tokenizer OUT`. "
                    "Its input is the model's patch grid x --downsample pixels: for 32-px images and 4-px patches "
                    "(an 8x8 grid) train at --img-size 32 with --downsample 4.",
        formatter_class=DefaultsHelpFormatter)
    t.add_argument("--data", default="digits", help=DATA_HELP)
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--img-size", type=int, default=32, help="training resolution in pixels")
    t.add_argument("--vocab-size", type=int, default=512, help="number of token ids")
    t.add_argument("--downsample", type=int, default=4, choices=[2, 4, 8], help="pixels per token side")
    t.add_argument("--hidden", type=int, default=32, help="conv width")
    t.add_argument("--codebook-dim", type=int, default=32, help="width of each codebook vector")
    t.add_argument("--steps", type=int, default=300, help="optimiser steps")
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=1e-3, help="Adam peak learning rate (cosine to 0)")
    t.add_argument("--kl-weight", type=float, default=0.05, help="weight of KL(q || uniform)")
    t.add_argument("--max-images", type=int, default=0, help="use at most this many images (0: all)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=cmd_tokenizer_train)
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])

    sub.add_parser("list", help="list objectives with their options, and models").set_defaults(func=cmd_list)


def cmd_shards(args) -> int:
    from ..data import DataError, build_source, parse_data_spec
    from ..data.shards import index_shard_set, write_shards

    if args.source == "index":
        print(f"indexed {index_shard_set(args.out, args.progress)[1]}")
        print(f"train with: mimaim pretrain --data 'wds:{args.out}'")
        return 0
    if parse_data_spec(args.source)[0] == "wds":
        raise DataError(f"{args.source!r} already is a shard set; pass imagefolder:PATH, or index it with "
                        f"`mimaim shards index {args.source[4:]}`")
    source = build_source(args.source, cache="off", progress=args.progress)
    index = write_shards(source, args.out, args.shard_size, args.prefix, args.seed, args.progress)
    shards = index["shards"]
    first, last = shards[0]["name"], shards[-1]["name"]
    digits = len(first) - len(args.prefix) - len("-.tar")
    pattern = f"{args.out}/{args.prefix}-{{{0:0{digits}d}..{len(shards) - 1:0{digits}d}}}.tar"
    print(f"wrote {index['num_samples']} images ({len(index['classes'])} classes) into {len(shards)} shard(s) "
          f"{first} .. {last} and index.json in {args.out}")
    print(f"train with: mimaim pretrain --data 'wds:{pattern}'")
    return 0


def cmd_tokenizer_train(args) -> int:
    import torch

    from ..data import IMAGENET_MEAN, IMAGENET_STD
    from ..eval.pictures import save_image_grid
    from ..tokenizers.dvae import DVAEConfig, evaluate_dvae, load_training_images, save_dvae, train_dvae

    if args.img_size % args.downsample:
        raise ValueError(f"--img-size {args.img_size} is not divisible by --downsample {args.downsample}; "
                         "pick sizes that divide")
    cfg = DVAEConfig(vocab_size=args.vocab_size, downsample=args.downsample, hidden=args.hidden,
                     codebook_dim=args.codebook_dim).validate()
    progress = not args.no_progress
    images = load_training_images(args.data, args.img_size, args.max_images, progress)
    held = images[torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(1))[:1024]]
    model, info = train_dvae(images, cfg, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                             kl_weight=args.kl_weight, seed=args.seed, device=args.device, progress=progress)
    metrics = evaluate_dvae(model, held, device=args.device)
    info.update(data=args.data, eval_images=int(held.shape[0]), **{k: round(v, 5) if isinstance(v, float) else v
                                                                    for k, v in metrics.items()})
    out = save_dvae(model.cpu(), args.out, info)
    with torch.no_grad():
        x = held[:8].float() / 255.0
        recon = model.decode_ids(model.logits(x).argmax(1))
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    save_image_grid({"image": (x - mean) / std, "tokens decoded": (recon - mean) / std}, out / "reconstruction.png",
                    title=f"dVAE {cfg.vocab_size} ids, /{cfg.downsample}")
    print(json.dumps({k: info[k] for k in ("recon_mse", "recon_mae", "codes_used", "share_used", "perplexity",
                                            "train_seconds")}), file=sys.stderr)
    print(f"tokenizer: {info['codes_used']} of {cfg.vocab_size} codes used ({info['share_used']:.1%}), perplexity "
          f"{info['perplexity']:.1f}; reconstruction MSE {info['recon_mse']:.4f}, MAE {info['recon_mae']:.4f} "
          f"on [0, 1] pixels of {info['eval_images']} images; {info['train_seconds']:.0f}s")
    if info["share_used"] < 0.1:
        print(f"warning: only {info['share_used']:.1%} of the codebook is used (a dead codebook); try a higher "
              "--kl-weight, more --steps or a smaller --vocab-size", file=sys.stderr)
    print(f"wrote {out} (use it with `mimaim pretrain --objective beit --tokenizer {out}`)")
    return 0


def cmd_list(args) -> int:
    from ..models import list_models
    from ..objectives.base import describe_objectives

    print(describe_objectives())
    print("set an option with --set objective.KEY=VALUE (e.g. --set objective.mask_ratio=0.6)")
    print("models: " + ", ".join(list_models()))
    return 0
