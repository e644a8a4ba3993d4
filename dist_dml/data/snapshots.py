"""The prototypes as the loader's workers see them: numbered snapshots in a ring of shared memory (DESIGN.md,
"Sampling classes").

The training process publishes snapshot n, the prototype table after n x ``every`` steps, into slot n % slots;
the batch of global step t is chosen by snapshot ``number(t)`` = (t - lag) // every, a function of t alone.
``lag`` is the loader's look-ahead plus one (a DataLoader asks for batch t once the training has taken step
t - prefetch x workers), so the snapshot a batch needs is published before the batch is asked for, and a
worker never waits on the step its own batch feeds. With slots = ceil(lag / every) + 1 a slot is not
written again while a worker may still read it; a read checks the slot's number before and after
(a sequence lock), so a broken promise is an error, never a silent mix of two snapshots.

The ring is shared memory (/dev/shm) that the DataLoader's workers inherit: ``slots x classes x dim`` in the
prototypes' dtype (10^6 x 128 in fp16: 256 MB a slot).
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from dist_dml.infra.errors import UserError
from dist_dml.infra.dtypes import DTYPES

PREFETCH = 4  # batches a DataLoader worker is asked for ahead (streams.loader's prefetch_factor)
WAIT_S = 600.0  # a worker waits this long for a snapshot before it calls it a bug (it should never wait)


def loader_lag(workers: int) -> int:
    """Steps between the snapshot a batch is chosen by and the batch: the loader's look-ahead, plus one."""
    return PREFETCH * workers + 1


def ring_slots(lag: int, every: int) -> int:
    """Slots a ring needs so that no slot is written again while a batch bound to it may still be read."""
    return math.ceil(lag / every) + 1


class SnapshotError(UserError):
    """A worker could not read the snapshot its batch is bound to."""


class SnapshotRing:
    """Numbered snapshots of a classes x dim table, shared with the loader's worker processes."""

    def __init__(self, classes: int, dim: int, dtype: str, every: int, lag: int, slots: int | None = None):
        self.every, self.lag = every, lag
        self.slots = slots or ring_slots(lag, every)
        self.data = torch.zeros((self.slots, classes, dim), dtype=DTYPES[dtype]).share_memory_()
        self.numbers = torch.full((self.slots,), -1, dtype=torch.int64).share_memory_()
        self.floor = 0  # after a resume: the oldest snapshot held (a resume at another lag clamps to it)

    def number(self, step: int) -> int | None:
        """The snapshot the batch of global step ``step`` is chosen by (None: none yet, a random batch)."""
        if step < self.lag:
            return None
        return max((step - self.lag) // self.every, self.floor)

    def publish(self, n: int, table: torch.Tensor) -> None:
        """Snapshot ``n`` (the training process, after n x every steps)."""
        slot = n % self.slots
        self.numbers[slot] = -2  # being written
        self.data[slot].copy_(table.detach())  # from any device and dtype, without an intermediate copy
        self.numbers[slot] = n

    def rows(self, n: int, labels: np.ndarray, who: str = "") -> np.ndarray:
        """Snapshot ``n``'s rows of ``labels`` as float32 (a worker): waits for it to be published."""
        slot, started = n % self.slots, time.monotonic()
        while int(self.numbers[slot]) != n:
            if int(self.numbers[slot]) > n:
                raise SnapshotError(f"{who}the prototypes' snapshot {n} was overwritten before it was read (ring "
                                    f"of {self.slots} slots, refreshed every {self.every} steps, lag {self.lag})")
            if time.monotonic() - started > WAIT_S:
                raise SnapshotError(f"{who}waited {WAIT_S:.0f}s for the prototypes' snapshot {n} (step "
                                    f"{n * self.every}); the training process did not publish it")
            time.sleep(0.002)
        rows = self.data[slot].index_select(0, torch.from_numpy(np.asarray(labels, np.int64))).float().numpy()
        if int(self.numbers[slot]) != n:
            raise SnapshotError(f"{who}the prototypes' snapshot {n} was overwritten while it was read (ring of "
                                f"{self.slots} slots, refreshed every {self.every} steps, lag {self.lag})")
        return rows

    def held(self, since: int) -> list[tuple[int, torch.Tensor]]:
        """The snapshots numbered ``since`` or later, oldest first, as copies (for a checkpoint)."""
        found = sorted((int(n), slot) for slot, n in enumerate(self.numbers.tolist()) if n >= since)
        return [(n, self.data[slot].clone()) for n, slot in found]

    def restore(self, snapshots: list[tuple[int, torch.Tensor]]) -> None:
        """Publish a checkpoint's snapshots again (the newest that fit); the oldest becomes the floor."""
        kept = sorted(snapshots)[-self.slots:]
        for n, table in kept:
            self.publish(n, table)
        self.floor = kept[0][0] if kept else 0


class FixedSnapshots:
    """One table for every batch from ``start`` on (benchmarks and tests of the reader without a training)."""

    def __init__(self, table: torch.Tensor, start: int = 0):
        self.table, self.start = table, start

    def number(self, step: int) -> int | None:
        return 0 if step >= self.start else None

    def rows(self, n: int, labels: np.ndarray, who: str = "") -> np.ndarray:
        return self.table.index_select(0, torch.from_numpy(np.asarray(labels, np.int64))).float().numpy()
