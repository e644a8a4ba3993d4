"""Class-level batches from the stream (DESIGN.md, "Sampling classes"): the rule that picks a batch's records
from a worker's pool of records by the classes' prototypes, the pool itself, and the `class_sampling` section.

A random global batch of a few hundred classes out of 10^5-10^6 holds almost no classes that look alike, so
nearly every negative is easy whatever the pair sampler does. Here a share of each batch is built from
*groups of near classes*: a seed record drawn at random from the pool, then the records of the pool whose
classes' prototypes are nearest the seed's (one record per class, classes not in the batch yet). The pool is
the worker's shuffle buffer, a random sample of the catalogue, so its nearest classes are far harder than
random ones at any catalogue size; nothing needs random access to the shards.

Coverage stays the reader's: the pool holds the records of the worker's window in its first pass, each record
leaves it once, and the pool is emptied before the window's records are read again (to fill the epoch's last
batch). Numpy only (and the names of the storage dtypes).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from dist_dml.infra.dtypes import DTYPES

@dataclass(frozen=True)
class ClassSamplingConfig:
    """Class-level batches: a share of each batch built from groups of near classes, chosen by the class
    prototypes (off at share 0)."""

    share: float = 0.0  # share of each batch's records chosen as groups of near classes (0: random batches, off)
    group: int = 4  # records per group: a random seed record and the records of its group - 1 nearest classes
    refresh_steps: int = 50  # the loader's workers see the prototypes as of a snapshot refreshed every this many steps
    start_step: int = 0  # batches before this step are random (they are random anyway until prototypes exist)
    momentum: float = 0.9  # a prototype's moving average: p <- normalise(m p + (1 - m) class mean in the batch)
    dtype: str = "fp16"  # how the prototypes and their snapshots are stored: fp16, bf16 or fp32

    @property
    def enabled(self) -> bool:
        return self.share > 0

    def validate(self) -> None:
        if not 0 <= self.share <= 1:
            raise ValueError(f"class_sampling.share must be in [0, 1] (0: off), got {self.share}")
        if self.group < 2:
            raise ValueError(f"class_sampling.group must be at least 2 (a seed and its nearest class), got "
                             f"{self.group}")
        if self.refresh_steps < 1 or self.start_step < 0:
            raise ValueError(f"class_sampling.refresh_steps must be >= 1 and class_sampling.start_step >= 0, got "
                             f"{self.refresh_steps} and {self.start_step}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"class_sampling.momentum must be in [0, 1), got {self.momentum}")
        if self.dtype not in DTYPES:
            raise ValueError(f"class_sampling.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")

    def near(self, per_batch: int) -> int:
        """Records of a P-record batch chosen by neighbourhood."""
        return int(round(self.share * per_batch))


def neighbour_picks(labels: np.ndarray, vectors: np.ndarray | None, count: int, near: int, group: int,
                    rng: random.Random) -> tuple[list[int], int]:
    """Indices into a pool of ``count`` records (all of them where it holds fewer), in the order picked, and how
    many of them were picked for their prototype's similarity to a seed's.

    ``labels[i]`` is the class of the pool's record i and ``vectors[i]`` its class's prototype (a zero row:
    none yet; ``vectors`` None: no prototypes at all, a random batch). The first ``near`` picks come in groups:
    a seed record uniformly among those not picked, then, where the seed's class has a prototype, the
    records of the ``group - 1`` classes with the highest prototype similarity to it (one record per class, none
    of a class the batch holds already, ties to the lower index). The rest are uniform among those not picked."""
    total = min(count, len(labels))
    free = np.ones(len(labels), bool)
    picks: list[int] = []
    used: set[int] = set()
    neighbours = 0

    def take(i: int) -> None:
        free[i] = False
        picks.append(i)
        used.add(int(labels[i]))

    def uniform() -> int:
        options = np.flatnonzero(free)
        return int(options[rng.randrange(len(options))])

    if vectors is not None and near > 0:
        has = np.any(vectors != 0, axis=1)
        near = min(near, total)
        while len(picks) < near:
            seed = uniform()
            take(seed)
            want = min(group - 1, near - len(picks))
            if not has[seed] or want <= 0:
                continue
            candidates = np.flatnonzero(free & has & ~np.isin(labels, np.fromiter(used, np.int64, len(used))))
            if not len(candidates):
                continue
            similarity = (vectors @ vectors[seed])[candidates]
            for i in _nearest_classes(candidates, similarity, labels, want):
                take(int(i))
                neighbours += 1
    while len(picks) < total:
        take(uniform())
    return picks, neighbours


def _nearest_classes(candidates: np.ndarray, similarity: np.ndarray, labels: np.ndarray, want: int) -> np.ndarray:
    """The best record of each of the ``want`` classes with the most similar records (ties to the lower index).
    Sorts only the candidates at or above the 8 x want-th highest similarity (all of them where that does not
    give ``want`` classes): the same answer, without sorting a pool of thousands whole."""
    def best(c: np.ndarray, s: np.ndarray) -> np.ndarray:
        ranked = c[np.lexsort((c, -s))]
        _, first = np.unique(labels[ranked], return_index=True)  # each class's best record
        return ranked[np.sort(first)][:want]

    m = 8 * want
    if m < len(candidates):
        threshold = np.partition(similarity, len(similarity) - m)[len(similarity) - m]
        top = similarity >= threshold  # every candidate ranked above those left out, ties included
        found = best(candidates[top], similarity[top])
        if len(found) == want:
            return found
    return best(candidates, similarity)


class ClassPool:
    """A worker's pool of records for class-level batches: the records of its window's first pass, ``size`` at
    a time (data.shuffle_buffer), each taken once; once the first pass is read and the pool is empty, the
    window's later passes fill batches in the order read (as the random stream's last batch draws again).

    ``source`` yields the window's records pass after pass, with None at the end of each pass."""

    def __init__(self, source: Iterator[dict | None], size: int):
        self.source, self.size = source, size
        self.records: list[dict] = []
        self.first_pass = True
        self.drawn: Callable[[dict], bool] | None = None  # while replaying (skip): records drawn before the resume
        self.ghosts = 0  # while replaying: drawn records read and not yet taken (not kept: their bytes are not needed)

    def _fill(self) -> None:
        while self.first_pass and len(self.records) + self.ghosts < self.size:
            record = next(self.source)
            if record is None:
                self.first_pass = False
            elif self.drawn is not None and self.drawn(record):
                self.ghosts += 1
            else:
                self.records.append(record)

    def _later(self) -> dict:
        """The next record of the window's later passes."""
        while True:
            record = next(self.source)
            if record is not None:
                return record

    def take(self, count: int, choose: Callable[[list[dict], int], list[int]]) -> list[dict]:
        """``count`` records: those ``choose(pool, n)`` picks (indices of n records at most), the pool then
        refilled; once the first pass is drawn, the later passes' next records."""
        self.drawn, self.ghosts = None, 0
        chosen: list[dict] = []
        while len(chosen) < count:
            self._fill()
            if not self.records:
                chosen.append(self._later())
                continue
            picks = choose(self.records, count - len(chosen))
            chosen += [self.records[i] for i in picks]
            gone = set(picks)
            self.records = [r for i, r in enumerate(self.records) if i not in gone]
        return chosen

    def skip(self, count: int, drawn: Callable[[dict], bool]) -> None:
        """Replay a batch taken before a resume, without the snapshot it was chosen by: the pool's size moves as
        it did (the batch took as many records from it), and of the records read, those ``drawn`` says were
        drawn before the resume (the checkpoint's draws of the epoch) are the ones taken. Over the batches
        before the resume this leaves the pool as it was: each batch took drawn records only, and by the resume
        every drawn record the pool had read was taken."""
        self.drawn = drawn
        left = count
        while left > 0:
            self._fill()
            held = len(self.records) + self.ghosts
            if not held:
                self._later()
                left -= 1
                continue
            n = min(left, held)
            ghosts = min(n, self.ghosts)
            self.ghosts -= ghosts
            del self.records[:n - ghosts]  # only where the draws do not match this window (another run's)
            left -= n
