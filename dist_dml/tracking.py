"""The one module that imports MLflow. Rank 0 logs; every other rank gets a do-nothing tracker.

MLFLOW_TRACKING_URI, else `tracking.uri`, else MLflow's own local default (a SQLite file in the
working directory), so a laptop run needs no server.
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any, Protocol

from dist_dml.distributed import DistContext


class Tracker(Protocol):
    run_id: str | None
    location: str

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path, folder: str | None = None) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


def metric_name(name: str) -> str:
    """MLflow rejects '@' and other characters: recall@1 -> recall_at_1."""
    return re.sub(r"[^0-9A-Za-z_\-./ ]", "_", name.replace("@", "_at_"))


class NullTracker:
    """What ranks other than 0 (and runs with tracking disabled) log to."""

    def __init__(self, run_id: str | None = None):
        self.run_id, self.location = run_id, ""

    def log_params(self, params):
        pass

    def log_metrics(self, metrics, step):
        pass

    def log_artifact(self, path, folder=None):
        pass

    def close(self, status="FINISHED"):
        pass


class MlflowTracker:
    def __init__(self, config, ctx: DistContext, tags: dict[str, str], resume_run_id: str | None = None):
        import mlflow

        self.mlflow = mlflow
        uri = os.environ.get("MLFLOW_TRACKING_URI") or config.uri
        if uri:
            mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(config.experiment)
        if config.system_metrics:
            mlflow.set_system_metrics_node_id(f"node{ctx.node_rank}")
        run = None
        if resume_run_id:  # a resumed training continues its run
            try:
                run = mlflow.start_run(run_id=resume_run_id, log_system_metrics=config.system_metrics)
            except mlflow.exceptions.MlflowException:
                run = None
        if run is None:
            run = mlflow.start_run(run_name=config.run_name, log_system_metrics=config.system_metrics, tags=tags)
        self.run_id = run.info.run_id
        self.location = f"{mlflow.get_tracking_uri()} (experiment {config.experiment!r}, run {self.run_id})"

    def log_params(self, params):
        items = {k: ("" if v is None else str(v))[:6000] for k, v in params.items()}
        keys = list(items)
        for i in range(0, len(keys), 100):  # MLflow takes at most 100 params per call
            self.mlflow.log_params({k: items[k] for k in keys[i:i + 100]})

    def log_metrics(self, metrics, step):
        clean = {metric_name(k): float(v) for k, v in metrics.items() if v == v}  # drop NaN
        self.mlflow.log_metrics(clean, step=step)

    def log_artifact(self, path, folder=None):
        self.mlflow.log_artifact(str(path), artifact_path=folder)

    def close(self, status="FINISHED"):
        self.mlflow.end_run(status=status)


def build_tracker(config, ctx: DistContext, resume_run_id: str | None = None) -> Tracker:
    """MLflow on rank 0, a NullTracker elsewhere; every rank learns the run id."""
    tracker: Tracker = NullTracker()
    if ctx.is_main and config.enabled:
        tags = {"world_size": str(ctx.world_size), "git_commit": _git_commit()}
        tracker = MlflowTracker(config, ctx, tags, resume_run_id)
    run_id = ctx.broadcast_object(tracker.run_id)
    return tracker if ctx.is_main else NullTracker(run_id)


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
