"""Reader throughput against decoding the same JPEGs alone, and the synthetic generator's rate.

    python benchmarks/bench_data.py [--classes 1000] [--per-class 6] [--size 256] [--only class]

Writes synthetic shards to a temporary folder, then prints, all measured in this one run:
    generator_img_s=...
    tar_us_per_image webdataset=... ours=...
    decode_img_s=... decode_aug_img_s=... ceiling=...
    workers=1 reader_img_s=... decode_img_s=... ratio=... per_worker=... vs_decode_aug_per_worker=...
    workers=2 ...
    class_sampling workers=1 random_img_s=... grouped_img_s=... ratio=...
    class_sampling workers=2 ...
    grouping pool=10000 classes=1000000 dim=128 P=64 ms_per_batch=... (rows_ms=... picks_ms=...)
tar: reading every record of the shards, webdataset's tarfile_samples against dist_dml's tar
parser. decode: the JPEG bytes decoded in one plain loop, one process; decode_aug: the same loop
also doing the training augmentation (random resized crop to 224 + flip, into a batch slot);
ceiling = decode_aug / decode, the most a reader that decodes and augments on the CPU could reach.
reader: the training stream (shard reading, shuffle buffer, K-of-record picks, decode, augmentation,
P x K uint8 batches handed over from DataLoader workers; normalisation runs on the device).
ratio = reader / decode; per_worker = ratio / workers; vs_decode_aug_per_worker = reader /
decode_aug / workers (the stream's own overhead). Reader figures are steady state: from each epoch's first batch
to its last, after a first epoch; every rate is the best of --repeats passes.
class_sampling: the same reader with class_sampling.share=0.5 (groups of 4 near classes chosen from each
worker's pool by a fixed table of prototypes) against random batches, passes alternated; ratio = grouped / random.
grouping: what choosing one batch costs a worker at a 10,000-record pool drawn from 10^6 classes: gathering the
pool's prototype rows from an fp16 snapshot table (256 MB) and the picks (grouping.neighbour_picks), the median.
"""
from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch


