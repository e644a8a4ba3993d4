"""Reading class-grouped shards (docs/SHARDS.md): the P x K training stream and the evaluation stream.

Training: every epoch, the split's records, numbered over its shard list shuffled by (seed, epoch) on
every rank alike, are cut into one contiguous window per (rank, worker) slot, so every record is drawn
once per epoch by one slot, however many shards there are against slots; each worker streams its
window through a seeded shuffle buffer, takes K images per record and P records per batch. Every rank
yields exactly ``steps_in_epoch(epoch)`` batches, computed from the manifest; a worker that runs short
(its last batch, a corrupt shard) draws again from its own window, so no collective ever waits on a
rank that ran dry. Batch i of an epoch always comes from the same logical worker and is a function of
(seed, epoch, rank, i) alone, which makes resuming exact. One DataLoader runs through the epochs.

Evaluation: every image of a split exactly once over all ranks and workers, with its label and its
image id (the split-wide index). Only json and image members are read; nothing is unpickled. A
truncated or corrupt shard is logged by name, skipped from the point of damage, and counted.
"""
from __future__ import annotations

import bisect
import ctypes
import functools
import json
import logging
import math
import os
import random
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dist_dml.errors import UserError
from dist_dml.seeding import mix

FORMAT, VERSION = "dist-dml/class-shards", 1
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
log = logging.getLogger("dist_dml.data")


@dataclass(frozen=True)
class DataConfig:
    """The `data` section of a run's config."""

    root: str = ""  # folder with manifest.json and the shards
    train_split: str = "train"
    classes_per_batch: int = 16  # P, per rank
    images_per_class: int = 4  # K
    workers: int = 2  # DataLoader workers per rank
    shuffle_buffer: int = 1000  # records
    image_size: int = 224  # training crop / evaluation center crop
    resize: int = 256  # evaluation resize before the center crop
    min_scale: float = 0.16  # random resized crop's smallest area share
    flip: bool = True  # random horizontal flip in training (off for text, digits, logos)
    seed: int = 0
    batch_size: int = 0  # per rank; optional, checked against P x K
    max_member_mb: float = 256.0  # a tar member declaring more is damage: its shard is counted corrupt

    @property
    def local_batch(self) -> int:
        return self.classes_per_batch * self.images_per_class

    def validate(self) -> None:
        if self.images_per_class < 2:
            raise ValueError(f"data.images_per_class (K) must be at least 2 to give positives, got {self.images_per_class}")
        if self.classes_per_batch < 1:
            raise ValueError(f"data.classes_per_batch (P) must be at least 1, got {self.classes_per_batch}")
        if self.batch_size and self.batch_size != self.local_batch:
            raise ValueError(f"data.batch_size={self.batch_size} is not classes_per_batch x images_per_class = "
                             f"{self.classes_per_batch} x {self.images_per_class} = {self.local_batch}")
        if not 0 < self.image_size <= self.resize:
            raise ValueError(f"data.image_size={self.image_size} must be positive and at most data.resize={self.resize} "
                             "(evaluation resizes the shorter side to resize, then crops image_size)")
        if not 0 < self.min_scale <= 1:
            raise ValueError(f"data.min_scale={self.min_scale} must be in (0, 1]")
        if self.seed < 0:
            raise ValueError(f"data.seed must be >= 0, got {self.seed}")
        if self.workers < 0 or self.shuffle_buffer < 1:
            raise ValueError("data.workers must be >= 0 and data.shuffle_buffer >= 1")
        if not 0 < self.max_member_mb < float("inf"):
            raise ValueError(f"data.max_member_mb must be positive and finite, got {self.max_member_mb}")


class ManifestError(UserError, ValueError):
    """A manifest that is missing, unreadable, of another schema, or without the split asked for."""


