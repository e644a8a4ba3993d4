"""A run's optional features as run parts (dist_dml.train.parts): each is built where its config section turns it
on, registered by name like any part (its state in every checkpoint under that name), and acts through hooks
only. Adding a feature is one entry of FEATURES."""
from __future__ import annotations

from typing import Callable

import torch

from dist_dml.method.class_prototypes import ClassPrototypes
from dist_dml.method.cross_batch_memory import CrossBatchMemory
from dist_dml.train.centres import centres_part
from dist_dml.train.parts import RunPart
from dist_dml.train.selection import ModelSelection


class MemoryFeature(RunPart):
    """The cross-batch memory (memory.size > 0): the objective samples from it, and every taken step's global
    batch goes into it (the same on every rank)."""

    def __init__(self, cfg, stream, ctx, engine):
        self.memory = CrossBatchMemory(cfg.memory, cfg.model.embedding_dim, ctx.device)

    def state_dict(self) -> dict:
        return self.memory.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.memory.load_state_dict(state)

    def objective_options(self) -> dict:
        return {"memory": self.memory}

    def after_step(self, result, batch: dict, step: int, taken: bool) -> None:
        if taken and result.batch is not None:
            self.memory.enqueue(*result.batch, step)


class ClassSamplingFeature(RunPart):
    """Class-level batches (class_sampling.share > 0): the class prototypes, updated from every taken step's
    global batch and published as snapshots that the loader's workers choose batches by; logged with the share
    of rank 0's records that were chosen as near classes."""

    def __init__(self, cfg, stream, ctx, engine):
        self.ctx, self.per_batch = ctx, cfg.data.classes_per_batch
        self.prototypes = ClassPrototypes(cfg.class_sampling, stream.num_classes, cfg.model.embedding_dim,
                                          cfg.data.workers, ctx.device)
        self.records = self.neighbours = 0  # rank 0's records over the log window, and those chosen as near classes

    def state_dict(self) -> dict:
        return self.prototypes.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.prototypes.load_state_dict(state)

    def reader_options(self) -> dict:
        return {"snapshots": self.prototypes.ring}

    def begin(self, step: int) -> None:
        self.prototypes.begin(step)

    def after_step(self, result, batch: dict, step: int, taken: bool) -> None:
        embeddings, labels, _ = result.batch if taken else (None, None, None)
        self.prototypes.after_step(embeddings, labels, step)
        self.records += self.per_batch
        self.neighbours += int(batch.get("grouped", 0))

    def on_log(self, tracker, step: int) -> None:
        if not self.ctx.is_main:
            return
        metrics = {**self.prototypes.stats(), "grouped_share": self.neighbours / max(self.records, 1)}
        tracker.log_metrics(metrics, step)
        print(f"[train] step {step} class sampling: prototypes for {metrics['prototype_share']:.1%} of the classes "
              f"(mean age {metrics['prototype_mean_age']:.0f} steps), {metrics['grouped_share']:.1%} of rank 0's "
              "records chosen as near classes", flush=True)
        self.records = self.neighbours = 0


class WeightAverage(RunPart):
    """An exponential moving average of the model's parameters (train.ema: its decay per step), updated after every
    taken step, evaluated beside the model (its metrics under "ema": ema_* in the tracker), kept in every
    checkpoint, and the final model's weights where checkpoint.best_by names an ema_* metric (train.selection)."""

    def __init__(self, cfg, stream, ctx, engine):
        self.decay, self.model = cfg.train.ema, engine.module.model
        self.average = {name: p.detach().float().clone() for name, p in self.model.named_parameters()}

    @torch.no_grad()
    def after_step(self, result, batch: dict, step: int, taken: bool) -> None:
        if not taken:
            return
        for name, p in self.model.named_parameters():
            self.average[name].mul_(self.decay).add_(p.detach().float(), alpha=1 - self.decay)

    @torch.no_grad()
    def extra_evaluations(self, evaluate) -> dict:
        params = dict(self.model.named_parameters())
        kept = {name: p.detach().clone() for name, p in params.items()}
        for name, p in params.items():
            p.copy_(self.average[name])
        try:
            return {"ema": evaluate()}
        finally:
            for name, p in params.items():
                p.copy_(kept[name])

    def state_dict(self) -> dict:
        return {"average": {name: t.cpu().clone() for name, t in self.average.items()}, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        saved = state["average"]
        if set(saved) != set(self.average):
            raise ValueError("the saved weights' average is of another model")
        for name, t in saved.items():
            self.average[name].copy_(t)


# name (the checkpoint's part name) -> (whether the run's config turns it on, its part given (cfg, stream, ctx,
# engine))
FEATURES: dict[str, tuple[Callable, Callable]] = {
    "memory": (lambda cfg: cfg.memory.enabled, MemoryFeature),
    "prototypes": (lambda cfg: cfg.class_sampling.enabled, ClassSamplingFeature),
    "ema": (lambda cfg: cfg.train.ema > 0, WeightAverage),
    "centres": (lambda cfg: cfg.proxy.enabled, centres_part),
    "selection": (lambda cfg: cfg.checkpoint.best_by != "none",
                  lambda cfg, stream, ctx, engine: ModelSelection(cfg.checkpoint.best_by, cfg.train.patience)),
}


def optional_parts(cfg, stream, ctx, engine) -> list[tuple[str, RunPart]]:
    """The features ``cfg`` turns on, as (name, part), in FEATURES' order."""
    return [(name, build(cfg, stream, ctx, engine)) for name, (enabled, build) in FEATURES.items() if enabled(cfg)]
