"""The training split as its manifest states it, and the reader of its batches: what a DataLoader's workers get.

One loop (:meth:`TrainReader.worker_batches`) gives every batch of a logical worker; which records form a batch is
a strategy of its own: random (the slot's window through a seeded shuffle buffer) or class-level (near classes from
a pool of the window's records, by the prototypes' snapshots). Both draw from the same window, every record once per
epoch, and replay a resumed epoch without decoding what was consumed.
"""
from __future__ import annotations

import random
from typing import Iterator, NamedTuple

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from dist_dml.data.batch_assembly import BatchAssembler, DataError, with_picks
from dist_dml.data.config import DataConfig
from dist_dml.data.faults import FaultCounter, ReadPolicy
from dist_dml.data.grouping import ClassPool, ClassSamplingConfig, neighbour_picks
from dist_dml.data.held_out import held_out
from dist_dml.data.loading import read_policy
from dist_dml.data.manifest import Manifest
from dist_dml.data.plan import EpochPlan
from dist_dml.data.position import Start
from dist_dml.data.records import read_segments
from dist_dml.data.verify import Verdicts
from dist_dml.infra.errors import UserError
from dist_dml.infra.seeding import mix


class SplitError(UserError):
    """A training split that cannot train, found from its manifest alike on every rank."""

    on_every_rank = True


def single_image_problem(manifest: Manifest, cfg: DataConfig) -> str | None:
    """Why the training split cannot train at all: every record holds a single image (no positive pair) and
    data.self_pairs is off. None otherwise."""
    records = manifest.records(cfg.train_split)
    if cfg.self_pairs or manifest.single_image_records(cfg.train_split) < records:
        return None
    return (f"{manifest.path}: every one of the {records} records of split {cfg.train_split!r} holds a single "
            "image, which gives no positive pair; data.self_pairs=true trains each as two crops of its image")


class TrainSplit(NamedTuple):
    """The training split as its manifest states it: what the stream's reader needs, read once."""

    shards: list[str]
    records: dict[str, int]  # {shard: records}, in the manifest's order
    num_classes: int
    num_images: int
    checksums: dict[str, str] | None  # data.verify_sha256
    sizes: dict[str, int]
    least_single_records: int
    excluded: dict[str, np.ndarray] | None = None  # {shard: its records of classes data.val_share holds out}
    held_out_classes: int = 0

    @classmethod
    def read(cls, cfg: DataConfig) -> "TrainSplit":
        manifest = Manifest(cfg.root, cfg.max_manifest_mb)
        problem = single_image_problem(manifest, cfg)
        if problem:
            raise SplitError(problem)
        shards, split = manifest.shard_paths(cfg.train_split), manifest.split(cfg.train_split)
        held = held_out(manifest, cfg)
        return cls(shards, {path: s["records"] for path, s in zip(shards, split["shards"])}, split["classes"],
                   split["images"], manifest.checksums(cfg.train_split) if cfg.verify_sha256 else None,
                   manifest.sizes(cfg.train_split), manifest.single_image_records(cfg.train_split),
                   held.excluded() if held is not None else None, held.num_classes if held is not None else 0)


