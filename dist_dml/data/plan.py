"""The arithmetic of an epoch's layout: each (rank, worker) slot's window of the epoch's records, the
(shard, skip, take) segments that hold it, and the records a resumed epoch has left. Pure functions of
counts: nothing here reads a byte."""
from __future__ import annotations

import bisect
import math
import random

import numpy as np

from dist_dml.infra.seeding import mix

Segment = tuple[str, int, int]  # (shard, records to skip, records to take)


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


class EpochPlan:
    """The layout of a training split's epochs over (rank, worker) slots, from the manifest's counts alone
    (testable without reading a byte): each epoch's shard order (shuffled by (seed, epoch), the same on
    every rank), each slot's window of the epoch's records and the segments that hold it, and the steps
    every rank takes. A *resumed layout* of one epoch (a resume at another world size) cuts the records
    its ``drawn`` mask leaves over the slots, from its ``base`` step on. Records ``excluded`` marks (the classes
    data.val_share holds out) are in no epoch: the windows cut the others alone."""

    def __init__(self, records: dict[str, int], world_size: int, workers: int, classes_per_batch: int, seed: int,
                 excluded: dict[str, np.ndarray] | None = None):
        self.records = records  # {shard: records}, in the manifest's order
        self.shards = list(records)
        self.world_size, self.workers, self.per_batch, self.seed = world_size, workers, classes_per_batch, seed
        self.excluded = excluded  # {shard: a mask of its records left out of every epoch}, or None
        self.kept_records = sum(records.values()) - (sum(int(m.sum()) for m in excluded.values()) if excluded else 0)
        self._windows: dict[tuple, list[list[Segment]]] = {}

    @property
    def slots(self) -> int:
        return self.world_size * self.workers

    @property
    def shares_records(self) -> bool:
        """Whether windows are widened over each other (fewer than P records per slot): slots share records."""
        return self.kept_records // self.slots < self.per_batch

    def shard_order(self, epoch: int) -> list[str]:
        order = list(self.shards)
        random.Random(mix(self.seed, epoch)).shuffle(order)  # identical on every rank
        return order

    def offsets(self, epoch: int) -> dict[str, int]:
        """Each shard's first position in the epoch's numbering of records."""
        out, start = {}, 0
        for shard in self.shard_order(epoch):
            out[shard] = start
            start += self.records[shard]
        return out

    def kept(self, epoch: int) -> np.ndarray | None:
        """Which records of the epoch (numbered over its shard order) it holds; None where it holds them all."""
        if self.excluded is None:
            return None
        return ~np.concatenate([self.excluded[s] for s in self.shard_order(epoch)])

    def segments(self, epoch: int, drawn: np.ndarray | None = None) -> list[list[Segment]]:
        """Per (rank, worker) slot, the (shard, skip, take) parts of its window of the epoch's records; with
        ``drawn`` (a resumed layout), of the records it marks False."""
        key = (epoch, drawn is not None)
        if key not in self._windows:
            order = self.shard_order(epoch)
            counts = [self.records[s] for s in order]
            firsts = None
            kept = self.kept(epoch)
            if kept is not None:
                drawn = ~kept if drawn is None else np.asarray(drawn, bool) | ~kept
            if drawn is not None:
                order, counts, firsts = undrawn_runs(order, counts, drawn)
            windows = record_windows(counts, self.slots, self.per_batch)
            self._windows = {key: [window_segments(order, counts, w, firsts) for w in windows]}  # keep one
        return self._windows[key]

    def steps(self, epoch: int, base: int = 0, drawn: np.ndarray | None = None) -> int:
        """The epoch's steps, the same on every rank: each logical worker yields enough batches for the longest
        window (windows differ by one record at most), after a resumed layout's ``base`` step; a multiple of
        the workers from that base."""
        longest = max(sum(take for _, _, take in segments) for segments in self.segments(epoch, drawn))
        return base + self.workers * math.ceil(longest / self.per_batch)

    def fetched_records(self, epoch: int, drawn: np.ndarray | None = None) -> int:
        """Records an epoch reads from streams that cannot seek: each window's part of a shard is read from
        the shard's first record."""
        return sum(skip + take for segments in self.segments(epoch, drawn) for _, skip, take in segments)
