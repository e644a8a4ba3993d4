"""Reading class-grouped shards (docs/SHARDS.md): the P x K training stream and the evaluation stream.

Training: the split's shard list is shuffled by (seed, epoch) on every rank alike, then dealt to
(rank, worker) slots; each worker streams records through a seeded shuffle buffer, takes K images
per record and P records per batch. Every rank yields exactly ``steps_in_epoch(epoch)`` batches,
computed from the manifest so that the slot with the fewest records can feed them (records are then
disjoint within the epoch); a worker that still runs short (a corrupt shard, fewer shards than
slots) starts another, reshuffled pass over its shards, so no collective ever waits on a rank that
ran dry. Batch i of an epoch always comes from the same logical worker and is a function of
(seed, epoch, rank, i) alone, which makes resuming exact: a resumed epoch skips the batches already
consumed (reading their records, not decoding them) and yields the very batches the uninterrupted
run would have.

Evaluation: every image of a split exactly once over all ranks and workers, with its label and its
image id (the split-wide index). Only json and image members are read; nothing is unpickled. A
truncated or corrupt shard is logged by name, skipped from the point of damage, and counted.
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

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
    seed: int = 0
    batch_size: int = 0  # per rank; optional, checked against P x K

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
        if self.workers < 0 or self.shuffle_buffer < 1:
            raise ValueError("data.workers must be >= 0 and data.shuffle_buffer >= 1")


class Manifest:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        path = self.root / "manifest.json"
        try:
            self.data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no manifest (write shards with `dist-dml prep`)") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        if self.data.get("format") != FORMAT or self.data.get("version") != VERSION:
            raise ValueError(f"{path}: format {self.data.get('format')!r} version {self.data.get('version')!r}, "
                             f"expected {FORMAT!r} version {VERSION}")

    def split(self, name: str) -> dict:
        splits = self.data["splits"]
        if name not in splits:
            raise KeyError(f"{self.root / 'manifest.json'}: no split {name!r}; it has {sorted(splits)}")
        return splits[name]

    def shard_paths(self, split: str) -> list[str]:
        return [str(self.root / s["name"]) for s in self.split(split)["shards"]]


# --- records ------------------------------------------------------------------------------------

class ReadErrors:
    """Per-worker counts of what could not be read; reported with every batch as a delta."""

    def __init__(self):
        self.corrupt_shards: set[str] = set()
        self.bad_records = 0
        self.unknown_members = 0
        self._reported = (0, 0, 0)

    def handler(self, shard: str):
        """A webdataset exception handler for ``shard``: log once, count, skip the rest of the shard."""

        def handle(exn: Exception) -> bool:
            if shard not in self.corrupt_shards:
                log.warning("skipping the rest of shard %s: %s", shard, exn.args[0] if exn.args else exn)
            self.corrupt_shards.add(shard)
            return True

        return handle

    def delta(self) -> dict[str, int]:
        now = (len(self.corrupt_shards), self.bad_records, self.unknown_members)
        out = {k: a - b for k, a, b in zip(("corrupt_shards", "bad_records", "unknown_members"), now, self._reported)}
        self._reported = now
        return out


def _select(errors: ReadErrors):
    def keep(name: str) -> bool:
        ext = name.rsplit(".", 1)[-1].lower()
        if ext == "json" or ext in IMAGE_EXTENSIONS:
            return True
        errors.unknown_members += 1  # never read, never decoded
        return False

    return keep


def read_records(shards: list[str], errors: ReadErrors) -> Iterator[dict]:
    """Valid records of ``shards`` in order: {label, image_ids, images: [(ext, bytes)], shard}."""
    from webdataset.tariterators import tarfile_samples

    for shard in shards:
        for sample in tarfile_samples([{"url": shard}], handler=errors.handler(shard), select_files=_select(errors)):
            record = _parse_record(sample)
            if record is None:
                errors.bad_records += 1
                log.warning("skipping malformed record %s in shard %s", sample.get("__key__"), shard)
                continue
            yield record


def _parse_record(sample: dict) -> dict | None:
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
    return {"label": label, "image_ids": ids, "images": images, "shard": sample.get("__url__")}


def _slot_shards(shards: list[str], slot: int, slots: int) -> list[str]:
    """The shards of one (rank, worker) slot; with fewer shards than slots, slots share (resample)."""
    if not shards:
        return []
    if len(shards) >= slots:
        return shards[slot::slots]
    return [shards[slot % len(shards)]]


# --- decoding -----------------------------------------------------------------------------------

def decode(data: bytes) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image

    return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def train_transform(cfg: DataConfig):
    """Per image, on uint8: random resized crop and flip (normalisation runs once per batch)."""
    from torchvision.transforms import v2

    return v2.Compose([
        v2.RandomResizedCrop(cfg.image_size, scale=(cfg.min_scale, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
    ])


def eval_transform(cfg: DataConfig):
    """Per image, on uint8: resize and center crop."""
    from torchvision.transforms import v2

    return v2.Compose([v2.Resize(cfg.resize, antialias=True), v2.CenterCrop(cfg.image_size)])


_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255


def stack_for_transfer(images: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack straight into shared memory inside a DataLoader worker: the batch is then handed
    to the main process without the copy that sharing a private tensor costs."""
    out = torch.empty((len(images), *images[0].shape), dtype=images[0].dtype)
    if get_worker_info() is not None:
        out.share_memory_()
    return torch.stack(images, out=out)


