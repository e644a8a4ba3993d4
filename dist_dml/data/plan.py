"""The arithmetic of an epoch's layout: each (rank, worker) slot's window of the epoch's records, the
(shard, skip, take) segments that hold it, and the records a resumed epoch has left. Pure functions of
counts: nothing here reads a byte."""
from __future__ import annotations

import bisect

import numpy as np

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