class TrainReader(IterableDataset):
    """The batches from a fixed :class:`~dist_dml.data.position.Start` on: what a DataLoader's workers get
    (pickled into each), read-only. Each logical worker reads its slot's window through a seeded shuffle
    buffer (a window that starts mid-shard passes over the shard's first records without reading them),
    takes K images per record and P records per batch.

    Batch i of an epoch always comes from logical worker i % workers (epochs hold a multiple of the workers,
    so one DataLoader serves any number of epochs with the same worker processes) and is a function of (seed,
    epoch, rank, i) alone: a resumed epoch skips the batches already consumed (reading their records, not
    decoding them).

    Class-level batches (class_sampling.share > 0, given ``snapshots``): each logical worker takes its batches
    from a pool of its window's records (grouping.ClassPool) by grouping.neighbour_picks, on the prototypes of
    the snapshot that the batch's global step is bound to (snapshots.SnapshotRing.number), with its own
    seeded generator; a resumed epoch replays the pool by the checkpoint's draws (Start.drawn), never by old
    snapshots."""

    def __init__(self, cfg: DataConfig, split: TrainSplit, plan: EpochPlan, start: Start, epochs: int = 1, *,
                 rank: int = 0, decode_images: bool = True, verdicts: Verdicts | None = None, first_step: int = 0,
                 class_sampling: ClassSamplingConfig | None = None, snapshots=None):
        self.cfg, self.split, self.plan, self.start, self.epochs = cfg, split, plan, start, epochs
        self.rank, self.decode_images, self.verdicts = rank, decode_images, verdicts
        self.assembler = BatchAssembler(cfg, rank, decode_images)
        self.workers = plan.workers
        self.first_step, self.snapshots = first_step, snapshots
        self.class_sampling = class_sampling or ClassSamplingConfig()
        self._epoch_steps: dict[int, int] = {}

    def steps_in_epoch(self, epoch: int) -> int:
        if epoch not in self._epoch_steps:
            self._epoch_steps[epoch] = self.plan.steps(epoch, *self.start.resumed(epoch))
        return self._epoch_steps[epoch]

    def global_step(self, epoch: int, index: int) -> int:
        """The run's step of the batch ``index`` of ``epoch`` (the loader starts at ``first_step``)."""
        first = self.start.epoch
        if epoch == first:
            return self.first_step + index - self.start.step
        return (self.first_step + self.steps_in_epoch(first) - self.start.step
                + sum(self.steps_in_epoch(e) for e in range(first + 1, epoch)) + index)

    @property
    def grouped(self) -> bool:
        """Whether batches are class-level (grouped by prototypes) rather than random."""
        return self.class_sampling.enabled and self.snapshots is not None and not self.plan.shares_records

    def __len__(self) -> int:
        return self.steps_in_epoch(self.start.epoch) - self.start.step

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers, physical = (info.num_workers, info.id) if info else (1, 0)
        assert workers == self.workers, (workers, self.workers)
        # The DataLoader asks its workers in turn, from worker 0; after a resume at step s the first
        # batch must come from logical worker (s - base) % workers, and since every epoch (a resumed
        # layout: from its base) holds a multiple of the workers, each physical worker keeps its logical
        # worker in the epochs after.
        first = self.start.epoch
        worker = (physical + self.start.step - self.start.resumed(first)[0]) % workers
        for epoch in range(first, first + self.epochs):
            yield from self.worker_batches(epoch, worker, self.start.step if epoch == first else 0)

    def worker_batches(self, epoch: int, worker: int, start: int = 0) -> Iterator[dict]:
        """Logical worker ``worker``'s batches of ``epoch`` (indices base + worker, base + worker + workers,
        ...) from index ``start`` on; the ones before are drawn (records read, images not decoded) but not
        yielded. Which records form each batch is the strategy's (random, or near classes)."""
        cfg = self.cfg
        base, layout = self.start.resumed(epoch)
        salt = (base + 1,) if layout is not None else ()  # a resumed layout
        policy = read_policy(cfg, self.split.checksums, self.split.num_classes, self.split.num_images, self.verdicts)
        faults = FaultCounter()
        strategy = NearClassBatches if self.grouped else RandomBatches
        picks = strategy(self, epoch, worker, salt, policy, faults)
        for index in range(base + worker, self.steps_in_epoch(epoch), self.workers):
            if index < start:  # consumed before a resume: records read, images not decoded
                picks.skip(index, start)
                continue
            chosen, extra = picks.take(index)
            # Augmentations draw from their own generator, seeded per batch so a resumed epoch matches.
            batch = self.assembler.assemble(chosen, random.Random(mix(cfg.seed, epoch, self.rank, index, 1, *salt)),
                                            faults)
            yield {**batch, "epoch": epoch, "index": index, **extra}

    def _record_stream(self, epoch: int, worker: int, policy: ReadPolicy, faults: FaultCounter, rng: random.Random,
                       salt: tuple = ()) -> Iterator[dict]:
        """The slot's window through the shuffle buffer, then the same window again (reshuffled) for as
        long as records are asked for. Records carry their epoch ``position`` and whether this is their
        ``first`` draw."""
        buffer: list[dict] = []
        for record in self._window_records(epoch, worker, policy, faults, salt):
            if record is None:  # the pass is over: empty the buffer, then draw again from the window
                rng.shuffle(buffer)
                yield from buffer
                buffer.clear()
                continue
            if len(buffer) < self.cfg.shuffle_buffer:
                buffer.append(record)
                continue
            j = rng.randrange(len(buffer))
            buffer[j], record = record, buffer[j]
            yield record

    def _window_records(self, epoch: int, worker: int, policy: ReadPolicy, faults: FaultCounter,
                        salt: tuple = ()) -> Iterator[dict | None]:
        """The slot's window in read order, pass after pass (each later pass in another order of its segments),
        None at the end of each pass. Records carry their epoch ``position`` and whether this is their
        ``first`` draw; records of a single image are skipped (and counted once) unless data.self_pairs."""
        segments = self.plan.segments(epoch, self.start.resumed(epoch)[1])[self.rank * self.workers + worker]
        offsets = self.plan.offsets(epoch)
        passes = singles = 0
        while True:
            produced = False
            for record in read_segments(segments, policy, faults):
                if len(record["images"]) < 2 and not self.cfg.self_pairs:  # no positive pair in it: skipped
                    singles += 1
                    if passes == 0:  # counted once, however often the window is read
                        faults.tally("single_image_records", "skipping record %d of shard %s: it holds a single "
                                     "image (data.self_pairs=true trains it as two crops of that image)",
                                     record["index"], record["shard"])
                    continue
                produced = True
                record["position"], record["first"] = offsets[record["shard"]] + record["index"], passes == 0
                yield record
            if not produced:
                shards = sorted({shard for shard, _, _ in segments})
                why = (f"its {singles} records hold a single image each (data.self_pairs=true trains them as two "
                       "crops of one image)" if singles else "every shard it reads is unreadable or corrupt (see the "
                       "warnings above)")
                raise DataError(f"rank {self.rank} worker {worker}: no record of the training split to draw from in "
                                f"its window ({len(shards)} shards: {', '.join(shards[:3])}"
                                f"{', ...' if len(shards) > 3 else ''}): {why}")
            yield None
            passes += 1
            segments = list(segments)
            random.Random(mix(self.cfg.seed, epoch, self.rank, worker, passes, *salt)).shuffle(segments)


