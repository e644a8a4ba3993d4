"""A run's parts: everything with state besides the engine (which DeepSpeed saves itself), registered once by
name, saved and restored by the checkpoint manager, and told of the loop's events through hooks. The trainer's
loop calls the hooks of every part and names none of them; an optional feature (the cross-batch memory, class-level
batches) is one more part (dist_dml.train.features).

Hooks, each a no-op unless a part needs it:
- ``reader_options()``: keyword arguments for the training stream's loader (e.g. the prototypes' snapshots);
- ``objective_options()``: keyword arguments for the global-batch objective (e.g. a cross-batch memory);
- ``begin(step)``: before the loader starts at global step ``step`` (after a restore);
- ``after_step(result, batch, step, taken)``: step ``step`` is over (``taken``: False where it was skipped);
- ``on_log(tracker, step)``: at the end of a log window, after the meter's line;
- ``extra_evaluations(evaluate)``: further evaluations of other weights (the weights' average) beside the model's,
  as {name: metrics}: ``evaluate()`` evaluates whatever weights the model holds when it is called;
- ``after_evaluation(metrics, step)``: what an evaluation asks of the loop: {"save"} (keep this step's
  checkpoint), {"stop"} (end the training);
- ``final_weights(checkpoints)``: the weights the run ends with where they are not the last step's (a state dict
  of the model, read from the checkpoints' folder); None: the last step's;
- ``kept_steps()``: steps whose checkpoints are never pruned;
- ``summary()``: what the run's results.json says of the part at the end.
"""
from __future__ import annotations

import numpy as np
import torch

from dist_dml.data.position import StreamPosition
from dist_dml.infra.distributed import DistContext


class RunPart:
    """A named part of a run: ``state_dict`` (called on every rank; it may hold collectives; it returns what
    torch.save and weights-only loading take) and ``load_state_dict``, and the hooks above."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def reader_options(self) -> dict:
        return {}

    def objective_options(self) -> dict:
        return {}

    def begin(self, step: int) -> None:
        pass

    def after_step(self, result, batch: dict, step: int, taken: bool) -> None:
        pass

    def on_log(self, tracker, step: int) -> None:
        pass

    def extra_evaluations(self, evaluate) -> dict:
        return {}

    def after_evaluation(self, metrics: dict, step: int) -> set[str]:
        return set()

    def final_weights(self, checkpoints) -> dict | None:
        return None

    def kept_steps(self) -> tuple[int, ...]:
        return ()

    def summary(self) -> dict:
        return {}


class RunParts:
    """The run's parts in the order registered; each is given to the checkpoint manager as it is added. The
    hooks are called on every RunPart in that order (a part with state only, such as the meter, has none)."""

    def __init__(self, checkpoints):
        self.checkpoints = checkpoints
        self.parts: dict[str, RunPart] = {}

    def add(self, name: str, part) -> None:
        self.parts[name] = part
        self.checkpoints.register(name, part)

    def _each(self, hook: str):
        return [getattr(part, hook) for part in self.parts.values() if isinstance(part, RunPart)]

    def reader_options(self) -> dict:
        return {k: v for hook in self._each("reader_options") for k, v in hook().items()}

    def objective_options(self) -> dict:
        return {k: v for hook in self._each("objective_options") for k, v in hook().items()}

    def begin(self, step: int) -> None:
        for hook in self._each("begin"):
            hook(step)

    def after_step(self, result, batch: dict, step: int, taken: bool) -> None:
        for hook in self._each("after_step"):
            hook(result, batch, step, taken)

    def on_log(self, tracker, step: int) -> None:
        for hook in self._each("on_log"):
            hook(tracker, step)

    def extra_evaluations(self, evaluate) -> dict:
        return {name: metrics for hook in self._each("extra_evaluations") for name, metrics in hook(evaluate).items()}

    def after_evaluation(self, metrics: dict, step: int) -> set[str]:
        return set().union(*(hook(metrics, step) for hook in self._each("after_evaluation")))

    def final_weights(self, checkpoints) -> dict | None:
        found = [w for hook in self._each("final_weights") if (w := hook(checkpoints)) is not None]
        return found[0] if found else None

    def summary(self) -> dict:
        return {k: v for hook in self._each("summary") for k, v in hook().items()}


# --- the parts every run has besides the engine and the meter ------------------------------------

class DataPosition(RunPart):
    """The training stream's position: (epoch, step), the geometry it was reached with, and the epoch's draws
    per record over all ranks (gathered when saved: a collective). ``how`` says how a restored stream goes
    on (exactly, or over the records left, cut over another world size's slots)."""

    def __init__(self, position: StreamPosition, ctx: DistContext):
        self.position, self.ctx, self.how = position, ctx, ""

    def state_dict(self) -> dict:
        state = self.position.state_dict(drawn=global_draws(self.position.local_draws(), self.ctx))
        return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in state.items()}

    def load_state_dict(self, state: dict) -> None:
        self.how = self.position.load_state_dict({k: v.numpy() if torch.is_tensor(v) else v for k, v in state.items()})


class RngState(RunPart):
    """torch's generators, whatever exist in this process: the CPU's and each local CUDA device's (dropout and
    drop-path draw from the device's generator on a GPU: a resume that restored only the CPU's would diverge).
    The model's initialisation has its own seed; the data and the sampler draw from seeds of their own. A
    checkpoint saved with other devices restores the generators both have."""

    def state_dict(self) -> dict:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        return {"torch": torch.get_rng_state(), "cuda": list(cuda)}

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        saved = state.get("cuda") or []
        if saved and torch.cuda.is_available():
            count = min(len(saved), torch.cuda.device_count())
            torch.cuda.set_rng_state_all(saved[:count])


class TrackerRun(RunPart):
    """The MLflow run of a training: saved in every checkpoint (and its index, where a resume reads it to
    continue that run before the engine is built), so nothing to do on restoring."""

    def __init__(self, tracker):
        self.tracker = tracker

    def state_dict(self) -> dict:
        return {"mlflow_run_id": self.tracker.run_id or ""}


class EngineShapes(RunPart):
    """What a launch check reads of the engine without unpickling it (the checkpoint's index keeps a part's plain
    values): each param group's elements, in order (ZeRO partitions them over the ranks), and the beta tables'
    sizes (resolved from the split where loss.num_classes / num_images are 0). Nothing to restore."""

    def __init__(self, engine):
        self.engine = engine

    def state_dict(self) -> dict:
        beta = getattr(self.engine.module.loss, "beta", None)
        tables = {"beta_classes": getattr(beta, "class_beta", None), "beta_images": getattr(beta, "image_beta", None)}
        return {**{f"group_{name}": n for name, n in self.engine.group_sizes.items()},
                **{name: int(table.shape[0]) for name, table in tables.items() if table is not None}}


def global_draws(draws: tuple[np.ndarray, np.ndarray], ctx: DistContext) -> np.ndarray:
    """The epoch's draws per record over all ranks, from StreamPosition.local_draws (a collective)."""
    before, here = draws
    summed = ctx.all_reduce_sum(torch.from_numpy(here).to(ctx.device)).cpu().numpy()
    return before + summed
