"""The `optimizer` and `deepspeed` sections: plain data, validated without importing DeepSpeed."""
from __future__ import annotations

import math
from dataclasses import dataclass

OPTIMIZER_NAMES = ("adam", "adamw", "sgd")
PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULES = ("constant", "step", "cosine")


@dataclass(frozen=True)
class OptimizerConfig:
    """The optimizer, the learning rates of its three param groups (backbone, head, β) and the schedule that
    multiplies each group's own rate."""

    name: str = "adam"  # adam, adamw or sgd (OPTIMIZER_NAMES)
    lr: float = 1e-4  # backbone
    head_lr: float | None = None  # embedding head; None: lr
    beta_lr: float = 1e-2  # beta's own rate (never weight-decayed)
    weight_decay: float = 1e-4  # of the backbone and the head (never of beta)
    momentum: float = 0.9  # sgd only
    schedule: str = "constant"  # constant, step (x gamma every step_size steps) or cosine
    warmup_steps: int = 0  # linear warm-up of every group's rate
    step_size: int = 1000  # schedule step: steps between two decays
    gamma: float = 0.5  # schedule step: the factor of each decay

    def validate(self) -> None:
        if self.name not in OPTIMIZER_NAMES:
            raise ValueError(f"optimizer.name: unknown optimizer {self.name!r}; known: {list(OPTIMIZER_NAMES)}")
        for key in ("lr", "head_lr", "beta_lr"):
            value = getattr(self, key)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"optimizer.{key} must be a positive finite rate, got {value}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"optimizer.weight_decay must be finite and >= 0, got {self.weight_decay}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"optimizer.momentum must lie in [0, 1), got {self.momentum}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optimizer.schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        if self.warmup_steps < 0 or self.step_size < 1 or not 0 < self.gamma <= 1:
            raise ValueError("optimizer.warmup_steps >= 0, optimizer.step_size >= 1 and 0 < optimizer.gamma <= 1")

    def lr_lambda(self, total_steps: int) -> "LrSchedule":
        """The multiplier of every group's own rate at a step (so beta keeps its own rate), over ``total_steps``."""
        return LrSchedule(self.schedule, self.warmup_steps, self.step_size, self.gamma, total_steps)


class LrSchedule:
    """The learning-rate multiplier at a step: warm-up, then constant, step or cosine decay over ``total_steps``.

    The schedule's length is its own state, set again where a resume learns the steps left (at another world
    size an epoch has other steps): ``schedule.total_steps = n``. Its state is plain values on purpose: LambdaLR
    saves a callable object's ``__dict__`` into the checkpoint (and restores it on loading), and weights-only
    loading takes numbers and strings, not a config object."""

    def __init__(self, kind: str, warmup_steps: int, step_size: int, gamma: float, total_steps: int):
        self.kind, self.warmup_steps, self.step_size, self.gamma = kind, int(warmup_steps), int(step_size), float(gamma)
        self.total_steps = int(total_steps)

    def __call__(self, step: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        if self.kind == "step":
            return warm * self.gamma ** (step // self.step_size)
        if self.kind == "cosine":
            total = self.total_steps
            return warm * 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))
        return warm


@dataclass(frozen=True)
class DeepSpeedConfig:
    """DeepSpeed's engine: the ZeRO stage, the precision, gradient clipping and the collectives' timeout."""

    zero_stage: int = 0  # 0, 1 or 2 (ZeRO-3 partitions beta, which the loss reads outside forward)
    precision: str = "fp32"  # fp32, bf16 or fp16 (the loss is fp32 in every case)
    gradient_clipping: float = 0.0  # global norm; 0 disables
    timeout_minutes: float = 60.0  # collectives; DeepSpeed's default of 10 is too short for a long evaluation

    def validate(self) -> None:
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"deepspeed.zero_stage must be 0, 1 or 2, got {self.zero_stage}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"deepspeed.precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.precision == "bf16" and self.zero_stage == 0:
            raise ValueError("deepspeed.precision=bf16 needs deepspeed.zero_stage 1 or 2: under ZeRO-0 DeepSpeed "
                             "steps the bf16 weights themselves, with no fp32 master copy")
        if not (0 <= self.gradient_clipping < math.inf and 0 < self.timeout_minutes < math.inf):
            raise ValueError("deepspeed.gradient_clipping must be finite and >= 0 (0: off) and deepspeed.timeout_minutes "
                             f"finite and > 0, got {self.gradient_clipping} and {self.timeout_minutes}")
