"""The P x K training stream and the evaluation stream over shards, and their DataLoader.

Training: every epoch, the split's records, numbered over its shard list shuffled by (seed, epoch) on
every rank alike, are cut into one contiguous window per (rank, worker) slot, so every record is drawn
once per epoch by one slot, however many shards there are against slots; each worker streams its
window through a seeded shuffle buffer, takes K images per record and P records per batch. Every rank
yields exactly ``steps_in_epoch(epoch)`` batches, computed from the manifest; a worker that runs short
(its last batch, a corrupt shard) draws again from its own window, so no collective ever waits on a
rank that ran dry. Batch i of an epoch always comes from the same logical worker and is a function of
(seed, epoch, rank, i) alone, which makes resuming exact. One DataLoader runs through the epochs.

Evaluation: every image of a split exactly once over all ranks and workers, with its label and its
image id (the split-wide index).
"""
from __future__ import annotations

import ctypes
import functools
import os
import random
import signal
import sys
from typing import Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dist_dml.data.config import DataConfig
from dist_dml.data.images import ImageTooLarge, eval_image, import_decoders, new_batch, train_image
from dist_dml.data.manifest import Manifest
from dist_dml.data.opener import ShardCache, is_local
from dist_dml.data.faults import ReadErrors
from dist_dml.data.grouping import ClassPool, ClassSamplingConfig, neighbour_picks
from dist_dml.data.plan import EpochPlan, Segment
from dist_dml.data.position import Start, StreamPosition
from dist_dml.data.records import read_records, read_segments
from dist_dml.data.snapshots import PREFETCH
from dist_dml.data.verify import Verdicts, verify_shards
from dist_dml.errors import UserError
from dist_dml.seeding import mix

class DataError(UserError):
    """The data cannot give a batch at all (every record of a slot unreadable, or single-image)."""


class SplitError(UserError):
    """A training split that cannot train, found from its manifest alike on every rank."""

    on_every_rank = True


# --- loading ------------------------------------------------------------------------------------

def read_errors(cfg: DataConfig, checksums: dict[str, str] | None, classes: int | None = None,
                images: int | None = None, verdicts: Verdicts | None = None) -> ReadErrors:
    """A worker's fault counter with the config's limits, retries, (data.verify_sha256) checksums and the
    job's verdicts on them, and (data.cache_dir) local copies of remote shards."""
    return ReadErrors(int(cfg.max_member_mb * 2**20), classes, images, retries=cfg.read_retries,
                      backoff_s=cfg.retry_backoff_s, checksums=checksums, cache=shard_cache(cfg), verdicts=verdicts)


def single_image_problem(manifest: Manifest, cfg: DataConfig) -> str | None:
    """Why the training split cannot train at all: every record holds a single image (no positive pair) and
    data.self_pairs is off. None otherwise."""
    records = manifest.records(cfg.train_split)
    if cfg.self_pairs or manifest.single_image_records(cfg.train_split) < records:
        return None
    return (f"{manifest.path}: every one of the {records} records of split {cfg.train_split!r} holds a single "
            "image, which gives no positive pair; data.self_pairs=true trains each as two crops of its image")


def shard_cache(cfg: DataConfig) -> ShardCache | None:
    """data.cache_dir's cache of remote shards (None for a local root or without one)."""
    if not cfg.cache_dir or is_local(str(cfg.root)):
        return None
    return ShardCache(cfg.cache_dir, int(cfg.cache_gb * 2**30))


def verify(stream: "TrainStream | EvalStream", ctx, what: str) -> None:
    """data.verify_sha256: the stream's shards checked once for the job, over ctx's ranks, before a loader
    forks the workers that read them (verify.verify_shards), into the stream's verdicts. Call on every rank."""
    if stream.checksums:
        verify_shards(stream.checksums, stream.sizes, ctx, what, stream.verdicts, cache=shard_cache(stream.cfg))