class Manifest:
    """A shard folder's manifest.json (docs/SHARDS.md), schema-checked on load."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.path = path = self.root / "manifest.json"
        try:
            self.data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ManifestError(f"{path}: no manifest (write shards with `dist-dml prep`)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ManifestError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(self.data, dict) or self.data.get("format") != FORMAT or self.data.get("version") != VERSION:
            got = self.data if not isinstance(self.data, dict) else self.data.get("format"), \
                None if not isinstance(self.data, dict) else self.data.get("version")
            raise ManifestError(f"{path}: format {got[0]!r} version {got[1]!r}, expected {FORMAT!r} version {VERSION}")
        self._check_schema()

    def _check_schema(self) -> None:
        """Every field a reader relies on, with its type: one message naming the first that is wrong."""
        def need(ok: bool, where: str, what: str) -> None:
            if not ok:
                raise ManifestError(f"{self.path}: {where} must be {what} (docs/SHARDS.md)")

        splits = self.data.get("splits")
        need(isinstance(splits, dict), "splits", "an object of splits")
        count = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0
        for name, split in splits.items():
            need(isinstance(split, dict), f"splits.{name}", "an object")
            for key in ("classes", "images"):
                need(count(split.get(key)), f"splits.{name}.{key}", "a count (an integer >= 0)")
            need(isinstance(split.get("shards"), list), f"splits.{name}.shards", "a list")
            for i, shard in enumerate(split["shards"]):
                where = f"splits.{name}.shards[{i}]"
                need(isinstance(shard, dict), where, "an object")
                file = shard.get("name")
                need(isinstance(file, str) and file != "" and not Path(file).is_absolute()
                     and ".." not in Path(file).parts, f"{where}.name", "a file name inside the shard folder")
                for key in ("records", "images"):
                    need(count(shard.get(key)), f"{where}.{key}", "a count (an integer >= 0)")

    def split(self, name: str) -> dict:
        splits = self.data["splits"]
        if name not in splits:
            raise ManifestError(f"{self.path}: no split {name!r}; it has {sorted(splits)}")
        return splits[name]

    def shard_paths(self, split: str) -> list[str]:
        return [str(self.root / s["name"]) for s in self.split(split)["shards"]]


# --- records ------------------------------------------------------------------------------------

FAULTS = ("corrupt_shards", "bad_records", "unknown_members", "bad_labels", "bad_images", "dropped_records")


class ReadErrors:
    """Per-worker counts of what could not be read; reported with every batch as a delta (FAULTS).

    corrupt_shards: shards skipped from a point of damage on (not a tar, NUL bytes, a truncated or
    oversized member); bad_records: records without a readable json or with images missing;
    unknown_members: members that are neither json nor an image (never read); bad_labels: records whose
    label or image ids lie outside the split's (per the manifest); bad_images: images that do not decode
    (the record keeps its others); dropped_records: records left with fewer than 2 decodable images.
    """

    def __init__(self, max_member_bytes: int = 256 << 20, classes: int | None = None, images: int | None = None):
        self.max_member_bytes = max_member_bytes  # a member declaring more makes its shard corrupt
        self.classes, self.images = classes, images  # the split's: labels and image ids must lie below
        self.corrupt_shards: set[str] = set()
        self.bad_records = self.unknown_members = self.bad_labels = self.bad_images = self.dropped_records = 0
        self._reported = (0,) * len(FAULTS)
        self._logged: set[str] = set()

    def fault(self, kind: str, what: str, message: str, *args) -> None:
        """Count (``kind``, one of FAULTS) and log a fault once per ``what`` (a record or image): a window
        read again (its slot's last batch) meets the same faults without counting them twice."""
        if what not in self._logged:
            self._logged.add(what)
            setattr(self, kind, getattr(self, kind) + 1)
            log.warning(message, *args)

    def check_range(self, record: dict, key: str) -> bool:
        """Whether the record's label and image ids lie in the split's ranges; counted and logged if not."""
        label_ok = self.classes is None or 0 <= record["label"] < self.classes
        ids_ok = self.images is None or all(0 <= i < self.images for i in record["image_ids"])
        if label_ok and ids_ok:
            return True
        what = (f"label {record['label']} (the split has {self.classes} classes)" if not label_ok else
                f"image ids {record['image_ids']} (the split has {self.images} images)")
        self.fault("bad_labels", f"{record['shard']}#{key}", "skipping record %s in shard %s: %s", key,
                   record["shard"], what)
        return False

    def corrupt(self, shard: str, exc: Exception) -> None:
        """Log once and count a shard whose rest is skipped."""
        if shard not in self.corrupt_shards:
            log.warning("skipping the rest of shard %s: %s", shard, exc)
        self.corrupt_shards.add(shard)

    def keep(self, name: str) -> bool:
        """Only json and image members are read; any other is counted, skipped unread, never decoded."""
        ext = name.rsplit(".", 1)[-1].lower()
        if ext == "json" or ext in IMAGE_EXTENSIONS:
            return True
        self.unknown_members += 1
        return False

    def delta_pending(self) -> tuple[int, ...]:
        """The counts not yet reported by delta()."""
        now = (len(self.corrupt_shards), self.bad_records, self.unknown_members, self.bad_labels, self.bad_images,
               self.dropped_records)
        return tuple(a - b for a, b in zip(now, self._reported))

    def delta(self) -> dict[str, int]:
        """The counts since the previous call."""
        pending = self.delta_pending()
        self._reported = tuple(a + b for a, b in zip(self._reported, pending))
        return dict(zip(FAULTS, pending))


class ShardError(Exception):
    """A tar that cannot be read on from this point: bad header checksum, or cut short."""


_BLOCK = 512


def _number(field: bytes) -> int:
    if field[:1] == b"\x80":  # GNU base-256, for members over 8 GiB
        return int.from_bytes(field[1:], "big")
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _pax(data: bytes) -> dict[str, str]:
    """Records "LEN key=value\\n" of a pax extended header."""
    out, i = {}, 0
    while i < len(data):
        length = int(data[i:data.index(b" ", i)])
        key, _, value = data[data.index(b" ", i) + 1:i + length - 1].partition(b"=")
        out[key.decode()] = value.decode("utf-8", "surrogateescape")
        i += length
    return out


def tar_members(path: str, keep: Callable[[str], bool], max_member: int = 256 << 20) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular files of the POSIX tar at ``path`` that ``keep`` accepts, in order.

    ustar headers with pax and GNU long names, as tarfile writes them. webdataset's tar path reads
    every header through Python's tarfile (~60 us a stored image on bench_data's shards); this
    reads the 512-byte header itself (~8 us), checks its checksum, and seeks over members it does
    not keep without reading them. Raises ShardError where the tar is damaged: a bad checksum, a
    member cut short, or no end-of-archive block (tarfile ends quietly there, but every tar writer
    writes one, so a shard cut at a member boundary is reported too), a file that starts with an
    end-of-archive block (empty, or all NUL bytes: tarfile reads it as an empty tar), or a member or
    extended header that declares more than ``max_member`` bytes (a pax header can declare any size:
    it would be read into memory); the members before the damage have been yielded.
    """
    with open(path, "rb", buffering=1 << 20) as f:
        end = os.fstat(f.fileno()).st_size
        extended: dict[str, str] = {}
        while True:
            offset = f.tell()
            header = f.read(_BLOCK)
            if not header:
                raise ShardError(f"cut short: no end-of-archive block after byte {min(offset, end)}"
                                 + (" (a member runs past the end of the file)" if offset > end else ""))
            if not header.strip(b"\0"):
                if offset == 0:
                    raise ShardError("no member at all: the file starts with an end-of-archive block "
                                     "(empty, or all NUL bytes)")
                return  # the end-of-archive blocks
            if len(header) < _BLOCK:
                raise ShardError(f"cut short in the header at byte {offset}")
            if _number(header[148:156]) != sum(header[:148]) + 8 * 32 + sum(header[156:]):
                raise ShardError(f"bad header checksum at byte {offset}")
            kind, size = header[156:157], _number(header[124:136])
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if header[257:262] == b"ustar" and header[345:346] != b"\0":
                name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape") + "/" + name
            name, size = extended.pop("path", name), int(extended.pop("size", size))
            extended.clear()
            skip = size + (-size) % _BLOCK
            kept = kind in (b"0", b"\0") and keep(name)
            if size > max_member and (kept or kind in (b"x", b"L")):
                raise ShardError(f"member {name} at byte {offset} declares {size} bytes, more than the "
                                 f"{max_member} a member may have (data.max_member_mb)")
            if kind in (b"x", b"L"):  # pax extended header / GNU long name: they describe the next member
                data = f.read(size)
                if len(data) < size:
                    raise ShardError(f"cut short in an extended header at byte {offset}")
                extended = _pax(data) if kind == b"x" else {"path": data.rstrip(b"\0").decode("utf-8", "surrogateescape")}
                f.seek(skip - size, 1)
            elif kept:
                data = f.read(size)
                if len(data) < size:
                    raise ShardError(f"cut short in member {name} at byte {offset}")
                f.seek(skip - size, 1)
                yield name, data
            else:  # directories, links, pax globals, members we do not read
                f.seek(skip, 1)


def _key_suffix(name: str) -> tuple[str, str]:
    """A member name's record KEY and SUFFIX, as webdataset splits them: at the first dot of the base name."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return (name[:dot], name[dot + 1:]) if dot >= 0 else (name, "")