def normalize_batch(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) to float32 normalised with ImageNet's mean and std.

    The streams yield uint8 (a quarter of the bytes to move); this runs where the model runs.
    """
    return images.float().sub_(_MEAN.to(images.device)).div_(_STD.to(images.device))


# --- training stream ----------------------------------------------------------------------------

class TrainStream(IterableDataset):
    """P x K batches for one rank; ``steps_per_epoch`` of them per epoch on every rank.

    State: (epoch, step within the epoch). ``state_dict`` / ``load_state_dict`` resume exactly.
    """

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1, decode_images: bool = True,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        cfg.validate()
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        manifest = Manifest(cfg.root)
        self.shards = manifest.shard_paths(cfg.train_split)
        split = manifest.split(cfg.train_split)
        self.num_classes, self.num_images = split["classes"], split["images"]
        self.records = {path: s["records"] for path, s in zip(self.shards, split["shards"])}
        if not self.shards:
            raise ValueError(f"{cfg.root}: split {cfg.train_split!r} has no shards")
        self.decode_images, self.transform = decode_images, transform or train_transform(cfg)
        self.epoch, self.step = 0, 0

    @property
    def slots(self) -> int:
        return self.world_size * max(self.cfg.workers, 1)

    def shard_order(self, epoch: int) -> list[str]:
        order = list(self.shards)
        random.Random(mix(self.cfg.seed, epoch)).shuffle(order)  # identical on every rank
        return order

    def steps_in_epoch(self, epoch: int) -> int:
        """The same on every rank. With at least one shard per (rank, worker) slot, as many steps as
        the slot with the fewest records can feed, so records are disjoint within the epoch; with
        fewer shards, slots share shards and each record is used about once per epoch."""
        workers, p = max(self.cfg.workers, 1), self.cfg.classes_per_batch
        if len(self.shards) < self.slots:
            return max(1, sum(self.records.values()) // (p * self.world_size))
        order = self.shard_order(epoch)
        fewest = min(sum(self.records[s] for s in order[slot::self.slots]) for slot in range(self.slots))
        return max(1, workers * (fewest // p))

    @property
    def steps_per_epoch(self) -> int:
        return self.steps_in_epoch(self.epoch)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["step"])

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.step = epoch, 0

    def loader(self) -> DataLoader:
        """A DataLoader over the rest of the current epoch (create one per epoch)."""
        workers = self.cfg.workers
        return DataLoader(self, batch_size=None, num_workers=workers, persistent_workers=False,
                          prefetch_factor=4 if workers else None)

    def __len__(self) -> int:
        return self.steps_per_epoch - self.step

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers, physical = (info.num_workers, info.id) if info else (1, 0)
        # The DataLoader asks workers in turn from worker 0; after a resume at step s the first
        # batch must come from logical worker s % workers.
        worker = (physical + self.step) % workers
        steps, start = self.steps_per_epoch, self.step
        mine = list(range(worker, steps, workers))  # this logical worker's batch indices
        yield from self._batches(worker, workers, mine, start)

    def _batches(self, worker: int, workers: int, indices: list[int], start: int) -> Iterator[dict]:
        cfg = self.cfg
        rng = random.Random(mix(cfg.seed, self.epoch, self.rank, worker))
        transform = self.transform if self.decode_images else None
        errors = ReadErrors()
        records = self._record_stream(worker, workers, errors, rng)
        for index in indices:
            chosen = []
            for _ in range(cfg.classes_per_batch):
                record = next(records)
                k, have = cfg.images_per_class, len(record["images"])
                picks = rng.sample(range(have), k) if have >= k else [rng.randrange(have) for _ in range(k)]
                chosen.append((record, picks))
            if index < start:
                continue  # consumed before a resume: records read, images not decoded
            # Augmentations draw from torch's RNG, seeded per batch so a resumed epoch matches.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(mix(cfg.seed, self.epoch, self.rank, index))
                yield self._assemble(chosen, transform, errors)

    def _record_stream(self, worker: int, workers: int, errors: ReadErrors, rng: random.Random) -> Iterator[dict]:
        mine = _slot_shards(self.shard_order(self.epoch), self.rank * workers + worker, self.world_size * workers)
        buffer: list[dict] = []
        passes = 0
        while True:
            produced = False
            for record in read_records(mine, errors):
                produced = True
                if len(buffer) < self.cfg.shuffle_buffer:
                    buffer.append(record)
                    continue
                j = rng.randrange(len(buffer))
                buffer[j], record = record, buffer[j]
                yield record
            if not produced and not buffer:
                raise RuntimeError(f"rank {self.rank} worker {worker}: no readable record in shards {mine}")
            # The pass is over: empty the buffer, then resample with another shuffled pass.
            rng.shuffle(buffer)
            yield from buffer
            buffer.clear()
            passes += 1
            mine = list(mine)
            random.Random(mix(self.cfg.seed, self.epoch, self.rank, worker, passes)).shuffle(mine)

    def _assemble(self, chosen, transform, errors: ReadErrors) -> dict:
        labels, ids, images = [], [], []
        for record, picks in chosen:
            for i in picks:
                labels.append(record["label"])
                ids.append(record["image_ids"][i])
                if transform is not None:
                    images.append(transform(decode(record["images"][i][1])))
        batch = {"labels": torch.tensor(labels), "image_ids": torch.tensor(ids), "errors": errors.delta()}
        if transform is not None:
            batch["images"] = stack_for_transfer(images)  # uint8: normalised on the device (normalize_batch)
        return batch


# --- evaluation stream --------------------------------------------------------------------------

class EvalStream(IterableDataset):
    """Every image of ``split`` once over all ranks and workers, in batches of (images, labels, image ids)."""

    def __init__(self, cfg: DataConfig, split: str, rank: int = 0, world_size: int = 1, batch_size: int = 128,
                 decode_images: bool = True):
        self.cfg, self.split, self.rank, self.world_size = cfg, split, rank, world_size
        manifest = Manifest(cfg.root)
        self.shards = manifest.shard_paths(split)
        self.num_images = manifest.split(split)["images"]
        self.batch_size = batch_size
        self.decode_images = decode_images

    def loader(self) -> DataLoader:
        workers = self.cfg.workers
        return DataLoader(self, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        slots = self.world_size * workers
        mine = self.shards[self.rank * workers + worker::slots]  # exactly once: no resampling here
        transform = eval_transform(self.cfg) if self.decode_images else None
        images, labels, ids = [], [], []
        for record in read_records(mine, ReadErrors()):
            for (_, data), image_id in zip(record["images"], record["image_ids"]):
                if transform is not None:
                    images.append(transform(decode(data)))
                labels.append(record["label"])
                ids.append(image_id)
                if len(ids) == self.batch_size:
                    yield self._batch(images, labels, ids)
                    images, labels, ids = [], [], []
        if ids:
            yield self._batch(images, labels, ids)

    def _batch(self, images, labels, ids):
        stacked = stack_for_transfer(images) if images else torch.empty(0, dtype=torch.uint8)
        return stacked, torch.tensor(labels), torch.tensor(ids)


def images_by_id(cfg: DataConfig, split: str, wanted) -> dict[int, torch.Tensor]:
    """The evaluation-transformed uint8 images of the given image ids (for plots), one pass over the split."""
    wanted, found = set(int(i) for i in wanted), {}
    transform = eval_transform(cfg)
    for record in read_records(Manifest(cfg.root).shard_paths(split), ReadErrors()):
        for (_, data), image_id in zip(record["images"], record["image_ids"]):
            if image_id in wanted:
                found[image_id] = transform(decode(data))
        if len(found) == len(wanted):
            break
    return found
