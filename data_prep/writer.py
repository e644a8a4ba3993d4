"""Write class-grouped shards and their manifest (the format is docs/SHARDS.md).

Images are loaded (and re-encoded when asked) by a pool of worker processes, in source order;
records and shards are written by this process, in a fixed order, so re-running gives identical
shards. A shard is written under a temporary name and renamed once complete; the manifest is
written last, so an output directory with a manifest is always whole.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import multiprocessing
import os
import random
import re
import tarfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from tqdm import tqdm

from data_prep.source import SourceImage
from dist_dml.data.format import FORMAT, MANIFEST, VERSION, image_member, shard_name
from dist_dml.infra.files import write_atomically

TOOL = "dist-dml data_prep 0.1.0"


@dataclass(frozen=True)
class WriterConfig:
    out: Path
    max_per_record: int = 64
    shard_bytes: int = 256 << 20
    reencode: bool = False  # re-encode every image as JPEG
    max_side: int | None = None  # with reencode: shrink so the longer side is at most this
    quality: int = 90
    workers: int = max(1, os.cpu_count() or 1)
    max_failed_share: float = 0.01  # fail the run when more source images than this are missing/unreadable
    progress: bool = True
    min_shards: int = 1  # at least this many shards per split (records spread evenly), however small
    max_megapixels: float = 64.0  # a source image declaring more pixels is not decoded (a decompression bomb)
    seed: int = 0  # the order classes are written in: shuffled, so that every shard samples the catalogue

    def validate(self) -> None:
        if self.max_per_record < 2:
            raise ValueError(f"max_per_record must be at least 2, got {self.max_per_record}")
        if self.max_side is not None and not self.reencode:
            raise ValueError("max_side needs reencode (images kept as they are are never resized)")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must lie in 1..100, got {self.quality}")
        if self.min_shards < 1:
            raise ValueError(f"min_shards must be at least 1, got {self.min_shards}")


class TooManyFailures(RuntimeError):
    pass


@dataclass
class _Loaded:
    data: bytes | None
    ext: str
    error: str | None = None  # "missing", "unreadable" or "too_large"


_IMAGE_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def load_image(spec: tuple, reencode: bool, max_side: int | None, quality: int,
               max_megapixels: float = 64.0) -> _Loaded:
    """Bytes and extension of one source image; runs in a worker process. An image whose header declares
    more than ``max_megapixels`` is "too_large", never decoded."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    if callable(spec[0]):  # a generated image: (function, *args) returning JPEG bytes
        return _Loaded(spec[0](*spec[1:]), "jpg")
    path = Path(spec[1])
    try:
        raw = path.read_bytes()
    except OSError:
        return _Loaded(None, "", "missing")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError:
        return _Loaded(None, "", "too_large")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return _Loaded(None, "", "unreadable")
    if img.size[0] * img.size[1] > max_megapixels * 1e6:
        img.close()
        return _Loaded(None, "", "too_large")
    try:
        with img:
            fmt = img.format
            if not reencode and fmt in _IMAGE_EXT:
                img.verify()  # checks structure without a full decode
                return _Loaded(raw, _IMAGE_EXT[fmt])
            img.load()
            rgb = _rgb(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return _Loaded(None, "", "unreadable")
    if reencode:
        if max_side and max(rgb.size) > max_side:
            rgb.thumbnail((max_side, max_side), Image.BICUBIC)
        buf = io.BytesIO()
        rgb.save(buf, format="JPEG", quality=quality)
        return _Loaded(buf.getvalue(), "jpg")
    buf = io.BytesIO()  # another format kept losslessly as PNG
    rgb.save(buf, format="PNG")
    return _Loaded(buf.getvalue(), "png")


def _rgb(img):
    """An 8-bit RGB copy of a PIL image of any mode: 16-bit greyscale ("I;16", "I") is scaled down first,
    which PIL's own convert would clip to white."""
    from PIL import Image

    if img.mode.startswith("I;16") or img.mode == "I":
        import numpy as np

        scale = 257.0 if img.mode.startswith("I;16") else max(float(np.asarray(img).max()) / 255.0, 1.0)
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) / scale, 0, 255).round().astype(np.uint8))
    return img.convert("RGB")