class RandomBatches:
    """Random batches: P records as the slot's window comes through its seeded shuffle buffer, K images each
    (one generator per worker and epoch for both)."""

    def __init__(self, reader: TrainReader, epoch: int, worker: int, salt: tuple, policy: ReadPolicy,
                 faults: FaultCounter):
        self.cfg = reader.cfg
        self.rng = random.Random(mix(self.cfg.seed, epoch, reader.rank, worker, *salt))
        self.records = reader._record_stream(epoch, worker, policy, faults, self.rng, salt)

    def take(self, index: int) -> tuple[list, dict]:
        """The (record, picks) of batch ``index``, and what the batch reports besides (nothing here)."""
        cfg = self.cfg
        return [with_picks(next(self.records), cfg.images_per_class, self.rng) for _ in range(cfg.classes_per_batch)], {}

    def skip(self, index: int, start: int) -> None:
        self.take(index)


class NearClassBatches:
    """Class-level batches (class_sampling.share > 0): each batch from the worker's pool of its window's records
    (grouping.ClassPool) by grouping.neighbour_picks on the snapshot of the batch's global step, with a generator of
    its own; batches before a resume are replayed by the epoch's draws (Start.drawn), never by old snapshots. Each
    batch reports how many of its records were ``grouped`` (chosen as near classes)."""

    def __init__(self, reader: TrainReader, epoch: int, worker: int, salt: tuple, policy: ReadPolicy,
                 faults: FaultCounter):
        cfg = reader.cfg
        self.reader, self.cfg, self.sampling, self.epoch, self.salt = reader, cfg, reader.class_sampling, epoch, salt
        self.pool = ClassPool(reader._window_records(epoch, worker, policy, faults, salt), cfg.shuffle_buffer)
        self.draws = reader.start.drawn if epoch == reader.start.epoch else None
        self.near, self.who = self.sampling.near(cfg.classes_per_batch), f"rank {reader.rank} worker {worker}: "
        self.wanted = self.neighbours = 0  # within a batch: near records still to choose, and chosen so far

    def skip(self, index: int, start: int) -> None:
        """A batch taken before a resume: the pool moves on by the checkpoint's draws."""
        if self.draws is None:
            raise ValueError(f"{self.who}a class-sampled epoch resumes at step {start} only from a checkpoint's "
                             "draws (StreamPosition.load_state_dict)")
        draws = self.draws
        self.pool.skip(self.cfg.classes_per_batch, lambda r: bool(r["first"] and draws[r["position"]] > 0))

    def take(self, index: int) -> tuple[list, dict]:
        cfg, reader = self.cfg, self.reader
        rng = random.Random(mix(cfg.seed, self.epoch, reader.rank, index, 2, *self.salt))
        step = reader.global_step(self.epoch, index)
        number = reader.snapshots.number(step) if step >= self.sampling.start_step else None
        self.wanted, self.neighbours = (self.near if number is not None else 0), 0
        records = self.pool.take(cfg.classes_per_batch, lambda pool, count: self._choose(pool, count, number, rng))
        return [with_picks(record, cfg.images_per_class, rng) for record in records], {"grouped": self.neighbours}

    def _choose(self, records: list[dict], count: int, number: int | None, rng: random.Random) -> list[int]:
        """The pool's picks: groups in the first round only (a pool smaller than P takes more rounds)."""
        labels = np.fromiter((r["label"] for r in records), np.int64, len(records))
        want, self.wanted = self.wanted, 0
        vectors = self.reader.snapshots.rows(number, labels, self.who) if want > 0 else None
        picks, neighbours = neighbour_picks(labels, vectors, count, want, self.sampling.group, rng)
        self.neighbours += neighbours
        return picks