def loader(dataset: IterableDataset, workers: int) -> DataLoader:
    """A DataLoader over a stream that yields whole batches; its workers die with this process and start with
    the decoders imported (import_decoders)."""
    if workers and getattr(dataset, "decode_images", True):
        import_decoders()
    return DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=False,
                      prefetch_factor=PREFETCH if workers else None,
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

class TrainSplit(NamedTuple):
    """The training split as its manifest states it: what the stream's reader needs, read once."""

    shards: list[str]
    records: dict[str, int]  # {shard: records}, in the manifest's order
    num_classes: int
    num_images: int
    checksums: dict[str, str] | None  # data.verify_sha256
    sizes: dict[str, int]
    least_single_records: int

    @classmethod
    def read(cls, cfg: DataConfig) -> "TrainSplit":
        manifest = Manifest(cfg.root, cfg.max_manifest_mb)
        problem = single_image_problem(manifest, cfg)
        if problem:
            raise SplitError(problem)
        shards, split = manifest.shard_paths(cfg.train_split), manifest.split(cfg.train_split)
        return cls(shards, {path: s["records"] for path, s in zip(shards, split["shards"])}, split["classes"],
                   split["images"], manifest.checksums(cfg.train_split) if cfg.verify_sha256 else None,
                   manifest.sizes(cfg.train_split), manifest.single_image_records(cfg.train_split))


