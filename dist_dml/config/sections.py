"""The sections of a run's config that the training itself reads: `train` (the loop), `checkpoint` (the
checkpoint manager) and `tracking` (MLflow). Plain data, validated without importing their components."""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class TrainConfig:
    """How long a run trains, how it logs and watches itself, its name and its output folder."""

    steps: int = 0  # total optimizer steps; 0: epochs x steps per epoch
    epochs: int = 1  # passes over the training split (when train.steps is 0)
    log_every: int = 10  # steps per log line and MLflow point (loss, active pairs, spread, throughput)
    max_bad_steps: int = 5  # this many non-finite losses in a row stop the run
    name: str = ""  # the run's name; "": the config file's name (configs/sop_resnet50.yaml -> sop_resnet50)
    output_dir: str = ""  # "": runs/NAME
    device: str = "auto"  # auto, cpu or cuda
    seed: int = 0  # model initialisation (sampling and data have their own seeds)
    collapse_spread: float = 0.2  # a log window whose embeddings spread less warns of a collapse (healthy: ~1)
    embedding_chunks: int = 1  # embed the local batch in this many chunks (a global batch larger than memory)
    # A fresh start in a folder that holds an earlier run's checkpoints or results: refused, or (true) those moved
    # into OUTPUT/previous/RUN first. Nothing is ever overwritten.
    move_aside: bool = False
    # Early stopping: this many evaluations in a row without a better checkpoint.best_by end the training (0: never)
    patience: int = 0
    # An exponential moving average of the model's weights (the decay per step, e.g. 0.999; 0: none): evaluated
    # beside the model (its metrics as ema_*), kept in checkpoints, and the final model where best_by names an ema_*
    ema: float = 0.0

    def validate(self) -> None:
        if self.steps < 0 or self.epochs < 1:
            raise ValueError("train.steps must be >= 0 and train.epochs >= 1")
        if self.seed < 0:
            raise ValueError(f"train.seed must be >= 0, got {self.seed}")
        if self.embedding_chunks < 1:
            raise ValueError(f"train.embedding_chunks must be >= 1, got {self.embedding_chunks}")
        if not 0 <= self.collapse_spread < 2:
            raise ValueError(f"train.collapse_spread must be in [0, 2) (0: no check), got {self.collapse_spread}")
        if self.log_every < 1 or self.max_bad_steps < 1:
            raise ValueError("train.log_every and train.max_bad_steps must be >= 1")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"train.device must be auto, cpu or cuda, got {self.device!r}")
        if self.patience < 0 or not 0 <= self.ema < 1:
            raise ValueError(f"train.patience must be >= 0 (0: no early stop) and train.ema in [0, 1) (0: none), got "
                             f"{self.patience} and {self.ema}")
        if self.name and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise ValueError(f"train.name must be a plain name (letters, digits, . _ -), got {self.name!r}")


@dataclass(frozen=True)
class CheckpointConfig:
    """How often a run saves a checkpoint, how many it keeps, and which one it continues from."""

    every_steps: int = 0  # 0: only at the end (checkpoint.every gives it in epochs or a share of the run)
    every: str = ""  # the interval as a span: "500" steps, "2 epochs" or "10%" of the run; "": every_steps
    keep_last: int = 3  # whole checkpoints kept (older ones of this run are removed)
    resume: str = "auto"  # auto: the latest checkpoint under train.output_dir, if any; none; or a path
    allow_other_run: bool = False  # auto: continue from a checkpoint another run wrote into this folder
    # Keep the checkpoint of the best validation by this metric (e.g. map_at_r, recall_at_1, pp_map_at_r, ema_...):
    # never pruned, and the final model, results.json and the MLflow Model are its; none: the last step's
    best_by: str = "none"

    def validate(self) -> None:
        if self.keep_last < 1 or self.every_steps < 0:
            raise ValueError("checkpoint.keep_last must be >= 1 and checkpoint.every_steps >= 0 (0: only at the end)")
        from dist_dml.infra.spans import parse_span

        parse_span(self.every, "checkpoint.every")
        if self.every and self.every_steps:
            raise ValueError(f"checkpoint.every={self.every!r} and checkpoint.every_steps={self.every_steps}: give one "
                             "of them")


@dataclass(frozen=True)
class TrackingConfig:
    """Where and what a run logs in MLflow (rank 0 only), and what happens when the server does not answer."""

    enabled: bool = True  # log to MLflow (rank 0 only); false: no tracking at all
    uri: str | None = None  # MLFLOW_TRACKING_URI wins; neither: MLflow's local default
    experiment: str = ""  # "": the run's name (train.name), so two configs never share an experiment
    run_name: str | None = None  # the MLflow run's name; null: one MLflow makes up (the experiment is train.name)
    system_metrics: bool = True  # MLflow's CPU, memory and GPU metrics of the run
    required: bool = True  # an unreachable server stops the run at start; false: train without tracking
    timeout_s: float = 10.0  # per request to a tracking server (the start-up check, and each log call)
    log_model: bool = True  # the final model as an MLflow Model (pyfunc: uint8 images in, embeddings out)
    register_as: str = ""  # and registered in the model registry under this name
    parent_run_id: str = ""  # the run of a grid (dist-dml grid) this training is a cell of: a child run of it

    def validate(self) -> None:
        if not 0 < self.timeout_s <= 300:
            raise ValueError(f"tracking.timeout_s must be in (0, 300] seconds, got {self.timeout_s}")
