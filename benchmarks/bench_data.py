"""Reader throughput against decoding the same JPEGs alone, and the synthetic generator's rate.

    python benchmarks/bench_data.py [--classes 600] [--per-class 6] [--size 96]

Writes synthetic shards to a temporary folder, then prints
    generator_img_s=...
    workers=1 reader_img_s=... decode_img_s=... ratio=...
    workers=2 reader_img_s=... decode_img_s=... ratio=... per_worker=...
reader: the training stream (shard reading, shuffle buffer, K-of-record picks, decode, random resized
crop + flip, P x K uint8 batches; normalisation runs on the device); decode: the same JPEG bytes
decoded in one plain loop, one process. ratio = reader / decode; per_worker = ratio / workers;
noaug_per_worker: the same reader with the augmentation replaced by the identity (the stream's own
overhead); vs_decode_crop_per_worker: the reader against a plain loop doing the same decode and
crop. Each reader figure is its second epoch, after the workers have started.
"""
from __future__ import annotations

import argparse
import tarfile
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--per-class", type=int, default=6)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from data_prep.cli import main as prep
    from dist_dml.data import DataConfig, TrainStream, decode, train_transform

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "shards"
        start = time.perf_counter()
        prep(["synthetic", "--classes", str(args.classes), "--test-classes", "0", "--per-class", str(args.per_class),
              "--size", str(args.size), "--shard-mb", "2", "--out", str(out), "--no-progress"])
        images = args.classes * args.per_class
        print(f"generator_img_s={images / (time.perf_counter() - start):.0f}", flush=True)

        jpegs = []
        for shard in sorted(out.glob("train-*.tar")):
            with tarfile.open(shard) as tar:
                jpegs += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
        decode(jpegs[0])  # first call loads the codec
        start = time.perf_counter()
        for data in jpegs:
            decode(data)
        decode_rate = len(jpegs) / (time.perf_counter() - start)
        crop = train_transform(DataConfig(image_size=min(224, args.size - args.size // 8), resize=args.size))
        start = time.perf_counter()
        for data in jpegs:
            crop(decode(data))
        decode_crop_rate = len(jpegs) / (time.perf_counter() - start)
        print(f"decode_img_s={decode_rate:.0f} decode_crop_img_s={decode_crop_rate:.0f} (one plain loop each)", flush=True)

        for workers in (1, 2):
            cfg = DataConfig(root=str(out), classes_per_batch=16, images_per_class=4, workers=workers,
                             image_size=min(224, args.size - args.size // 8), resize=args.size, shuffle_buffer=200)
            rates = {}
            for name, transform in (("reader", None), ("reader_noaug", lambda image: image)):
                stream = TrainStream(cfg, transform=transform)
                for epoch in range(2):  # the first epoch pays the workers' start-up
                    stream.set_epoch(epoch)
                    start, seen = time.perf_counter(), 0
                    for batch in stream.loader():
                        seen += batch["images"].shape[0]
                rates[name] = seen / (time.perf_counter() - start)
            ratio = rates["reader"] / decode_rate
            print(f"workers={workers} reader_img_s={rates['reader']:.0f} decode_img_s={decode_rate:.0f} "
                  f"ratio={ratio:.2f} per_worker={ratio / workers:.2f} "
                  f"noaug_per_worker={rates['reader_noaug'] / decode_rate / workers:.2f} "
                  f"vs_decode_crop_per_worker={rates['reader'] / decode_crop_rate / workers:.2f}", flush=True)


if __name__ == "__main__":
    main()
