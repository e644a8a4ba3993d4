"""`dist-dml prep SOURCE --src ... --out ...`: a dataset to class-grouped shards."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from data_prep.sources import SOURCES, SourceError
from data_prep.synthetic import synthetic_images
from data_prep.writer import TooManyFailures, WriterConfig, write_shards


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="dist-dml prep")
    parser.add_argument("source", choices=sorted(SOURCES) + ["synthetic"])
    parser.add_argument("--src", type=Path, help="the dataset's root folder (the CSV file for csv)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-per-record", type=int, default=64)
    parser.add_argument("--shard-mb", type=float, default=256.0, help="target shard size")
    parser.add_argument("--min-shards", type=int, default=1,
                        help="at least this many shards per split, e.g. ranks x workers of the training")
    parser.add_argument("--reencode", action="store_true", help="re-encode every image as JPEG")
    parser.add_argument("--max-side", type=int, help="with --reencode: longest side in pixels")
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--workers", type=int, default=0, help="0: one per core")
    parser.add_argument("--max-failed-share", type=float, default=0.01)
    parser.add_argument("--max-megapixels", type=float, default=64.0,
                        help="a source image declaring more pixels is not decoded, and reported (a decompression bomb)")
    parser.add_argument("--train-fraction", type=float, default=0.5, help="folder/csv without splits: share of classes that train")
    parser.add_argument("--val-fraction", type=float, default=0.0,
                        help="a seeded share of the training classes written as the split 'val' instead (disjoint "
                             "classes: what a training validates on, data.val_split=val)")
    parser.add_argument("--no-progress", action="store_true")
    syn = parser.add_argument_group("synthetic")
    syn.add_argument("--classes", type=int, default=1000, help="training products")
    syn.add_argument("--test-classes", type=int, help="held-out products (default: classes / 4)")
    syn.add_argument("--per-class", default="4", help="images per product: N or LOW:HIGH")
    syn.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="class order in the shards (and synthetic images)")
    return parser


def run(args: argparse.Namespace) -> int:
    import os

    config = WriterConfig(out=args.out, max_per_record=args.max_per_record, shard_bytes=int(args.shard_mb * 2**20),
                          reencode=args.reencode, max_side=args.max_side, quality=args.quality,
                          workers=args.workers or os.cpu_count() or 1, max_failed_share=args.max_failed_share,
                          progress=not args.no_progress, min_shards=args.min_shards, seed=args.seed,
                          max_megapixels=args.max_megapixels)
    start = time.time()
    try:
        if args.source == "synthetic":
            test_classes = args.test_classes if args.test_classes is not None else max(1, args.classes // 4)
            images = synthetic_images(args.classes, args.per_class, test_classes, args.size, args.seed, args.quality)
            train_splits = ("train",)
        else:
            if args.src is None:
                raise SourceError(f"{args.source}: --src is required")
            kwargs = {"train_fraction": args.train_fraction} if args.source in ("folder", "csv") else {}
            images, train_splits = SOURCES[args.source](args.src, **kwargs)
        if not 0 <= args.val_fraction < 1:
            raise SourceError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
        if args.val_fraction:
            images = held_out(list(images), train_splits, args.val_fraction, args.seed)
        manifest = write_shards(args.source, images, config, train_splits)
    except (SourceError, TooManyFailures, ValueError) as exc:
        print(f"dist-dml prep: error: {exc}", file=sys.stderr)
        return 2
    elapsed = time.time() - start
    total = sum(s["images"] for s in manifest["splits"].values())
    for name, split in manifest["splits"].items():
        print(f"[prep] {name}: {split['images']} images, {split['classes']} classes, {split['records']} records, "
              f"{len(split['shards'])} shards")
    print(f"[prep] wrote {total} images to {args.out} in {elapsed:.1f}s ({total / max(elapsed, 1e-9):.0f} images/s)")
    return 0


VAL = "val"


def held_out(images: list, train_splits, fraction: float, seed: int) -> list:
    """``images`` with a seeded ``fraction`` of the training classes (at least one, and one left to train) moved to
    the split VAL: disjoint classes, as the test split's are."""
    import dataclasses
    import random

    if any(image.split == VAL for image in images):
        raise SourceError(f"the source has a split '{VAL}' already: give no --val-fraction")
    classes = sorted({(image.split, image.class_name) for image in images if image.split in train_splits})
    count = min(max(1, round(fraction * len(classes))), len(classes) - 1)
    if count < 1:
        raise SourceError(f"--val-fraction {fraction}: the training split has {len(classes)} class(es), none to spare")
    chosen = set(random.Random(seed + 1).sample(classes, count))
    return [dataclasses.replace(image, split=VAL) if (image.split, image.class_name) in chosen else image
            for image in images]


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