def best_rate(repeats: int, loop) -> float:
    """``loop`` returns (count, seconds) or count (then timed here); the best of ``repeats`` passes."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        count = loop()
        count, seconds = count if isinstance(count, tuple) else (count, time.perf_counter() - start)
        rates.append(count / seconds)
    return max(rates)


def steady_epoch(stream, snapshots=None) -> tuple[int, float]:
    """One epoch of a TrainStream's loader at steady state: the images from its first batch (the workers have
    started) to its last, and the seconds between."""
    stream.position.set_epoch(stream.position.epoch + 1)
    seen, start = 0, None
    for batch in stream.loader(snapshots=snapshots):
        if start is None:
            start = time.perf_counter()
        else:
            seen += batch["images"].shape[0]
    return seen, time.perf_counter() - start


def reader_rates(out: Path, size: int, args, decode_rate: float, decode_aug_rate: float) -> None:
    """The training reader's rate with 1 and 2 workers, against one plain decode loop."""
    from dist_dml.data import DataConfig, TrainStream

    for workers in (1, 2):
        cfg = DataConfig(root=str(out), classes_per_batch=16, images_per_class=4, workers=workers,
                         image_size=size, resize=args.size, shuffle_buffer=200)
        stream = TrainStream(cfg)
        steady_epoch(stream)  # the first epoch pays the workers' start-up
        rate = best_rate(args.repeats, lambda: steady_epoch(stream))
        ratio = rate / decode_rate
        print(f"workers={workers} reader_img_s={rate:.0f} decode_img_s={decode_rate:.0f} ratio={ratio:.2f} "
              f"per_worker={ratio / workers:.2f} vs_decode_aug_per_worker={rate / decode_aug_rate / workers:.2f}",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--per-class", type=int, default=6)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="each rate is the best of this many passes")
    parser.add_argument("--only", choices=["class"], help="class: the class_sampling and grouping lines only")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from data_prep.cli import main as prep
    from webdataset.tariterators import tarfile_samples

    from dist_dml.data import DataConfig, decode, new_batch, tar_members, train_image
    from dist_dml.data.tar import _samples

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "shards"
        start = time.perf_counter()
        prep(["synthetic", "--classes", str(args.classes), "--test-classes", "0", "--per-class", str(args.per_class),
              "--size", str(args.size), "--shard-mb", "2", "--out", str(out), "--no-progress"])
        images = args.classes * args.per_class
        print(f"generator_img_s={images / (time.perf_counter() - start):.0f}", flush=True)

        size = min(224, args.size - args.size // 8)
        if args.only == "class":
            class_sampling_rates(out, size, args)
            grouping_cost()
            return
        shards = [str(p) for p in sorted(out.glob("train-*.tar"))]
        start = time.perf_counter()
        records = list(tarfile_samples([{"url": shard} for shard in shards]))
        webdataset_s = time.perf_counter() - start
        start = time.perf_counter()
        jpegs = [data for shard in shards for _, sample in _samples(tar_members(shard, lambda name: True))
                 for key, data in sample.items() if key.endswith(".jpg")]
        ours_s = time.perf_counter() - start
        assert len(records) == args.classes
        print(f"tar_us_per_image webdataset={webdataset_s / len(jpegs) * 1e6:.1f} ours={ours_s / len(jpegs) * 1e6:.1f}",
              flush=True)

        cfg = DataConfig(image_size=size, resize=args.size)
        slots, rng = new_batch(64, size), random.Random(0)

        decode(jpegs[0])  # first call loads the codec
        decode_rate = best_rate(args.repeats, lambda: sum(1 for data in jpegs if decode(data) is not None))
        decode_aug_rate = best_rate(args.repeats, lambda: sum(1 for i, data in enumerate(jpegs)
                                                if train_image(data, cfg, rng, slots[i % 64]) is not None))
        print(f"decode_img_s={decode_rate:.0f} decode_aug_img_s={decode_aug_rate:.0f} "
              f"ceiling={decode_aug_rate / decode_rate:.2f} (one plain loop each)", flush=True)

        reader_rates(out, size, args, decode_rate, decode_aug_rate)
        class_sampling_rates(out, size, args)
    grouping_cost()

def class_sampling_rates(out: Path, size: int, args) -> None:
    """The reader's rate with class_sampling.share=0.5 against random batches, 1 and 2 workers, alternated."""
    from dist_dml.data import DataConfig, TrainStream
    from dist_dml.data.grouping import ClassSamplingConfig
    from dist_dml.data.snapshots import FixedSnapshots

    for workers in (1, 2):
        cfg = DataConfig(root=str(out), classes_per_batch=16, images_per_class=4, workers=workers,
                         image_size=size, resize=args.size, shuffle_buffer=200)
        streams = {"random": (TrainStream(cfg), None),
                   "grouped": (TrainStream(cfg, class_sampling=ClassSamplingConfig(share=0.5)), None)}
        table = torch.nn.functional.normalize(torch.randn(streams["grouped"][0].num_classes, 128), dim=1).half()
        streams["grouped"] = (streams["grouped"][0], FixedSnapshots(table))
        rates: dict[str, list[float]] = {"random": [], "grouped": []}
        for i in range(args.repeats + 1):
            for name, (stream, snapshots) in streams.items():
                seen, seconds = steady_epoch(stream, snapshots)
                if i:  # the first round pays the workers' start-up
                    rates[name].append(seen / seconds)
        best = {name: max(r) for name, r in rates.items()}
        print(f"class_sampling workers={workers} random_img_s={best['random']:.0f} grouped_img_s={best['grouped']:.0f} "
              f"ratio={best['grouped'] / best['random']:.2f}", flush=True)


def grouping_cost(pool: int = 10_000, classes: int = 1_000_000, dim: int = 128, per_batch: int = 64) -> None:
    """A worker's cost to choose one batch at a ``pool``-record pool of a ``classes``-class catalogue."""
    import numpy as np

    from dist_dml.data.grouping import ClassSamplingConfig, neighbour_picks
    from dist_dml.data.snapshots import SnapshotRing

    torch.set_num_threads(1)  # as a DataLoader worker runs
    ring = SnapshotRing(classes, dim, "fp16", every=50, lag=1, slots=1)
    ring.publish(0, torch.nn.functional.normalize(torch.randn(classes, dim), dim=1))
    gen, cs = np.random.default_rng(0), ClassSamplingConfig(share=0.5)
    rows_ms, picks_ms = [], []
    for i in range(20):
        labels = gen.integers(0, classes, pool)
        start = time.perf_counter()
        vectors = ring.rows(0, labels)
        mid = time.perf_counter()
        neighbour_picks(labels, vectors, per_batch, cs.near(per_batch), cs.group, random.Random(i))
        rows_ms.append(1e3 * (mid - start))
        picks_ms.append(1e3 * (time.perf_counter() - mid))
    import statistics

    rows, picks = statistics.median(rows_ms), statistics.median(picks_ms)
    print(f"grouping pool={pool} classes={classes} dim={dim} P={per_batch} ms_per_batch={rows + picks:.1f} "
          f"(rows_ms={rows:.1f} picks_ms={picks:.1f})", flush=True)


if __name__ == "__main__":
    main()