class TrainStream:
    """P x K batches for one rank; ``steps_in_epoch(epoch)`` of them per epoch, the same on every rank. Three
    parts: the epoch's layout (:class:`~dist_dml.data.plan.EpochPlan`: shard order, windows, steps), the
    rank's checkpointed position (:class:`~dist_dml.data.position.StreamPosition`), and the read-only
    dataset a loader's workers read from (:class:`TrainReader`), given the position a loader starts at.

    Coverage. An epoch's records, numbered over the split's shard list shuffled by (seed, epoch), are
    cut into one contiguous window per (rank, worker) slot, whatever the number of shards against slots:
    every record is drawn in every epoch, by one slot only. Each logical worker yields the epoch's steps
    divided by the workers, so the last batch of a slot is filled with records drawn again from its own
    window; a slot that runs short (a corrupt shard) draws again from its window the same way, so no
    collective ever waits on a rank that ran dry. Batch i of an epoch is a function of (seed, epoch, rank,
    i) alone, which makes resuming exact (see TrainReader)."""

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1, decode_images: bool = True,
                 verdicts: Verdicts | None = None, class_sampling: ClassSamplingConfig | None = None):
        """``verdicts``: the job's sha256 verdicts (data.verify_sha256), shared with its evaluation streams;
        ``class_sampling``: the run's section (batches of near classes, given prototypes' snapshots)."""
        cfg.validate()
        self.class_sampling = class_sampling or ClassSamplingConfig()
        self.verdicts = verdicts if verdicts is not None else Verdicts()
        self.cfg, self.rank, self.world_size, self.decode_images = cfg, rank, world_size, decode_images
        self.split = TrainSplit.read(cfg)
        self.shards, self.records, self.checksums, self.sizes = (self.split.shards, self.split.records,
                                                                 self.split.checksums, self.split.sizes)
        self.num_classes, self.num_images = self.split.num_classes, self.split.num_images
        self.num_records = sum(self.records.values())
        workers = max(cfg.workers, 1)  # logical workers per rank (a DataLoader without worker processes is one)
        self.plan = EpochPlan(self.records, world_size, workers, cfg.classes_per_batch, cfg.seed)
        self.position = StreamPosition(self.plan, {
            "world_size": world_size, "workers": workers, "classes_per_batch": cfg.classes_per_batch,
            "shuffle_buffer": cfg.shuffle_buffer, "seed": cfg.seed, "records": self.num_records})

    @property
    def slots(self) -> int:
        return self.plan.slots

    def shard_order(self, epoch: int) -> list[str]:
        return self.plan.shard_order(epoch)

    def slot_segments(self, epoch: int) -> list[list[Segment]]:
        """Per (rank, worker) slot, its window's segments of ``epoch`` (of the records not yet drawn, in a
        resumed layout): the plan's."""
        return self.plan.segments(epoch, self.position.resumed(epoch)[1])

    def steps_in_epoch(self, epoch: int) -> int:
        return self.position.steps_in_epoch(epoch)

    def remaining_steps(self, epochs: int) -> int:
        return self.position.remaining_steps(epochs)

    def fetched_records(self, epoch: int) -> int:
        """Records an epoch reads from streams that cannot seek (the plan's)."""
        return self.plan.fetched_records(epoch, self.position.resumed(epoch)[1])

    def layout_note(self) -> str | None:
        """A warning where there are fewer shards than (rank x worker) slots, with the numbers; for shards
        read over the network (a stream cannot seek, so a window that starts inside a shard reads and drops
        the records before it) also how many times the dataset each epoch fetches."""
        if len(self.shards) >= self.slots:
            return None
        per_slot = self.num_records / self.slots
        note = (f"{len(self.shards)} training shards for {self.slots} (rank x worker) slots "
                f"({self.world_size} ranks x {self.plan.workers} workers): slots share shards, each reading a "
                f"window of about {per_slot:.0f} records; with at least {self.slots} shards every slot reads "
                f"whole shards of its own (dist-dml prep --min-shards {self.slots})")
        if not is_local(self.shards[0]) and not self.cfg.cache_dir:
            fetched = self.fetched_records(self.position.epoch)
            note += (f". These shards are remote: a window that starts inside a shard streams it from its start, "
                     f"so an epoch fetches {fetched} records to draw {self.num_records} "
                     f"({fetched / self.num_records:.1f}x the dataset over the network; data.cache_dir fetches "
                     "each shard once per machine)")
        return note

    def class_sampling_note(self) -> str | None:
        """A warning where class_sampling is on but cannot act: windows so small that slots share records."""
        if self.class_sampling.enabled and self.plan.shares_records:
            return (f"class_sampling.share={self.class_sampling.share} is not applied: the {self.num_records} "
                    f"training records give fewer than data.classes_per_batch={self.cfg.classes_per_batch} per "
                    f"(rank x worker) slot ({self.slots}), so slots share records and batches stay random")
        return None

    def single_image_note(self) -> str | None:
        """A warning about records of a single image, from the manifest's counts alone (single_image_problem
        has refused a split of nothing else)."""
        least = self.split.least_single_records
        if not least:
            return None
        what = ("trained as two crops of their image (data.self_pairs)" if self.cfg.self_pairs else
                "skipped and counted as single_image_records (data.self_pairs=true trains them as two crops of "
                "their image)")
        return (f"the manifest's counts say at least {least} of the {self.num_records} records of split "
                f"{self.cfg.train_split!r} hold a single image: {what}")

    def reader(self, epochs: int = 1, first_step: int = 0, snapshots=None) -> "TrainReader":
        """The read-only dataset of the batches from the position on, through the end of epoch
        ``epoch + epochs - 1``. ``first_step``: the run's global step at the position; ``snapshots``: the
        prototypes' snapshots class-level batches are chosen by (snapshots.SnapshotRing; None: random batches)."""
        return TrainReader(self.cfg, self.split, self.plan, self.position.start, epochs, rank=self.rank,
                           decode_images=self.decode_images, verdicts=self.verdicts, first_step=first_step,
                           class_sampling=self.class_sampling, snapshots=snapshots)

    def loader(self, epochs: int = 1, first_step: int = 0, snapshots=None) -> DataLoader:
        """A DataLoader from the position through the end of epoch ``epoch + epochs - 1``, whose worker
        processes move from one epoch to the next themselves (training passes a large ``epochs`` and
        stops when it has its steps). Every batch names its ``epoch`` and ``index``."""
        return loader(self.reader(epochs, first_step, snapshots), self.cfg.workers)

    def worker_batches(self, epoch: int, worker: int, start: int = 0, snapshots=None,
                       first_step: int = 0) -> Iterator[dict]:
        """Logical worker ``worker``'s batches of ``epoch`` from index ``start`` on (see TrainReader)."""
        return self.reader(first_step=first_step, snapshots=snapshots).worker_batches(epoch, worker, start)


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
        yielded."""
        if self.grouped:
            yield from self._grouped_batches(epoch, worker, start)
            return
        cfg = self.cfg
        base, drawn = self.start.resumed(epoch)
        salt = (base + 1,) if drawn is not None else ()  # a resumed layout
        rng = random.Random(mix(cfg.seed, epoch, self.rank, worker, *salt))
        errors = read_errors(cfg, self.split.checksums, self.split.num_classes, self.split.num_images, self.verdicts)
        records = self._record_stream(epoch, worker, errors, rng, salt)
        for index in range(base + worker, self.steps_in_epoch(epoch), self.workers):
            chosen = [_with_picks(next(records), cfg.images_per_class, rng) for _ in range(cfg.classes_per_batch)]
            if index < start:
                continue  # consumed before a resume: records read, images not decoded
            # Augmentations draw from their own generator, seeded per batch so a resumed epoch matches.
            batch = self._assemble(chosen, random.Random(mix(cfg.seed, epoch, self.rank, index, 1, *salt)), errors)
            yield {**batch, "epoch": epoch, "index": index}

    def _grouped_batches(self, epoch: int, worker: int, start: int = 0) -> Iterator[dict]:
        """worker_batches with class_sampling: each batch from the worker's pool by grouping.neighbour_picks on
        the snapshot of the batch's global step; batches before ``start`` replayed by the epoch's draws."""
        cfg, cs, snapshots = self.cfg, self.class_sampling, self.snapshots
        base, layout = self.start.resumed(epoch)
        salt = (base + 1,) if layout is not None else ()  # a resumed layout
        errors = read_errors(cfg, self.split.checksums, self.split.num_classes, self.split.num_images, self.verdicts)
        pool = ClassPool(self._window_records(epoch, worker, errors, salt), cfg.shuffle_buffer)
        draws = self.start.drawn if epoch == self.start.epoch else None
        near, who = cs.near(cfg.classes_per_batch), f"rank {self.rank} worker {worker}: "
        for index in range(base + worker, self.steps_in_epoch(epoch), self.workers):
            if index < start:  # taken before a resume: the pool moves on by the checkpoint's draws
                if draws is None:
                    raise ValueError(f"{who}a class-sampled epoch resumes at step {start} only from a checkpoint's "
                                     "draws (StreamPosition.load_state_dict)")
                pool.skip(cfg.classes_per_batch, lambda r: bool(r["first"] and draws[r["position"]] > 0))
                continue
            rng = random.Random(mix(cfg.seed, epoch, self.rank, index, 2, *salt))
            step = self.global_step(epoch, index)
            number = snapshots.number(step) if step >= cs.start_step else None
            state = {"near": near if number is not None else 0, "neighbours": 0}

            def choose(records: list[dict], count: int) -> list[int]:
                """The pool's picks: groups in the first round only (a pool smaller than P takes more rounds)."""
                labels = np.fromiter((r["label"] for r in records), np.int64, len(records))
                want, state["near"] = state["near"], 0
                vectors = snapshots.rows(number, labels, who) if want > 0 else None
                picks, neighbours = neighbour_picks(labels, vectors, count, want, cs.group, rng)
                state["neighbours"] += neighbours
                return picks

            records = pool.take(cfg.classes_per_batch, choose)
            chosen = [_with_picks(record, cfg.images_per_class, rng) for record in records]
            batch = self._assemble(chosen, random.Random(mix(cfg.seed, epoch, self.rank, index, 1, *salt)), errors)
            yield {**batch, "epoch": epoch, "index": index, "grouped": state["neighbours"]}

    def _record_stream(self, epoch: int, worker: int, errors: ReadErrors, rng: random.Random,
                       salt: tuple = ()) -> Iterator[dict]:
        """The slot's window through the shuffle buffer, then the same window again (reshuffled) for as
        long as records are asked for. Records carry their epoch ``position`` and whether this is their
        ``first`` draw."""
        buffer: list[dict] = []
        for record in self._window_records(epoch, worker, errors, salt):
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

    def _window_records(self, epoch: int, worker: int, errors: ReadErrors, salt: tuple = ()) -> Iterator[dict | None]:
        """The slot's window in read order, pass after pass (each later pass in another order of its segments),
        None at the end of each pass. Records carry their epoch ``position`` and whether this is their
        ``first`` draw; records of a single image are skipped (and counted once) unless data.self_pairs."""
        segments = self.plan.segments(epoch, self.start.resumed(epoch)[1])[self.rank * self.workers + worker]
        offsets = self.plan.offsets(epoch)
        passes = singles = 0
        while True:
            produced = False
            for record in read_segments(segments, errors):
                if len(record["images"]) < 2 and not self.cfg.self_pairs:  # no positive pair in it: skipped
                    singles += 1
                    if passes == 0:  # counted once, however often the window is read
                        errors.tally("single_image_records", "skipping record %d of shard %s: it holds a single "
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
                raise DataError(f"rank {self.rank}: no record of a batch has 2 decodable images (shards "
                                f"{', '.join(sorted({record['shard'] for record, _ in chosen}))}): see the warnings above")
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
            except (RuntimeError, ValueError) as exc:
                bad.add(i)
                errors.fault("bad_images", f"{record['shard']}#{record['items'][i]}", "skipping image %s of shard "
                             "%s: %s", record["items"][i], record["shard"], _why(exc))
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


def _with_picks(record: dict, k: int, rng: random.Random) -> tuple[dict, list[int]]:
    """(record, the K of its images a batch takes): K distinct ones where it has K, else K drawn with repeats."""
    have = len(record["images"])
    return record, rng.sample(range(have), k) if have >= k else [rng.randrange(have) for _ in range(k)]


def _why(exc: Exception) -> str:
    """Why an image was not used, for the fault's log line: the size refused, else that it does not decode."""
    return str(exc) if isinstance(exc, ImageTooLarge) else "it does not decode"


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
                 decode_images: bool = True, verdicts: Verdicts | None = None):
        self.cfg, self.split, self.rank, self.world_size = cfg, split, rank, world_size
        self.verdicts = verdicts if verdicts is not None else Verdicts()  # the job's (data.verify_sha256)
        manifest = Manifest(cfg.root, cfg.max_manifest_mb)
        self.shards = manifest.shard_paths(split)
        self.num_images = manifest.split(split)["images"]
        self.num_classes = manifest.split(split)["classes"]
        self.checksums = manifest.checksums(split) if cfg.verify_sha256 else None
        self.sizes = manifest.sizes(split)
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
        errors = read_errors(self.cfg, self.checksums, self.num_classes, self.num_images, self.verdicts)
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
                except (RuntimeError, ValueError) as exc:
                    errors.fault("bad_images", f"{entry[5]}#{entry[4]}", "leaving out image %s of shard %s: %s",
                                 entry[4], entry[5], _why(exc))
            pending, images = good, images[:len(good)]
        _, labels, ids, classes, items, _ = zip(*pending) if pending else ((),) * 6
        return EvalBatch(images, torch.tensor(labels, dtype=torch.long), torch.tensor(ids, dtype=torch.long),
                         list(classes), list(items), errors.delta())


def images_by_id(cfg: DataConfig, split: str, wanted, verdicts: Verdicts | None = None) -> dict[int, torch.Tensor]:
    """The evaluation-transformed uint8 images of the given image ids (for plots), one pass over the split."""
    wanted, found = set(int(i) for i in wanted), {}
    manifest = Manifest(cfg.root, cfg.max_manifest_mb)
    checksums = manifest.checksums(split) if cfg.verify_sha256 else None
    for record in read_records(manifest.shard_paths(split), read_errors(cfg, checksums, verdicts=verdicts)):
        for (_, data), image_id in zip(record["images"], record["image_ids"]):
            if image_id in wanted:
                found[image_id] = eval_image(data, cfg)
        if len(found) == len(wanted):
            break
    return found