def _load_star(args):
    return load_image(*args)


def _class_sort_key(name: str):
    return (0, int(name), "") if name.lstrip("-").isdigit() else (1, 0, name)


def record_sizes(n: int, max_per_record: int) -> list[int]:
    """Split n images into ceil(n / max) chunks of nearly equal size."""
    chunks = max(1, math.ceil(n / max_per_record))
    base, extra = divmod(n, chunks)
    return [base + (1 if i < extra else 0) for i in range(chunks)]


class _ShardSink:
    """Records into tars of about shard_bytes each, written atomically; with ``expected`` records and
    ``min_shards``, a shard also ends at every (i x expected / min_shards)-th record."""

    def __init__(self, out: Path, split: str, shard_bytes: int, expected: int = 0, min_shards: int = 1):
        self.out, self.split, self.shard_bytes = out, split, shard_bytes
        self.ends = {i * expected // min_shards for i in range(1, min_shards)} if min_shards > 1 else set()
        self.written = 0
        self.shards: list[dict] = []
        self._tar = None
        self._tmp: Path | None = None

    def _open(self) -> None:
        name = shard_name(self.split, len(self.shards))
        self._tmp = self.out / f".{name}.tmp"
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self.shards.append({"name": name, "records": 0, "images": 0, "bytes": 0, "first_image_id": None})

    def write(self, key: str, meta: dict, images: Sequence[tuple[str, bytes]]) -> None:
        if self._tar is None:
            self._open()
        shard = self.shards[-1]
        members = [(f"{key}.json", json.dumps(meta, sort_keys=True).encode())]
        members += [(image_member(key, i, ext), data) for i, (ext, data) in enumerate(images)]
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        shard["records"] += 1
        shard["images"] += len(images)
        if shard["first_image_id"] is None:
            shard["first_image_id"] = meta["image_ids"][0]
        shard["bytes"] = self._tar.fileobj.tell()
        self.written += 1
        if shard["bytes"] >= self.shard_bytes or self.written in self.ends:
            self.close()

    def close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        shard = self.shards[-1]
        shard["bytes"] = self._tmp.stat().st_size
        shard["sha256"] = _sha256(self._tmp)
        os.replace(self._tmp, self.out / shard["name"])
        self._tar = None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class _SplitState:
    sink: _ShardSink
    class_table: list = field(default_factory=list)
    next_image_id: int = 0
    records: int = 0
    too_few: list = field(default_factory=list)


def write_shards(source: str, images: Iterable[SourceImage], config: WriterConfig,
                 train_splits: Sequence[str] = ("train",)) -> dict:
    """Write the shards and manifest of ``images``; return the manifest."""
    config.validate()
    out = Path(config.out)

    by_class: dict[tuple[str, str], list[SourceImage]] = defaultdict(list)
    for image in images:
        by_class[(image.split, image.class_name)].append(image)
    # Classes in a seeded random order within each split (not by name): a shard then holds a random
    # sample of the catalogue, not a run of neighbouring classes (one SOP super-category, say), and so
    # does every batch drawn from a few shards.
    classes = sorted(by_class, key=lambda sc: (sc[0], _class_sort_key(sc[1])))
    rng = random.Random(config.seed)
    classes = [sc for split in sorted({sc[0] for sc in classes})
               for sc in rng.sample([c for c in classes if c[0] == split], sum(c[0] == split for c in classes))]
    expected = defaultdict(int)  # records per split, for min_shards
    for (split, _), members in by_class.items():
        if len(members) >= 2 or (split not in train_splits and members):
            expected[split] += len(record_sizes(len(members), config.max_per_record))
    _check_splits({split for split, _ in classes}, expected, train_splits, source)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # stale until this run completes
    ordered = [img for sc in classes for img in sorted(by_class[sc], key=lambda i: i.item)]
    if not ordered:
        raise ValueError(f"{source}: no images found")

    states: dict[str, _SplitState] = {}
    report = {"missing": [], "unreadable": [], "too_large": [], "too_few_images": {}}
    loaded = _load_all(ordered, config)
    for split, class_name in classes:
        members = sorted(by_class[(split, class_name)], key=lambda i: i.item)
        results = [(img, next(loaded)) for img in members]
        good = []
        for img, res in results:
            if res.error:
                report[res.error].append(img.item)
            else:
                good.append((img, res))
        if split not in states:
            states[split] = _SplitState(_ShardSink(out, split, config.shard_bytes, expected[split], config.min_shards))
        state = states[split]
        if len(good) < 2 and (split in train_splits or not good):
            state.too_few.append(class_name)
            continue
        _write_class(state, source, class_name, good, config.max_per_record)

    for state in states.values():
        state.sink.close()
    _report(report, states, len(ordered), config)
    manifest = _manifest(source, config, states, report)
    write_atomically(out / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def _report(report: dict, states: dict, total: int, config: WriterConfig) -> None:
    """Say what was not written; too many source images refused is a TooManyFailures."""
    refused = report["missing"] + report["unreadable"] + report["too_large"]
    failed = len(refused)
    if failed:
        print(f"[prep] {failed} of {total} source images not written: {len(report['missing'])} missing, "
              f"{len(report['unreadable'])} unreadable, {len(report['too_large'])} above {config.max_megapixels:g} "
              "megapixels (--max-megapixels; listed in the manifest's report)")
    if failed > config.max_failed_share * total:
        raise TooManyFailures(
            f"{failed} of {total} source images are missing or unreadable (more than max_failed_share="
            f"{config.max_failed_share}); first: {refused[:5]}"
        )
    for split, state in states.items():
        if state.too_few:
            report["too_few_images"][split] = state.too_few
            print(f"[prep] {split}: {len(state.too_few)} classes with fewer than 2 images not written "
                  f"(first: {state.too_few[:5]})")


def _manifest(source: str, config: WriterConfig, states: dict, report: dict) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "tool": TOOL,
        "source": source,
        "max_per_record": config.max_per_record,
        "image_policy": {"reencode": config.reencode, "max_side": config.max_side,
                         "quality": config.quality if config.reencode else None},
        "splits": {
            split: {
                "records": state.records,
                "images": state.next_image_id,
                "classes": len(state.class_table),
                "shards": state.sink.shards,
                "class_table": state.class_table,
            }
            for split, state in sorted(states.items())
        },
        "report": report,
    }


def _check_splits(splits: set[str], expected: dict, train_splits: Sequence[str], source: str) -> None:
    """Before anything is written: every split name is a plain name (it becomes part of a file name in
    the output folder: `../x` would write outside it), and a training split has a class to train on."""
    for split in sorted(splits):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", split):
            raise ValueError(f"{source}: split {split!r} is not a plain name (letters, digits, _ and -)")
    for split in train_splits:
        if split in splits and not expected.get(split):
            raise ValueError(f"{source}: split {split!r} has no class with 2 or more images, so no training "
                             "record (a class needs two images to give a positive pair); nothing written")


def _write_class(state: _SplitState, source: str, class_name: str, good: list, max_per_record: int) -> None:
    label = len(state.class_table)
    state.class_table.append([class_name, len(good)])
    start = 0
    for chunk, size in enumerate(record_sizes(len(good), max_per_record)):
        part = good[start:start + size]
        start += size
        ids = list(range(state.next_image_id, state.next_image_id + size))
        state.next_image_id += size
        meta = {"label": label, "class": class_name, "chunk": chunk, "image_ids": ids,
                "items": [img.item for img, _ in part], "source": source}
        state.sink.write(f"{label:08d}_{chunk:04d}", meta, [(res.ext, res.data) for _, res in part])
        state.records += 1


def _load_all(ordered: list[SourceImage], config: WriterConfig) -> Iterator[_Loaded]:
    args = [(img.load, config.reencode, config.max_side, config.quality, config.max_megapixels) for img in ordered]
    bar = tqdm(total=len(args), unit="img", desc="[prep] images", disable=not config.progress, mininterval=2)
    if config.workers <= 1:
        for a in args:
            bar.update()
            yield _load_star(a)
    else:
        ctx = multiprocessing.get_context("fork" if hasattr(os, "fork") else "spawn")
        with ctx.Pool(config.workers) as pool:
            for res in pool.imap(_load_star, args, chunksize=64):
                bar.update()
                yield res
    bar.close()

