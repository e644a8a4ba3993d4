"""The P x K training stream of a rank: its split (read once from the manifest), the epoch's plan, the rank's
checkpointed position, and the read-only reader its DataLoader's workers get (dist_dml.data.train_reader).

Every epoch, the split's records, numbered over its shard list shuffled by (seed, epoch) on every rank alike, are
cut into one contiguous window per (rank, worker) slot, so every record is drawn once per epoch by one slot, however
many shards there are against slots. Every rank yields exactly ``steps_in_epoch(epoch)`` batches, computed from the
manifest; a worker that runs short (its last batch, a corrupt shard) draws again from its own window, so no
collective ever waits on a rank that ran dry. Batch i of an epoch always comes from the same logical worker and is a
function of (seed, epoch, rank, i) alone, which makes resuming exact. One DataLoader runs through the epochs.
"""
from __future__ import annotations

from typing import Iterator

from torch.utils.data import DataLoader

from dist_dml.data.config import DataConfig
from dist_dml.data.grouping import ClassSamplingConfig
from dist_dml.data.loading import loader
from dist_dml.data.opener import is_local
from dist_dml.data.plan import EpochPlan, Segment
from dist_dml.data.position import StreamPosition
from dist_dml.data.train_reader import TrainReader, TrainSplit
from dist_dml.data.verify import Verdicts


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
        self.plan = EpochPlan(self.records, world_size, workers, cfg.classes_per_batch, cfg.seed, self.split.excluded)
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

    def held_out_note(self) -> str | None:
        """What data.val_share holds out of training, in numbers (None without a share)."""
        if self.split.excluded is None:
            return None
        held = self.num_records - self.plan.kept_records
        return (f"data.val_share={self.cfg.val_share} (data.val_seed={self.cfg.val_seed}) holds "
                f"{self.split.held_out_classes} of the {self.num_classes} training classes out: their {held} records "
                f"are never trained on and are validated on as {self.cfg.validation_split!r}; each epoch draws the "
                f"other {self.plan.kept_records}")

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
