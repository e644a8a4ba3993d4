"""Choosing the model a run ends with (checkpoint.best_by, train.patience): a run part that watches every
validation, keeps the checkpoint of the best one from pruning, stops the training after train.patience
validations without a better one, and gives the best checkpoint's weights (or their average's, for an ema_*
metric) as the final model's."""
from __future__ import annotations

import math

from dist_dml.train.parts import RunPart
from dist_dml.train.tracking import flat_metrics


class ModelSelection(RunPart):
    """The best value of ``metric`` (higher is better: recall, MAP@R, R-Precision) over the validations so far, the
    step it was reached at, and the validations since. The same on every rank: every rank gets the metrics."""

    def __init__(self, metric: str, patience: int = 0):
        self.metric, self.patience = metric, patience
        self.best_value, self.best_step, self.since = -math.inf, -1, 0

    def after_evaluation(self, metrics: dict, step: int) -> set[str]:
        value = flat_metrics(metrics)[self.metric]
        asks = set()
        if value > self.best_value:
            self.best_value, self.best_step, self.since = value, step, 0
            asks.add("save")
        else:
            self.since += 1
        if self.patience and self.since >= self.patience:
            asks.add("stop")
        return asks

    def kept_steps(self) -> tuple[int, ...]:
        return (self.best_step,) if self.best_step >= 0 else ()

    def final_weights(self, checkpoints) -> dict | None:
        """The model's state dict at the best step: the checkpoint's model, or (an ema_* metric) the weights'
        average it kept, with the model's buffers."""
        if self.best_step < 0:
            return None
        saved = checkpoints.saved_state(self.best_step)
        weights = {k[len("model."):]: v for k, v in saved["module"].items() if k.startswith("model.")}
        if self.metric.startswith("ema_"):
            weights.update(saved["parts"]["ema"]["average"])
        return weights

    def summary(self) -> dict:
        return {"best_by": self.metric, "best_step": self.best_step, "best_value": self.best_value}

    def state_dict(self) -> dict:
        return {"metric": self.metric, "best_value": self.best_value, "best_step": self.best_step,
                "validations_since_best": self.since}

    def load_state_dict(self, state: dict) -> None:
        if state.get("metric") != self.metric:
            return  # another metric: selection starts afresh
        self.best_value, self.best_step = float(state["best_value"]), int(state["best_step"])
        self.since = int(state["validations_since_best"])
