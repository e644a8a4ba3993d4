"""Schedules in the data's own units: a span (warm-up, the step schedule's decay interval, evaluation and checkpoint
intervals, the head-only warm-up) is given in optimizer steps, in epochs, or as a share of the run, and resolved to
steps for the world size a run has; the learning rates follow the global batch by a stated rule. An epoch is one
pass over the training split's records, so it has fewer steps on more ranks: a span in epochs or in shares of the
run means the same training on 1 GPU as on 64, where a span in steps does not.

    "500" or "500 steps"      optimizer steps
    "2 epochs", "0.5 epoch"   passes over the training records, at this world size's steps per epoch
    "10%"                     a share of the run's steps (train.steps, or train.epochs at this world size)
    ""                        not given here: the section's *_steps key holds it (0: off)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from dist_dml.infra.spans import parse_span

LR_RULES = ("none", "linear", "sqrt")

def span_steps(text: str, key: str, steps_per_epoch: int, total_steps: int, otherwise: int = 0) -> int:
    """The span ``text`` in optimizer steps (``otherwise`` where it is ""); a span above 0 is at least 1 step."""
    span = parse_span(text, key)
    if span is None:
        return int(otherwise)
    value, unit = span
    steps = value if unit == "steps" else value * steps_per_epoch if unit == "epochs" else value * total_steps
    return max(1, int(round(steps))) if value > 0 else 0


def lr_factor(rule: str, global_batch: int, reference_batch: int) -> float:
    """What the learning rates are multiplied by for a global batch of ``global_batch`` images: 1 (none), the ratio
    to ``reference_batch`` (linear: Goyal et al. 2017) or its square root (sqrt: the rule for Adam)."""
    ratio = global_batch / reference_batch
    return {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[rule]


@dataclass(frozen=True)
class Schedule:
    """A run's schedule resolved to optimizer steps at one world size."""

    world_size: int
    steps_per_epoch: int
    total_steps: int
    global_batch: int  # images a step, over all ranks
    warmup_steps: int
    decay_every: int  # the step schedule's interval
    eval_every: int  # 0: at the end only
    checkpoint_every: int  # 0: at the end only
    backbone_warmup_steps: int  # the backbone's rate is 0 this long (the head and beta learn alone)
    lr_rule: str
    lr_factor: float
    reference_batch: int

    def describe(self) -> str:
        """One line, for `dist-dml check` and a training's start."""
        every = lambda n: f"every {n} steps ({n / self.steps_per_epoch:.3g} epochs)" if n else "at the end only"  # noqa: E731
        parts = [f"an epoch is {self.steps_per_epoch} steps of {self.global_batch} images on {self.world_size} "
                 f"process{'es' if self.world_size > 1 else ''}; {self.total_steps} steps "
                 f"({self.total_steps / self.steps_per_epoch:.3g} epochs)",
                 f"warm-up {self.warmup_steps} steps", f"evaluation {every(self.eval_every)}",
                 f"checkpoints {every(self.checkpoint_every)}"]
        if self.decay_every:
            parts.insert(2, f"step decay every {self.decay_every} steps")
        if self.backbone_warmup_steps:
            parts.insert(2, f"the head alone for {self.backbone_warmup_steps} steps")
        if self.lr_rule != "none":
            parts.append(f"learning rates x{self.lr_factor:.3g} ({self.lr_rule} rule: a global batch of "
                         f"{self.global_batch} images against optimizer.reference_batch={self.reference_batch})")
        return "; ".join(parts)


def resolve(cfg, world_size: int, steps_per_epoch: int, total_steps: int) -> Schedule:
    """``cfg``'s spans (a RunConfig's) in steps at ``world_size`` processes, where an epoch is ``steps_per_epoch``
    steps and the run ``total_steps``."""
    opt, data = cfg.optimizer, cfg.data
    spe = max(steps_per_epoch, 1)
    steps = lambda text, key, otherwise=0: span_steps(text, key, spe, total_steps, otherwise)  # noqa: E731
    global_batch = world_size * data.local_batch
    return Schedule(world_size, spe, total_steps, global_batch,
                    warmup_steps=steps(opt.warmup, "optimizer.warmup", opt.warmup_steps),
                    decay_every=steps(opt.decay_every, "optimizer.decay_every", opt.step_size)
                    if opt.schedule == "step" else 0,
                    eval_every=steps(cfg.eval.every, "eval.every", cfg.eval.every_steps),
                    checkpoint_every=steps(cfg.checkpoint.every, "checkpoint.every", cfg.checkpoint.every_steps),
                    backbone_warmup_steps=steps(opt.backbone_warmup, "optimizer.backbone_warmup"),
                    lr_rule=opt.lr_scaling, lr_factor=lr_factor(opt.lr_scaling, global_batch, opt.reference_batch),
                    reference_batch=opt.reference_batch)
