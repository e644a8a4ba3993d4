"""Reader throughput against decoding the same JPEGs alone, and the synthetic generator's rate.

    python benchmarks/bench_data.py [--classes 1000] [--per-class 6] [--size 256]

Writes synthetic shards to a temporary folder, then prints, all measured in this one run:
    generator_img_s=...
    tar_us_per_image webdataset=... ours=...
    decode_img_s=... decode_aug_img_s=... ceiling=...
    workers=1 reader_img_s=... decode_img_s=... ratio=... per_worker=... vs_decode_aug_per_worker=...
    workers=2 ...
tar: reading every record of the shards, webdataset's tarfile_samples against dist_dml's tar
parser. decode: the JPEG bytes decoded in one plain loop, one process; decode_aug: the same loop
also doing the training augmentation (random resized crop to 224 + flip, into a batch slot);
ceiling = decode_aug / decode, the most a reader that decodes and augments on the CPU could reach.
reader: the training stream (shard reading, shuffle buffer, K-of-record picks, decode, augmentation,
P x K uint8 batches handed over from DataLoader workers; normalisation runs on the device).
ratio = reader / decode; per_worker = ratio / workers; vs_decode_aug_per_worker = reader /
decode_aug / workers (the stream's own overhead). Reader figures are steady state: from each epoch's first batch
to its last, after a first epoch; every rate is the best of --repeats passes.
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


def reader_rates(out: Path, size: int, args, decode_rate: float, decode_aug_rate: float) -> None:
    """The training reader's rate with 1 and 2 workers, against one plain decode loop."""
    from dist_dml.data import DataConfig, TrainStream

    for workers in (1, 2):
        cfg = DataConfig(root=str(out), classes_per_batch=16, images_per_class=4, workers=workers,
                         image_size=size, resize=args.size, shuffle_buffer=200)
        stream = TrainStream(cfg)

        def epoch() -> tuple[int, float]:
            """Steady state: from the first batch (the workers have started) to the last."""
            stream.position.set_epoch(stream.position.epoch + 1)
            seen, start = 0, None
            for batch in stream.loader():
                if start is None:
                    start = time.perf_counter()
                else:
                    seen += batch["images"].shape[0]
            return seen, time.perf_counter() - start

        epoch()  # the first epoch pays the workers' start-up
        rate = best_rate(args.repeats, epoch)
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
    args = parser.parse_args()
    torch.set_num_threads(1)

    from data_prep.cli import main as prep
    from webdataset.tariterators import tarfile_samples

    from dist_dml.data import DataConfig, _samples, decode, new_batch, tar_members, train_image

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "shards"
        start = time.perf_counter()
        prep(["synthetic", "--classes", str(args.classes), "--test-classes", "0", "--per-class", str(args.per_class),
              "--size", str(args.size), "--shard-mb", "2", "--out", str(out), "--no-progress"])
        images = args.classes * args.per_class
        print(f"generator_img_s={images / (time.perf_counter() - start):.0f}", flush=True)

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

        size = min(224, args.size - args.size // 8)
        cfg = DataConfig(image_size=size, resize=args.size)
        slots, rng = new_batch(64, size), random.Random(0)

        decode(jpegs[0])  # first call loads the codec
        decode_rate = best_rate(args.repeats, lambda: sum(1 for data in jpegs if decode(data) is not None))
        decode_aug_rate = best_rate(args.repeats, lambda: sum(1 for i, data in enumerate(jpegs)
                                                if train_image(data, cfg, rng, slots[i % 64]) is not None))
        print(f"decode_img_s={decode_rate:.0f} decode_aug_img_s={decode_aug_rate:.0f} "
              f"ceiling={decode_aug_rate / decode_rate:.2f} (one plain loop each)", flush=True)

        reader_rates(out, size, args, decode_rate, decode_aug_rate)

if __name__ == "__main__":
    main()