def _samples(members: Iterator[tuple[str, bytes]]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """webdataset's grouping: consecutive members KEY.SUFFIX with the same KEY make one sample."""
    key, sample = None, {}
    try:
        for name, data in members:
            k, suffix = _key_suffix(name)
            if k != key and sample:
                yield key, sample
                sample = {}
            key = k
            sample[suffix] = data
    except ShardError:
        if sample:  # the damage may come right after a whole record: the caller checks it is whole
            yield key, sample
        raise
    if sample:
        yield key, sample


def read_records(shards: list[str], errors: ReadErrors) -> Iterator[dict]:
    """Valid records of ``shards`` in order: {label, image_ids, images: [(ext, bytes)], shard, class, items}.

    A damaged shard is logged, counted and skipped from the damage on (its last, incomplete record
    included); unknown members are counted and never read.
    """
    for shard in shards:
        yield from shard_records(shard, errors)


def shard_records(shard: str, errors: ReadErrors, skip: int = 0) -> Iterator[dict]:
    """The valid records of one shard after its first ``skip`` records, which are passed over without
    reading their members (only their tar headers). Each record carries its ``index`` in the shard (its
    KEY's ordinal: malformed or skipped records count too)."""
    counter = _KeyCounter(skip, errors)
    try:
        for key, sample in _samples(tar_members(shard, counter.keep, errors.max_member_bytes)):
            index = counter.ordinals.pop(key, None)
            record = _parse_record(sample, shard) if index is not None else None
            if record is None:
                errors.fault("bad_records", f"{shard}#{key}", "skipping malformed record %s in shard %s", key, shard)
                continue
            record["index"] = index
            if errors.check_range(record, key):
                yield record
    except (ShardError, OSError, ValueError, UnicodeDecodeError) as exc:
        errors.corrupt(shard, exc)


class _KeyCounter:
    """A tar_members ``keep`` that numbers the records (runs of members with one KEY, as _samples groups
    them) and passes over every member of the first ``skip``; the rest are kept as ``errors.keep`` says."""

    def __init__(self, skip: int, errors: ReadErrors):
        self.skip, self.errors = skip, errors
        self.key, self.count = None, 0
        self.ordinals: dict[str, int] = {}  # KEY -> its ordinal, until its sample is read

    def keep(self, name: str) -> bool:
        key = _key_suffix(name)[0]
        if key != self.key:
            self.key, self.count = key, self.count + 1
            if self.count > self.skip:
                while len(self.ordinals) > 64:  # the oldest: keys none of whose members were kept, never read
                    self.ordinals.pop(next(iter(self.ordinals)))
                self.ordinals[key] = self.count - 1
        return self.count > self.skip and self.errors.keep(name)


Segment = tuple[str, int, int]  # (shard, records to skip, records to take)


def read_segments(segments: list[Segment], errors: ReadErrors) -> Iterator[dict]:
    """The records of each (shard, skip, take) in turn: those whose index in the shard lies in
    [skip, skip + take), a contiguous part of it (a malformed record in it is not made up for from beyond)."""
    for shard, skip, take in segments:
        records = shard_records(shard, errors, skip)
        try:
            for record in records:
                if record["index"] >= skip + take:
                    break
                yield record
        finally:
            records.close()


def record_windows(counts: list[int], slots: int, least: int) -> list[tuple[int, int]]:
    """Each slot's window [start, end) of the records of an epoch, numbered over the epoch's shard order.

    Contiguous, disjoint and of nearly equal length (R // slots or one more), so every record falls in
    exactly one window and every shard is read about once in all; a slot reads at most two shards in
    part. Where the split has fewer than ``least`` (P) records per slot, windows are widened to
    ``least`` records (wrapping around), so a batch still holds distinct records: slots then share them.
    """
    total = sum(counts)
    windows = [(slot * total // slots, (slot + 1) * total // slots) for slot in range(slots)]
    want = min(least, total)
    return [(a, max(b, a + want)) for a, b in windows]


def window_segments(order: list[str], counts: list[int], window: tuple[int, int],
                    firsts: list[int] | None = None) -> list[Segment]:
    """The (shard, skip, take) parts of ``order`` that hold the records of ``window`` (end may pass the
    total: it wraps around to the first shard). With ``firsts``, entry i is the run of ``counts[i]``
    records of shard ``order[i]`` from its record ``firsts[i]`` on (a shard may then appear in several runs)."""
    total = sum(counts)
    firsts = firsts or [0] * len(order)
    starts = [0]
    for n in counts:
        starts.append(starts[-1] + n)
    segments, pos, end = [], window[0], window[1]
    while pos < end and total:
        at = pos % total
        i = bisect.bisect_right(starts, at) - 1  # the last run starting at or before `at` (never an empty one)
        take = min(counts[i] - (at - starts[i]), end - pos)
        segments.append((order[i], firsts[i] + at - starts[i], take))
        pos += take
    return segments


def undrawn_runs(order: list[str], counts: list[int], drawn: np.ndarray) -> tuple[list[str], list[int], list[int]]:
    """(shards, counts, firsts): the runs of records of an epoch (numbered over ``order``) that ``drawn``
    marks False, in order: what is left of the epoch for a resumed layout."""
    shards, lengths, firsts = [], [], []
    start = 0
    for shard, n in zip(order, counts):
        left = ~drawn[start:start + n]
        if left.any():
            edges = np.flatnonzero(np.diff(np.concatenate([[0], left.astype(np.int8), [0]])))
            for a, b in zip(edges[::2], edges[1::2]):
                shards.append(shard)
                firsts.append(int(a))
                lengths.append(int(b - a))
        start += n
    return shards, lengths, firsts


def _parse_record(sample: dict, shard: str) -> dict | None:
    try:
        meta = json.loads(sample["json"])
        label, ids = int(meta["label"]), [int(i) for i in meta["image_ids"]]
    except (KeyError, ValueError, TypeError):
        return None
    images = []
    for i in range(len(ids)):
        found = [(ext, sample[f"{i}.{ext}"]) for ext in IMAGE_EXTENSIONS if f"{i}.{ext}" in sample]
        if len(found) != 1:
            return None
        images.append(found[0])
    if not images:
        return None
    items = meta.get("items") if isinstance(meta.get("items"), list) and len(meta["items"]) == len(ids) else None
    return {"label": label, "image_ids": ids, "images": images, "shard": shard, "class": str(meta.get("class", label)),
            "items": [str(i) for i in items] if items else [f"{shard}#{i}" for i in ids]}


# --- decoding and augmentation ------------------------------------------------------------------
#
# Per image, on uint8, written straight into its slot of the batch: the random resized crop takes
# its box from the decoded image as a view, then one antialiased bilinear resize to the output size
# runs on channels-last uint8 (torch's vectorised path; decode_image already returns that layout),
# mirrored with probability 1/2. The batch itself is channels-last and, inside a DataLoader worker,
# in shared memory, so it reaches the main process without another copy. Normalisation runs once
# per batch where the model runs (normalize_batch).

def decode(data: bytes) -> torch.Tensor:
    """RGB uint8 (3, H, W) (a channels-last view of the decoder's HWC buffer)."""
    from torchvision.io import ImageReadMode, decode_image

    return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def crop_box(height: int, width: int, rng: random.Random, scale: tuple[float, float],
             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (top, left, h, w), drawn from ``rng``: an area share in
    ``scale`` and a log-uniform aspect ratio in ``ratio``, 10 tries, then the central crop with the
    ratio clamped."""
    area, log_ratio = height * width, (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target, aspect = area * rng.uniform(*scale), math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    if width / height < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif width / height > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resize_into(region: torch.Tensor, out: torch.Tensor, flip: bool = False) -> torch.Tensor:
    """Antialiased bilinear resize of uint8 (3, h, w) ``region`` into ``out`` (3, H, W), mirrored if
    ``flip``. Mirroring the (smaller) source is bit-identical to mirroring the result; the resize
    writes into ``out`` directly (the .out form of the operator F.interpolate calls)."""
    x = (region.flip(-1) if flip else region).unsqueeze(0).contiguous(memory_format=torch.channels_last)
    if x.shape[-2:] == out.shape[-2:]:
        return out.copy_(x[0])
    torch.ops.aten._upsample_bilinear2d_aa.out(x, list(out.shape[-2:]), False, None, None, out=out.unsqueeze(0))
    return out


def new_batch(n: int, size: int) -> torch.Tensor:
    """Empty uint8 (n, 3, size, size), channels-last in memory; in shared memory inside a DataLoader
    worker, so handing it to the main process costs no copy."""
    out = torch.empty((n, size, size, 3), dtype=torch.uint8)
    if get_worker_info() is not None:
        out.share_memory_()
    return out.permute(0, 3, 1, 2)


def train_image(data: bytes, cfg: DataConfig, rng: random.Random, out: torch.Tensor | None = None) -> torch.Tensor:
    """Training augmentation: random resized crop (area share min_scale..1, aspect 3/4..4/3) to
    image_size, horizontal flip with probability 1/2 where ``cfg.flip``; all draws from ``rng``."""
    out = new_batch(1, cfg.image_size)[0] if out is None else out
    image = decode(data)
    top, left, h, w = crop_box(image.shape[1], image.shape[2], rng, (cfg.min_scale, 1.0))
    flip = rng.random() < 0.5 and cfg.flip  # drawn either way: the crops stay the same with or without flips
    return resize_into(image[:, top:top + h, left:left + w], out, flip=flip)


def eval_image(data: bytes, cfg: DataConfig, out: torch.Tensor | None = None) -> torch.Tensor:
    """Evaluation: the shorter side resized to ``resize``, then the central image_size square
    (torchvision's Resize(resize) + CenterCrop(image_size))."""
    out = new_batch(1, cfg.image_size)[0] if out is None else out
    image = decode(data)
    _, height, width = image.shape
    short, long = min(height, width), max(height, width)
    scaled = int(cfg.resize * long / short)
    size = (cfg.resize, scaled) if height <= width else (scaled, cfg.resize)
    if size != (height, width):
        image = resize_into(image, torch.empty((*size, 3), dtype=torch.uint8).permute(2, 0, 1))
    top, left = int(round((size[0] - cfg.image_size) / 2)), int(round((size[1] - cfg.image_size) / 2))
    return resize_into(image[:, top:top + cfg.image_size, left:left + cfg.image_size], out)


_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255


def normalize_batch(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) to float32 normalised with ImageNet's mean and std.

    The streams yield uint8 (a quarter of the bytes to move); this runs where the model runs.
    """
    return images.float().sub_(_MEAN.to(images.device)).div_(_STD.to(images.device))


# --- loading ------------------------------------------------------------------------------------

def loader(dataset: IterableDataset, workers: int) -> DataLoader:
    """A DataLoader over a stream that yields whole batches; its workers die with this process."""
    return DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=False,
                      prefetch_factor=4 if workers else None,
                      worker_init_fn=functools.partial(_die_with_parent, os.getpid()) if workers else None)


def _die_with_parent(parent: int, worker_id: int) -> None:
    """A DataLoader worker_init_fn. torch's worker watchdog compares getppid() with the parent pid the
    worker saw when it started, so a rank SIGKILLed (OOM killer, a failing node, the kill/resume
    test) while a worker starts leaves that worker alive for good, holding the launcher's stdout
    and shared memory. Here the kernel kills the worker with its parent (PR_SET_PDEATHSIG), and a
    worker whose parent is already gone exits at once."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


# --- training stream ----------------------------------------------------------------------------

class TrainStream(IterableDataset):
    """P x K batches for one rank; ``steps_in_epoch(epoch)`` of them per epoch, the same on every rank.

    Coverage. An epoch's records, numbered over the split's shard list shuffled by (seed, epoch), are
    cut into one contiguous window per (rank, worker) slot (:func:`record_windows`), whatever the
    number of shards against slots: every record is drawn in every epoch, by one slot only. Each slot
    reads its window through a seeded shuffle buffer; a window that starts mid-shard passes over the
    shard's first records without reading them. Each logical worker yields ceil(window / P) batches,
    so the last batch of a slot is filled with records drawn again from its own window (fewer than P
    draws per slot and epoch); a slot that runs short (a corrupt shard) draws again from its window
    the same way, so no collective ever waits on a rank that ran dry.

    Batch i of an epoch always comes from logical worker i % workers (epochs hold a multiple of the
    workers, so one DataLoader serves any number of epochs with the same worker processes) and is a
    function of (seed, epoch, rank, i) alone, which makes resuming exact: a resumed epoch skips the
    batches already consumed (reading their records, not decoding them).

    Position in global samples. Every batch names the epoch positions of its records' first draws
    (``positions``; -1 for a record drawn again to fill a batch); the trainer hands each consumed batch
    to :meth:`consume`, so the stream knows which of the epoch's records this rank has drawn. A
    checkpoint keeps the epoch's draws over all ranks. Resumed with the same ranks, workers and batch
    geometry, the epoch continues exactly; resumed otherwise (another world size), the records not yet
    drawn in the epoch are cut into windows over the new slots from the resume step on (a *resumed
    layout*), so the epoch ends without replaying or skipping a record.
    """

    GEOMETRY = ("world_size", "workers", "classes_per_batch", "shuffle_buffer", "seed", "records")

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1, decode_images: bool = True):
        cfg.validate()
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        manifest = Manifest(cfg.root)
        self.shards = manifest.shard_paths(cfg.train_split)
        split = manifest.split(cfg.train_split)
        self.num_classes, self.num_images = split["classes"], split["images"]
        self.records = {path: s["records"] for path, s in zip(self.shards, split["shards"])}
        self.num_records = sum(self.records.values())
        if not self.shards or not self.num_records:
            raise ValueError(f"{cfg.root}: split {cfg.train_split!r} has no records")
        self.decode_images = decode_images
        self.epoch, self.step = 0, 0
        self.epochs = 1  # how many epochs a loader runs through (see loader)
        # A resumed layout of epoch `epoch`: from base_step on, the records base_drawn marks False.
        self.base_step, self.base_drawn = 0, None
        self.drawn_before = np.zeros(self.num_records, np.int32)  # this epoch's draws, all ranks, as loaded
        self.drawn_here = np.zeros(self.num_records, np.int32)  # this rank's draws since (see consume)
        self._windows: dict[tuple, list[list[Segment]]] = {}

    @property
    def workers(self) -> int:
        """Logical workers per rank (a DataLoader without worker processes is one)."""
        return max(self.cfg.workers, 1)

    @property
    def slots(self) -> int:
        return self.world_size * self.workers

    def shard_order(self, epoch: int) -> list[str]:
        order = list(self.shards)
        random.Random(mix(self.cfg.seed, epoch)).shuffle(order)  # identical on every rank
        return order

    def _base(self, epoch: int) -> int:
        """The step a (resumed) layout of ``epoch`` starts at: 0 for a whole epoch."""
        return self.base_step if epoch == self.epoch and self.base_drawn is not None else 0

    def offsets(self, epoch: int) -> dict[str, int]:
        """Each shard's first position in the epoch's numbering of records."""
        out, start = {}, 0
        for shard in self.shard_order(epoch):
            out[shard] = start
            start += self.records[shard]
        return out

    def slot_segments(self, epoch: int) -> list[list[Segment]]:
        """Per (rank, worker) slot, the (shard, skip, take) parts of its window of the epoch's records (of
        the records not yet drawn, in a resumed layout)."""
        resumed = epoch == self.epoch and self.base_drawn is not None
        key = (epoch, resumed)
        if key not in self._windows:
            order = self.shard_order(epoch)
            counts = [self.records[s] for s in order]
            firsts = None
            if resumed:
                order, counts, firsts = undrawn_runs(order, counts, self.base_drawn)
            windows = record_windows(counts, self.slots, self.cfg.classes_per_batch)
            self._windows = {key: [window_segments(order, counts, w, firsts) for w in windows]}  # keep one
        return self._windows[key]

    def steps_in_epoch(self, epoch: int) -> int:
        """The same on every rank: each logical worker yields enough batches for the longest window
        (windows differ by one record at most), after the resumed layout's base step if any; a multiple of
        the workers from that base."""
        longest = max(sum(take for _, _, take in segments) for segments in self.slot_segments(epoch))
        return self._base(epoch) + self.workers * math.ceil(longest / self.cfg.classes_per_batch)

    def remaining_steps(self, epochs: int) -> int:
        """Steps from the current position to the end of epoch ``epochs - 1``."""
        return (self.steps_in_epoch(self.epoch) - self.step
                + sum(self.steps_in_epoch(e) for e in range(self.epoch + 1, epochs)))

    def layout_note(self) -> str | None:
        """A warning where there are fewer shards than (rank x worker) slots, with the numbers."""
        if len(self.shards) >= self.slots:
            return None
        per_slot = self.num_records / self.slots
        return (f"{len(self.shards)} training shards for {self.slots} (rank x worker) slots "
                f"({self.world_size} ranks x {self.workers} workers): slots share shards, each reading a "
                f"window of about {per_slot:.0f} records; with at least {self.slots} shards every slot reads "
                f"whole shards of its own (dist-dml prep --min-shards {self.slots})")

    @property
    def steps_per_epoch(self) -> int:
        return self.steps_in_epoch(self.epoch)

    def _geometry(self) -> dict:
        return {"world_size": self.world_size, "workers": self.workers, "classes_per_batch": self.cfg.classes_per_batch,
                "shuffle_buffer": self.cfg.shuffle_buffer, "seed": self.cfg.seed, "records": self.num_records}

    def state_dict(self, drawn: np.ndarray | None = None) -> dict:
        """The position: (epoch, step), the geometry it was reached with, the resumed layout if any, and
        ``drawn`` (this epoch's draws per record over all ranks; see :meth:`local_draws`)."""
        return {"epoch": self.epoch, "step": self.step, **self._geometry(), "base_step": self._base(self.epoch),
                "base_drawn": None if self.base_drawn is None else self.base_drawn.copy(),
                "drawn": None if drawn is None else np.asarray(drawn, np.int32)}

    def load_state_dict(self, state: dict) -> str:
        """Continue from ``state``: exactly where its geometry is this stream's, else (another world size,
        other workers or batches) with a resumed layout over the records its ``drawn`` leaves. Returns how,
        in a few words. A state without draws (written before they were kept) resumes only exactly."""
        self.set_epoch(int(state["epoch"]))
        self.step = int(state["step"])
        drawn = state.get("drawn")
        same = all(state.get(k, v) == v for k, v in self._geometry().items())
        if drawn is not None:
            if len(drawn) != self.num_records:
                raise ValueError(f"the saved data position covers {len(drawn)} records, the split has "
                                 f"{self.num_records}: another data.root or train_split")
            self.drawn_before = np.asarray(drawn, np.int32).copy()
        if same:
            base = state.get("base_drawn")
            self.base_step, self.base_drawn = (int(state.get("base_step", 0)), np.asarray(base, bool)) \
                if base is not None else (0, None)
            return "exactly where it was"
        if drawn is None:
            raise ValueError("the checkpoint's data position was saved without its draws (an older dist-dml): "
                             f"resume it with its own geometry ({ {k: state.get(k) for k in self.GEOMETRY} })")
        if self.step == 0:
            return "at the start of an epoch"
        self.base_step, self.base_drawn = self.step, self.drawn_before > 0
        left = int((~self.base_drawn).sum())
        return (f"epoch {self.epoch} from step {self.step} with the {left} of its {self.num_records} records not yet "
                f"drawn, cut over {self.slots} slots")

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.step = epoch, 0
        self.base_step, self.base_drawn = 0, None
        self.drawn_before = np.zeros(self.num_records, np.int32)
        self.drawn_here = np.zeros(self.num_records, np.int32)

    def consume(self, batch: dict) -> None:
        """A batch the trainer used: its records' first draws count as drawn (by this rank)."""
        positions = batch["positions"].numpy()
        np.add.at(self.drawn_here, positions[positions >= 0], 1)

    def local_draws(self) -> tuple[np.ndarray, np.ndarray]:
        """(draws of this epoch over all ranks as loaded, this rank's since): the epoch's draws per record
        are the first plus the sum of the second over ranks."""
        return self.drawn_before, self.drawn_here

    def advance(self) -> tuple[np.ndarray, np.ndarray] | None:
        """One batch consumed: the next step, or the next epoch's first. At an epoch's end, returns its
        :meth:`local_draws` (for the trainer's report on the epoch)."""
        self.step += 1
        if self.step < self.steps_per_epoch:
            return None
        finished = self.local_draws()
        self.set_epoch(self.epoch + 1)
        return finished

    def loader(self, epochs: int = 1) -> DataLoader:
        """A DataLoader from (epoch, step) through the end of epoch ``epoch + epochs - 1``, whose worker
        processes move from one epoch to the next themselves (training passes a large ``epochs`` and
        stops when it has its steps). Every batch names its ``epoch`` and ``index``."""
        self.epochs = epochs
        return loader(self, self.cfg.workers)

    def __len__(self) -> int:
        return self.steps_per_epoch - self.step

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers, physical = (info.num_workers, info.id) if info else (1, 0)
        assert workers == self.workers, (workers, self.workers)
        # The DataLoader asks its workers in turn, from worker 0; after a resume at step s the first
        # batch must come from logical worker (s - base) % workers, and since every epoch (a resumed
        # layout: from its base) holds a multiple of the workers, each physical worker keeps its logical
        # worker in the epochs after.
        worker = (physical + self.step - self._base(self.epoch)) % workers
        for epoch in range(self.epoch, self.epoch + self.epochs):
            start = self.step if epoch == self.epoch else 0
            yield from self.worker_batches(epoch, worker, start)

    def worker_batches(self, epoch: int, worker: int, start: int = 0) -> Iterator[dict]:
        """Logical worker ``worker``'s batches of ``epoch`` (indices base + worker, base + worker + workers,
        ...) from index ``start`` on; the ones before are drawn (records read, images not decoded) but not
        yielded."""
        cfg = self.cfg
        base = self._base(epoch)
        salt = (base + 1,) if epoch == self.epoch and self.base_drawn is not None else ()  # a resumed layout
        rng = random.Random(mix(cfg.seed, epoch, self.rank, worker, *salt))
        errors = ReadErrors(int(cfg.max_member_mb * 2**20), self.num_classes, self.num_images)
        records = self._record_stream(epoch, worker, errors, rng, salt)
        for index in range(base + worker, self.steps_in_epoch(epoch), self.workers):
            chosen = []
            for _ in range(cfg.classes_per_batch):
                record = next(records)
                k, have = cfg.images_per_class, len(record["images"])
                picks = rng.sample(range(have), k) if have >= k else [rng.randrange(have) for _ in range(k)]
                chosen.append((record, picks))
            if index < start:
                continue  # consumed before a resume: records read, images not decoded
            # Augmentations draw from their own generator, seeded per batch so a resumed epoch matches.
            batch = self._assemble(chosen, random.Random(mix(cfg.seed, epoch, self.rank, index, 1, *salt)), errors)
            yield {**batch, "epoch": epoch, "index": index}

    def _record_stream(self, epoch: int, worker: int, errors: ReadErrors, rng: random.Random,
                       salt: tuple = ()) -> Iterator[dict]:
        """The slot's window through the shuffle buffer, then the same window again (reshuffled) for as
        long as records are asked for. Records carry their epoch ``position`` and whether this is their
        ``first`` draw."""
        segments = self.slot_segments(epoch)[self.rank * self.workers + worker]
        offsets = self.offsets(epoch)
        buffer: list[dict] = []
        passes = 0
        while True:
            produced = False
            for record in read_segments(segments, errors):
                produced = True
                record["position"], record["first"] = offsets[record["shard"]] + record["index"], passes == 0
                if len(buffer) < self.cfg.shuffle_buffer:
                    buffer.append(record)
                    continue
                j = rng.randrange(len(buffer))
                buffer[j], record = record, buffer[j]
                yield record
            if not produced and not buffer:
                raise RuntimeError(f"rank {self.rank} worker {worker}: no readable record in {segments}")
            # The pass is over: empty the buffer, then draw again from the window, in another order.
            rng.shuffle(buffer)
            yield from buffer
            buffer.clear()
            passes += 1
            segments = list(segments)
            random.Random(mix(self.cfg.seed, epoch, self.rank, worker, passes, *salt)).shuffle(segments)

    def _assemble(self, chosen, rng: random.Random, errors: ReadErrors) -> dict:
        """The batch of the chosen (record, picks). An image that does not decode is counted and replaced by
        another of its record (the next that decodes); a record left with fewer than 2 decodable images is
        dropped, counted, and its places go to the batch's previous (or next) record, so the batch keeps
        its size. Which images replace which depends on the data alone, so a resumed run matches."""
        cfg = self.cfg
        # Each record's epoch position where this is its first draw (a dropped record was drawn all the same).
        positions = torch.tensor([r.get("position", -1) if r.get("first") else -1 for r, _ in chosen])
        picks_of = [list(picks) for _, picks in chosen]
        images = new_batch(cfg.local_batch, cfg.image_size) if self.decode_images else None
        if images is not None:  # uint8: normalised on the device (normalize_batch)
            dropped = []
            for r, (record, _) in enumerate(chosen):
                picks_of[r] = self._decode_record(record, picks_of[r], images[r * cfg.images_per_class:], rng, errors)
                if picks_of[r] is None:
                    dropped.append(r)
            kept = [r for r in range(len(chosen)) if r not in dropped]
            if not kept:
                raise RuntimeError(f"rank {self.rank}: no record of a batch has 2 decodable images: "
                                   f"{sorted({record['shard'] for record, _ in chosen})}")
            k = cfg.images_per_class
            for r in dropped:  # its places: a copy of the nearest kept record's images
                donor = max((d for d in kept if d < r), default=min(kept))
                images[r * k:(r + 1) * k].copy_(images[donor * k:(donor + 1) * k])
                chosen[r], picks_of[r] = chosen[donor], picks_of[donor]
        labels, ids = [], []
        for (record, _), picks in zip(chosen, picks_of):
            for i in picks:
                labels.append(record["label"])
                ids.append(record["image_ids"][i])
        batch = {"labels": torch.tensor(labels), "image_ids": torch.tensor(ids), "errors": errors.delta(),
                 "records": torch.tensor([record["image_ids"][0] for record, _ in chosen]),  # a record's first id names it
                 "positions": positions}
        if images is not None:
            batch["images"] = images
        return batch

    def _decode_record(self, record: dict, picks: list[int], out: torch.Tensor, rng: random.Random,
                       errors: ReadErrors) -> list[int] | None:
        """Decode and augment the record's picked images into out[0..K); the images actually used. A pick
        that does not decode is replaced by another of the record's images (one not used yet first).
        None (counted as dropped) where images failed and fewer than 2 distinct ones decode."""
        bad: set[int] = set()
        used: list[int] = []
        have = len(record["images"])

        def decode_into(i: int, slot: int) -> bool:
            try:
                train_image(record["images"][i][1], self.cfg, rng, out[slot])
                return True
            except (RuntimeError, ValueError):
                bad.add(i)
                errors.fault("bad_images", f"{record['shard']}#{record['items'][i]}", "skipping image %s of shard "
                             "%s: it does not decode", record["items"][i], record["shard"])
                return False

        for slot, pick in enumerate(picks):
            if pick not in bad and decode_into(pick, slot):
                used.append(pick)
                continue
            others = [(pick + j) % have for j in range(1, have)]
            for i in [i for i in others if i not in used] + [i for i in others if i in used]:
                if i not in bad and decode_into(i, slot):
                    used.append(i)
                    break
            else:
                break  # nothing of the record decodes
        if bad and len(used) == len(picks) and len(set(used)) < 2:  # look for a second distinct image
            spare = next(s for s in range(len(used) - 1, -1, -1) if used.count(used[s]) > 1) if len(used) > 1 else None
            for i in range(have):
                if spare is not None and i not in bad and i not in used and decode_into(i, spare):
                    used[spare] = i
                    break
        if bad and (len(used) < len(picks) or len(set(used)) < 2):
            errors.fault("dropped_records", f"{record['shard']}#drop{record['image_ids'][0]}", "dropping a record "
                         "of class %s in shard %s: fewer than 2 of its %d images decode", record["class"],
                         record["shard"], have)
            return None
        return used


# --- evaluation stream --------------------------------------------------------------------------

class EvalBatch(NamedTuple):
    """A batch of the evaluation stream: uint8 images and, per image, its label, split-wide image id,
    class (the source's class id or name) and item (its source path or id)."""

    images: torch.Tensor
    labels: torch.Tensor
    image_ids: torch.Tensor
    classes: list[str]
    items: list[str]
    errors: dict | None = None  # FAULTS met since the worker's previous batch


class EvalStream(IterableDataset):
    """Every image of ``split`` once over all ranks and workers, in :class:`EvalBatch` es."""

    def __init__(self, cfg: DataConfig, split: str, rank: int = 0, world_size: int = 1, batch_size: int = 128,
                 decode_images: bool = True):
        self.cfg, self.split, self.rank, self.world_size = cfg, split, rank, world_size
        manifest = Manifest(cfg.root)
        self.shards = manifest.shard_paths(split)
        self.num_images = manifest.split(split)["images"]
        self.num_classes = manifest.split(split)["classes"]
        self.batch_size = batch_size
        self.decode_images = decode_images
        workers = max(cfg.workers, 1)
        counts = [s["images"] for s in manifest.split(split)["shards"]]
        # This rank's images per the manifest: its workers read the shards i with i % slots in its range.
        self.local_images = sum(n for i, n in enumerate(counts) if (i % (world_size * workers)) // workers == rank)

    def loader(self) -> DataLoader:
        return loader(self, self.cfg.workers)

    def __iter__(self) -> Iterator[EvalBatch]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        slots = self.world_size * workers
        mine = self.shards[self.rank * workers + worker::slots]  # exactly once: no resampling here
        pending: list[tuple[bytes, int, int, str, str, str]] = []
        errors = ReadErrors(int(self.cfg.max_member_mb * 2**20), self.num_classes, self.num_images)
        for record in read_records(mine, errors):
            for (_, image), image_id, item in zip(record["images"], record["image_ids"], record["items"]):
                pending.append((image, record["label"], image_id, record["class"], item, record["shard"]))
                if len(pending) == self.batch_size:
                    yield self._batch(pending, errors)
                    pending = []
        if pending or any(errors.delta_pending()):
            yield self._batch(pending, errors)

    def _batch(self, pending, errors: ReadErrors) -> EvalBatch:
        """The decoded batch; an image that does not decode is counted, logged and left out."""
        images = torch.empty(0, dtype=torch.uint8)
        if self.decode_images and pending:
            images = new_batch(len(pending), self.cfg.image_size)
            good = []
            for entry in pending:
                try:
                    eval_image(entry[0], self.cfg, images[len(good)])
                    good.append(entry)
                except (RuntimeError, ValueError):
                    errors.fault("bad_images", f"{entry[5]}#{entry[4]}", "leaving out image %s of shard %s: it does "
                                 "not decode", entry[4], entry[5])
            pending, images = good, images[:len(good)]
        _, labels, ids, classes, items, _ = zip(*pending) if pending else ((),) * 6
        return EvalBatch(images, torch.tensor(labels, dtype=torch.long), torch.tensor(ids, dtype=torch.long),
                         list(classes), list(items), errors.delta())


def images_by_id(cfg: DataConfig, split: str, wanted) -> dict[int, torch.Tensor]:
    """The evaluation-transformed uint8 images of the given image ids (for plots), one pass over the split."""
    wanted, found = set(int(i) for i in wanted), {}
    for record in read_records(Manifest(cfg.root).shard_paths(split), ReadErrors(int(cfg.max_member_mb * 2**20))):
        for (_, data), image_id in zip(record["images"], record["image_ids"]):
            if image_id in wanted:
                found[image_id] = eval_image(data, cfg)
        if len(found) == len(wanted):
            break
    return found
