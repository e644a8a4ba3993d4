"""Class prototypes: one embedding per class, the building block of class-level batches (docs/design.md,
"Sampling classes"): the table (:class:`PrototypeTable`) and the run part that keeps it and publishes its snapshots
to the loader's workers (:class:`ClassPrototypes`).

Each class's prototype is an exponential moving average of the mean of its embeddings in the global batches
it appears in: p <- normalise(m p + (1 - m) c), c = normalise(mean of the class's embeddings in the batch),
and p = c the first time. The update reads the all-gathered global batch, the same on every rank, and sums a
class's embeddings as differences of a running sum (no atomics), so the table is identical on every rank and
does not depend on the world size. Storage: classes x dim in ``dtype`` (fp16: 10^6 x 128 in 256 MB) plus the step each
prototype was last updated (int64). Torch only.
"""
from __future__ import annotations

import torch
from torch import Tensor

from dist_dml.data.grouping import ClassSamplingConfig
from dist_dml.data.snapshots import SnapshotRing, loader_lag
from dist_dml.infra.dtypes import DTYPES



class PrototypeTable:
    """The prototypes of ``classes`` classes (a run's stateful part: state_dict / load_state_dict)."""

    def __init__(self, classes: int, dim: int, momentum: float = 0.9, dtype: str = "fp16",
                 device: torch.device | str = "cpu"):
        if classes < 1 or dim < 1 or not 0 <= momentum < 1 or dtype not in DTYPES:
            raise ValueError(f"prototypes: classes and dim must be >= 1, momentum in [0, 1) and dtype one of "
                             f"{sorted(DTYPES)}; got {classes}, {dim}, {momentum} and {dtype!r}")
        self.momentum, self.dtype = momentum, dtype
        self.table = torch.zeros((classes, dim), dtype=DTYPES[dtype], device=device)
        self.updated = torch.full((classes,), -1, dtype=torch.long, device=device)  # -1: no prototype yet

    @torch.no_grad()
    def update(self, embeddings: Tensor, labels: Tensor, step: int) -> None:
        """Fold a global batch (embeddings B x dim, in rank order, and their labels) into the table."""
        labels = labels.to(self.table.device)
        present, slot = torch.unique(labels, return_inverse=True)
        # Each class's sum as the difference of a float64 running sum over the batch sorted by class (stable): no
        # atomics, and O(B x dim) where a dense class x batch indicator would be O(classes x B) at a global batch
        # of tens of thousands.
        order = torch.argsort(slot, stable=True)
        running = torch.cumsum(embeddings.detach().to(self.table.device, torch.float64)[order], dim=0)
        running = torch.cat([running.new_zeros((1, running.shape[1])), running])
        counts = torch.bincount(slot, minlength=len(present))
        ends = torch.cumsum(counts, dim=0)
        centre = torch.nn.functional.normalize((running[ends] - running[ends - counts]).float(), dim=1)
        # index_select / index_copy_: advanced indexing of a large fp16 table is far slower on the CPU
        old = self.table.index_select(0, present).float()
        moved = torch.nn.functional.normalize(self.momentum * old + (1 - self.momentum) * centre, dim=1)
        seen = (self.updated.index_select(0, present) >= 0)[:, None]
        self.table.index_copy_(0, present, torch.where(seen, moved, centre).to(self.table.dtype))
        self.updated.index_fill_(0, present, step)

    def stats(self, step: int) -> dict[str, float]:
        """The share of classes with a prototype and their mean age in steps (what a run logs)."""
        have = self.updated >= 0
        count = int(have.sum())
        age = float((step - self.updated[have]).float().mean()) if count else 0.0
        return {"prototype_share": count / len(self.updated), "prototype_mean_age": age}

    def state_dict(self) -> dict:
        return {"table": self.table.cpu().clone(), "updated": self.updated.cpu().clone(), "momentum": self.momentum,
                "dtype": self.dtype}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["table"].shape) != tuple(self.table.shape):
            raise ValueError(f"the saved prototypes are {tuple(state['table'].shape)}, this run's "
                             f"{tuple(self.table.shape)} (the class count or model.embedding_dim changed)")
        self.table.copy_(state["table"].to(device=self.table.device, dtype=self.table.dtype))
        self.updated.copy_(state["updated"].to(self.updated.device))


class ClassPrototypes:
    """A run's prototypes (class_sampling): the table, updated from every taken step's global batch, and the ring
    of snapshots it publishes every class_sampling.refresh_steps steps for the loader's workers to choose batches
    by (snapshots.SnapshotRing). A stateful part: the table and the snapshots the batches after the checkpoint
    are bound to, so a resume chooses the same batches."""

    def __init__(self, config: ClassSamplingConfig, classes: int, dim: int, workers: int,
                 device: torch.device | str = "cpu"):
        self.config = config
        self.table = PrototypeTable(classes, dim, config.momentum, config.dtype, device)
        self.ring = SnapshotRing(classes, dim, config.dtype, config.refresh_steps, loader_lag(workers))
        self.step, self.restored = 0, False

    def begin(self, step: int) -> None:
        """Before the loader starts at global step ``step``. Without snapshots from a checkpoint (a fresh start,
        or a checkpoint of a run without class_sampling), the table as it stands is the snapshot the batches
        from here on are bound to until the next one is published (snapshot 0 of a fresh start: no prototypes)."""
        self.step = step
        if not self.restored:
            n = self.ring.number(step) or 0
            self.ring.publish(n, self.table.table)
            self.ring.floor = n

    def after_step(self, embeddings: Tensor | None, labels: Tensor | None, step: int) -> None:
        """Step ``step`` is over (``embeddings``: its global batch, None where the step was skipped); publishes
        the snapshot of ``step + 1`` steps when that is a multiple of refresh_steps."""
        if embeddings is not None:
            self.table.update(embeddings, labels, step)
        self.step = step + 1
        if self.step % self.config.refresh_steps == 0:
            self.ring.publish(self.step // self.config.refresh_steps, self.table.table)

    def stats(self) -> dict[str, float]:
        return self.table.stats(self.step)

    def state_dict(self) -> dict:
        since = self.ring.number(self.step)
        held = self.ring.held(0 if since is None else since)
        return {**self.table.state_dict(), "snapshot_numbers": torch.tensor([n for n, _ in held], dtype=torch.long),
                "snapshots": torch.stack([t for _, t in held]) if held else torch.zeros(0)}

    def load_state_dict(self, state: dict) -> None:
        self.table.load_state_dict(state)
        numbers, tables = state["snapshot_numbers"].tolist(), state["snapshots"]
        if numbers and tuple(tables.shape[1:]) != tuple(self.table.table.shape):
            raise ValueError(f"the saved snapshots are {tuple(tables.shape[1:])}, this run's prototypes "
                             f"{tuple(self.table.table.shape)}")
        self.ring.restore([(n, tables[i]) for i, n in enumerate(numbers)])
        self.restored = bool(numbers)
