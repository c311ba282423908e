"""`mimaim shards SOURCE OUT`: write WebDataset shards (and their index) from an image folder."""

from __future__ import annotations

import argparse

from ..options import DefaultsHelpFormatter


def add_parser(sub) -> None:
    p = sub.add_parser(
        "shards", help="write WebDataset tar shards from an image folder, for data larger than memory",
        description="Write SOURCE as WebDataset shards OUT/<prefix>-000000.tar, ... and OUT/index.json (each "
                    "shard's sample count and labels). Images are copied byte for byte in an order shuffled once "
                    "from --seed; a class sub-folder becomes the sample's `cls` label (for probes). Train from "
                    "them with `mimaim pretrain --data wds:OUT` or `--data wds:OUT/train-{000000..000127}.tar`.",
        formatter_class=DefaultsHelpFormatter)
    p.add_argument("source", help="imagefolder:PATH (or digits)")
    p.add_argument("out", help="output folder (new, or without an index.json)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--prefix", default="train", help="shard file name prefix")
    p.add_argument("--seed", type=int, default=0, help="seed of the write order")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=cmd_shards)


def cmd_shards(args) -> int:
    from .shards import write_shards
    from .sources import DataError, build_source, parse_data_spec

    if parse_data_spec(args.source)[0] == "wds":
        raise DataError(f"{args.source!r} already is a shard set; pass imagefolder:PATH")
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
