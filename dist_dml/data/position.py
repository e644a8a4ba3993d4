"""Where a rank's training stream stands, the part of it a checkpoint keeps: (epoch, step), the batch
geometry it was reached with, this epoch's draws per record, and the epoch's *resumed layout* if a resume
at another geometry cut the records left over new slots. Arithmetic on counts and masks (the steps come
from the :class:`~dist_dml.data.plan.EpochPlan`): nothing here reads a byte or forks a worker."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dist_dml.data.plan import EpochPlan

# What a position depends on: resumed with all of these equal, an epoch continues exactly.
GEOMETRY = ("world_size", "workers", "classes_per_batch", "shuffle_buffer", "seed", "records")


@dataclass(frozen=True)
class Start:
    """Where a loader's batches begin: an epoch and step, and that epoch's resumed layout if any (its base
    step and the records it had drawn). What the loader's workers get; nothing changes it."""

    epoch: int
    step: int
    base_step: int = 0
    base_drawn: np.ndarray | None = None
    drawn: np.ndarray | None = None  # the epoch's draws per record by ``step`` (a resume's; class-level batches)

    def resumed(self, epoch: int) -> tuple[int, np.ndarray | None]:
        """(base step, drawn mask) of ``epoch``'s resumed layout; (0, None) for a whole epoch."""
        return (self.base_step, self.base_drawn) if epoch == self.epoch and self.base_drawn is not None else (0, None)


class StreamPosition:
    """A rank's position in the training stream, in global samples.

    Every batch names the epoch positions of its records' first draws (``positions``; -1 for a record drawn
    again to fill a batch); the trainer hands each consumed batch to :meth:`consume`, so the position knows
    which of the epoch's records this rank has drawn, and a checkpoint keeps the epoch's draws over all
    ranks (:meth:`state_dict`). Restored with the same geometry, the epoch continues exactly; restored with
    another (world size, workers, batch), the records not yet drawn in the epoch are cut into windows over
    the new slots from the resume step on (a resumed layout), so the epoch ends without replaying or
    skipping a record."""

    def __init__(self, plan: EpochPlan, geometry: dict):
        self.plan, self.geometry = plan, dict(geometry)
        self.num_records = int(geometry["records"])
        self.set_epoch(0)

    @property
    def start(self) -> Start:
        """Where a loader starts, with the epoch's draws so far (a sum over the split's records: for a loader, not
        for every step; :meth:`resumed` has the layout alone)."""
        return Start(self.epoch, self.step, self.base_step, self.base_drawn,
                     self.drawn_before + self.drawn_here if self.step > self.base_step else None)

    def resumed(self, epoch: int) -> tuple[int, np.ndarray | None]:
        """Start.resumed of this position: (base step, drawn mask) of ``epoch``'s resumed layout."""
        return Start(self.epoch, self.step, self.base_step, self.base_drawn).resumed(epoch)

    def steps_in_epoch(self, epoch: int) -> int:
        """The same on every rank (the plan's), from the resumed layout's base step if any."""
        base, drawn = self.resumed(epoch)
        return self.plan.steps(epoch, base, drawn)

    def remaining_steps(self, epochs: int) -> int:
        """Steps from here to the end of epoch ``epochs - 1``."""
        return (self.steps_in_epoch(self.epoch) - self.step
                + sum(self.steps_in_epoch(e) for e in range(self.epoch + 1, epochs)))

    def set_epoch(self, epoch: int) -> None:
        """The start of ``epoch``: nothing drawn yet."""
        self.epoch, self.step = epoch, 0
        self.base_step, self.base_drawn = 0, None
        self.drawn_before = np.zeros(self.num_records, np.int32)  # this epoch's draws, all ranks, as restored
        self.drawn_here = np.zeros(self.num_records, np.int32)  # this rank's draws since (see consume)

    def consume(self, batch: dict) -> None:
        """A batch the trainer used: its records' first draws count as drawn (by this rank)."""
        positions = batch["positions"].numpy()
        np.add.at(self.drawn_here, positions[positions >= 0], 1)

    def local_draws(self) -> tuple[np.ndarray, np.ndarray]:
        """(draws of this epoch over all ranks as restored, this rank's since): the epoch's draws per record
        are the first plus the sum of the second over ranks."""
        return self.drawn_before, self.drawn_here

    def advance(self) -> tuple[np.ndarray, np.ndarray] | None:
        """One batch consumed: the next step, or the next epoch's first. At an epoch's end, returns its
        :meth:`local_draws` (for the trainer's report on the epoch)."""
        self.step += 1
        if self.step < self.steps_in_epoch(self.epoch):
            return None
        finished = self.local_draws()
        self.set_epoch(self.epoch + 1)
        return finished

    def state_dict(self, drawn: np.ndarray) -> dict:
        """(epoch, step), the geometry, the resumed layout if any, and ``drawn``: this epoch's draws per
        record over all ranks (:meth:`local_draws` summed over ranks, a collective the caller runs)."""
        if len(drawn) != self.num_records:
            raise ValueError(f"draws of {len(drawn)} records for a split of {self.num_records}")
        return {"epoch": self.epoch, "step": self.step, **self.geometry, "base_step": self.base_step,
                "base_drawn": None if self.base_drawn is None else self.base_drawn.copy(),
                "drawn": np.asarray(drawn, np.int32)}

    def load_state_dict(self, state: dict) -> str:
        """Continue from ``state``: exactly where its geometry is this one, else with a resumed layout over the
        records its ``drawn`` leaves. Returns how, in a few words."""
        missing = [k for k in ("epoch", "step", "drawn", "base_step", "base_drawn", *GEOMETRY) if k not in state]
        if missing:
            raise ValueError(f"the saved data position lacks {', '.join(missing)}")
        drawn = np.asarray(state["drawn"], np.int32)
        if len(drawn) != self.num_records:
            raise ValueError(f"the saved data position covers {len(drawn)} records, the split has "
                             f"{self.num_records}: another data.root or train_split")
        self.set_epoch(int(state["epoch"]))
        self.step, self.drawn_before = int(state["step"]), drawn.copy()
        if all(state[k] == v for k, v in self.geometry.items()):
            if state["base_drawn"] is not None:
                self.base_step, self.base_drawn = int(state["base_step"]), np.asarray(state["base_drawn"], bool)
            return "exactly where it was"
        if self.step == 0:
            return "at the start of an epoch"
        self.base_step, self.base_drawn = self.step, self.drawn_before > 0
        kept = self.plan.kept(self.epoch)
        kept = np.ones(self.num_records, bool) if kept is None else kept
        left = int((~self.base_drawn & kept).sum())
        return (f"epoch {self.epoch} from step {self.step} with the {left} of its {int(kept.sum())} records not yet "
                f"drawn, cut over {self.plan.slots} slots")
