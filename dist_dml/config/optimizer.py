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
    warmup_steps: int = 0  # linear warm-up of every group's rate (optimizer.warmup gives it in epochs or a share)
    step_size: int = 1000  # schedule step: steps between two decays (optimizer.decay_every: in epochs or a share)
    gamma: float = 0.5  # schedule step: the factor of each decay
    # The warm-up as a span: "500" steps, "2 epochs", or "5%" of the run (config/schedule.py); "": warmup_steps
    warmup: str = ""
    decay_every: str = ""  # the step schedule's interval as a span ("20 epochs", "25%"); "": step_size
    backbone_warmup: str = ""  # a span during which the backbone's rate is 0: the head and beta learn alone first
    # The rates of the backbone and the head follow the global batch: none, linear (x G / reference_batch) or sqrt
    lr_scaling: str = "none"
    reference_batch: int = 256  # the global batch, in images, that lr and head_lr are given for
    # Layer-wise rate decay: a backbone layer n layers below the head learns at lr x layer_decay^n (1: off)
    layer_decay: float = 1.0

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
        from dist_dml.config.schedule import LR_RULES
        from dist_dml.infra.spans import parse_span

        for key in ("warmup", "decay_every", "backbone_warmup"):
            parse_span(getattr(self, key), f"optimizer.{key}")
        if self.warmup and self.warmup_steps:
            raise ValueError(f"optimizer.warmup={self.warmup!r} and optimizer.warmup_steps={self.warmup_steps}: give "
                             "one of them")
        if self.decay_every and self.step_size != OptimizerConfig.step_size:
            raise ValueError(f"optimizer.decay_every={self.decay_every!r} and optimizer.step_size={self.step_size}: "
                             "give one of them")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"optimizer.layer_decay must be in (0, 1] (1: off), got {self.layer_decay}")
        if self.lr_scaling not in LR_RULES or self.reference_batch < 1:
            raise ValueError(f"optimizer.lr_scaling must be one of {list(LR_RULES)} and optimizer.reference_batch >= "
                             f"1, got {self.lr_scaling!r} and {self.reference_batch}")

    def lr_lambda(self, total_steps: int) -> "LrSchedule":
        """The multiplier of every group's own rate at a step (so beta keeps its own rate), over ``total_steps``,
        with this section's warm-up and decay in steps."""
        return LrSchedule(self.schedule, self.warmup_steps, self.step_size, self.gamma, total_steps)

    def scaled(self, factor: float) -> "OptimizerConfig":
        """This section with the backbone's and the head's rates multiplied by ``factor`` (the global batch's rule);
        beta keeps its own."""
        import dataclasses

        return dataclasses.replace(self, lr=self.lr * factor,
                                   head_lr=None if self.head_lr is None else self.head_lr * factor)


class LrSchedule:
    """The learning-rate multiplier of a param group at a step: 0 while the group is held (the backbone during a
    head-only warm-up), then warm-up, then constant, step or cosine decay over ``total_steps``.

    Its lengths are its own state, set again where a resume resolves them at its world size (at another world size
    an epoch has other steps): :meth:`set`. Its state is plain values on purpose: LambdaLR saves a callable object's
    ``__dict__`` into the checkpoint (and restores it on loading), and weights-only loading takes numbers and
    strings, not a config object."""

    def __init__(self, kind: str, warmup_steps: int, step_size: int, gamma: float, total_steps: int, hold: int = 0):
        self.kind, self.gamma = kind, float(gamma)
        self.warmup_steps, self.step_size, self.total_steps, self.hold = (int(warmup_steps), max(int(step_size), 1),
                                                                           int(total_steps), int(hold))

    @classmethod
    def of(cls, optimizer: OptimizerConfig, schedule, held: bool = False) -> "LrSchedule":
        """A group's multiplier from the optimizer section and a resolved Schedule (config/schedule.py); ``held``:
        the group waits out the head-only warm-up."""
        made = cls(optimizer.schedule, 0, 1, optimizer.gamma, 0)
        made.set(schedule, held)
        return made

    def set(self, schedule, held: bool = False) -> None:
        """The lengths of a resolved Schedule (after a resume restored the saved ones)."""
        self.warmup_steps, self.total_steps = schedule.warmup_steps, schedule.total_steps
        self.step_size = max(schedule.decay_every, 1)
        self.hold = schedule.backbone_warmup_steps if held else 0

    def __call__(self, step: int) -> float:
        if step < self.hold:
            return 0.0
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
