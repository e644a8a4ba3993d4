"""The evaluation stream: every image of a split exactly once over all ranks and workers, with its label, its image id
(the split-wide index), its class and its item (source path or id); an image that does not decode is counted and
left out."""
from __future__ import annotations

from typing import Iterator, NamedTuple

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dist_dml.data.batch_assembly import why_unused
from dist_dml.data.config import DataConfig
from dist_dml.data.faults import FaultCounter, ReadPolicy
from dist_dml.data.held_out import held_out, is_held_out
from dist_dml.data.images import eval_image, new_batch
from dist_dml.data.loading import loader, read_policy
from dist_dml.data.manifest import Manifest
from dist_dml.data.records import read_records
from dist_dml.data.verify import Verdicts


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
    """Every image of ``split`` once over all ranks and workers, in :class:`EvalBatch` es. ``split`` may name
    the classes data.val_share holds out of the training split (held_out.held_out_name): the training shards are
    read and only their records kept, renumbered as a split of their own."""

    def __init__(self, cfg: DataConfig, split: str, rank: int = 0, world_size: int = 1, batch_size: int = 128,
                 decode_images: bool = True, verdicts: Verdicts | None = None):
        self.cfg, self.split, self.rank, self.world_size = cfg, split, rank, world_size
        self.verdicts = verdicts if verdicts is not None else Verdicts()  # the job's (data.verify_sha256)
        manifest = Manifest(cfg.root, cfg.max_manifest_mb)
        # The held-out classes (a split of their own), or the training split without them (as training sees it)
        self.held_out = held_out(manifest, cfg) if is_held_out(split) or split == cfg.train_split else None
        self.trained_only = self.held_out is not None and not is_held_out(split)
        read = cfg.train_split if self.held_out is not None else split  # the split whose shards are read
        self.shards = manifest.shard_paths(read)
        self.read_images, self.read_classes = manifest.split(read)["images"], manifest.split(read)["classes"]
        self.num_images, self.num_classes = self.read_images, self.read_classes
        counts = [s["images"] for s in manifest.split(read)["shards"]]
        if self.held_out is not None and not self.trained_only:
            self.num_images, self.num_classes = self.held_out.num_images, self.held_out.num_classes
            counts = [self.held_out.shard_images(shard) for shard in self.shards]
        elif self.trained_only:  # numbered as in the training split, the held-out classes' ids left unused
            self.num_images -= self.held_out.num_images
            self.num_classes -= self.held_out.num_classes
            counts = [n - self.held_out.shard_images(shard) for shard, n in zip(self.shards, counts)]
        self.checksums = manifest.checksums(read) if cfg.verify_sha256 else None
        self.sizes = manifest.sizes(read)
        self.batch_size = batch_size
        self.decode_images = decode_images
        workers = max(cfg.workers, 1)
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
        policy = read_policy(self.cfg, self.checksums, self.read_classes, self.read_images, self.verdicts)
        faults = FaultCounter()
        for record in self._records(mine, policy, faults):
            for (_, image), image_id, item in zip(record["images"], record["image_ids"], record["items"]):
                pending.append((image, record["label"], image_id, record["class"], item, record["shard"]))
                if len(pending) == self.batch_size:
                    yield self._batch(pending, faults)
                    pending = []
        if pending or any(faults.delta_pending()):
            yield self._batch(pending, faults)

    def _records(self, shards: list[str], policy: ReadPolicy, faults: FaultCounter) -> Iterator[dict]:
        """The split's records; of held-out classes, the training records of those classes, renumbered; of the
        training split with classes held out, the others."""
        if self.held_out is None:
            yield from read_records(shards, policy, faults)
            return
        if self.trained_only:
            yield from (r for r in read_records(shards, policy, faults) if self.held_out.renumber(r) is None)
            return
        ranges = ReadPolicy(classes=self.num_classes, images=self.num_images)
        for record in read_records(shards, policy, faults):
            record = self.held_out.renumber(record)
            problem = record and ranges.range_problem(record)
            if problem:  # a record whose image ids disagree with the manifest's class table
                faults.fault("bad_labels", f"{record['shard']}#{record['index']}", "skipping record %s of shard %s: "
                             "%s of the held-out classes", record["index"], record["shard"], problem)
            elif record is not None:
                yield record

    def _batch(self, pending, faults: FaultCounter) -> EvalBatch:
        """The decoded batch; an image that does not decode is counted, logged and left out."""
        images = torch.empty(0, dtype=torch.uint8)
        if self.decode_images and pending:
            images = new_batch(len(pending), self.cfg.image_size)
            good = []
            for entry in pending:
                try:
                    eval_image(entry[0], self.cfg, images[len(good)])
                    good.append(entry)
                except (RuntimeError, ValueError) as exc:
                    faults.fault("bad_images", f"{entry[5]}#{entry[4]}", "leaving out image %s of shard %s: %s",
                                 entry[4], entry[5], why_unused(exc))
            pending, images = good, images[:len(good)]
        _, labels, ids, classes, items, _ = zip(*pending) if pending else ((),) * 6
        return EvalBatch(images, torch.tensor(labels, dtype=torch.long), torch.tensor(ids, dtype=torch.long),
                         list(classes), list(items), faults.delta())


def images_by_id(cfg: DataConfig, split: str, wanted, verdicts: Verdicts | None = None) -> dict[int, torch.Tensor]:
    """The evaluation-transformed uint8 images of the given image ids (for plots), one pass over the split."""
    wanted, found = set(int(i) for i in wanted), {}
    stream = EvalStream(cfg, split, decode_images=False, verdicts=verdicts)
    policy = read_policy(cfg, stream.checksums, verdicts=stream.verdicts)
    for record in stream._records(stream.shards, policy, FaultCounter()):
        for (_, data), image_id in zip(record["images"], record["image_ids"]):
            if image_id in wanted:
                found[image_id] = eval_image(data, cfg)
        if len(found) == len(wanted):
            break
    return found
