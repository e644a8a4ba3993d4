"""The one module that imports MLflow. Rank 0 logs; every other rank gets a do-nothing tracker.

MLFLOW_TRACKING_URI, else `tracking.uri`, else MLflow's own local default (a SQLite file in the
working directory), so a laptop run needs no server.

A server that does not answer is found at start, within about 2 x `tracking.timeout_s`: the run stops
with one line naming the URI, or, with `tracking.required: false`, trains without tracking. Once
training runs, tracking never stops it: a failing call warns and tracking pauses for a while
(PAUSE_S) before it tries again, so a dead server costs the run a few bounded timeouts, not hours.
Params are logged once, by a fresh run; a resumed run records what its config changes (a tag and an
artifact per resume), since MLflow refuses to change a logged param.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from dist_dml.infra.distributed import DistContext
from dist_dml.infra.errors import UserError, one_line

PAUSE_S = 300.0  # after a failed call, tracking rests this long before it tries again
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


def model_requirements(model) -> list[str]:
    """What the logged model needs to serve (dist_dml itself travels with it as code)."""
    from importlib.metadata import PackageNotFoundError, version

    needed = ["torch", "torchvision", "numpy", "pyyaml", "pillow", "imagesize"]
    if model.backbone.startswith("timm:"):
        needed.append("timm")
    pins = []
    for name in needed:
        try:
            pins.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            pins.append(name)
    return pins


class TrackingError(UserError):
    """The tracking server cannot be reached at start (and tracking.required is true)."""

    on_every_rank = True


class Tracker(Protocol):
    run_id: str | None
    location: str

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path, folder: str | None = None) -> None: ...
    def record_resume(self, step: int, changes: dict[str, tuple[Any, Any]]) -> None: ...
    def set_tag(self, key: str, value: str) -> None: ...
    def log_model(self, checkpoint: Path, model, image_size: int) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


def metric_name(name: str) -> str:
    """MLflow rejects '@' and other characters: recall@1 -> recall_at_1."""
    return re.sub(r"[^0-9A-Za-z_\-./ ]", "_", name.replace("@", "_at_"))


NESTED_PREFIX = {"postprocessed": "pp"}  # the metrics after retrieval post-processing log as pp_recall_at_1, ...


def flat_metrics(metrics: dict) -> dict[str, float]:
    """The numbers of a metrics dict, a nested one (``postprocessed``) as prefixed keys (pp_...); text left out."""
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update({f"{NESTED_PREFIX.get(key, key)}_{k}": v for k, v in flat_metrics(value).items()})
        elif isinstance(value, (int, float)):
            flat[key] = value
    return flat


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

    def record_resume(self, step, changes):
        pass

    def set_tag(self, key, value):
        pass

    def log_model(self, checkpoint, model, image_size):
        pass

    def close(self, status="FINISHED"):
        pass


def tracking_uri(config) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or config.uri or ""


def unreachable(uri: str, timeout_s: float, tries: int = 2) -> str | None:
    """Why an http(s) tracking server does not answer its /health check (None if it does, or if the URI
    is a local store). At most ``tries`` x ``timeout_s`` seconds."""
    if not uri.startswith(("http://", "https://")):
        return None
    problem = None
    for attempt in range(tries):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as response:
                if response.status == 200:
                    return None
                problem = f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            problem = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            problem = str(getattr(exc, "reason", exc))
        if attempt + 1 < tries:
            time.sleep(1.0)
    return problem


def request_limits(timeout_s: float) -> None:
    """Each MLflow request of this process bounded by ``tracking.timeout_s`` (MLflow's defaults: 120 s x 7
    retries, where a server stops answering mid-run). MLflow reads its timeout from its environment variable at
    every request and takes no other: the config's value is written there, replacing whatever an earlier run in
    this process, the grid that started this cell, or the shell had put there (said when it differs)."""
    wanted = str(math.ceil(timeout_s))  # MLflow's variable is whole seconds; 0.5 s must not become 0 (no limit)
    before = os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT")
    if before not in (None, wanted):
        print(f"[tracking] note: MLFLOW_HTTP_REQUEST_TIMEOUT={before} in the environment is replaced by "
              f"tracking.timeout_s ({wanted} s per request)", file=sys.stderr, flush=True)
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = wanted
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")


def failure_message(uri: str, problem: str) -> str:
    """The line a run that cannot reach its tracking server prints (at start, and in the launch check)."""
    return (f"MLflow tracking at {uri or 'the default store'} failed: {problem} (start the server, fix "
            "tracking.uri or MLFLOW_TRACKING_URI, or set tracking.required=false to train without it)")


class MlflowTracker:
    def __init__(self, config, ctx: DistContext, tags: dict[str, str], resume_run_id: str | None = None):
        self.config = config  # the tracking section
        request_limits(config.timeout_s)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # in the middle of the training's log
        import mlflow

        if not os.environ.get("MLFLOW_LOGGING_LEVEL"):  # MLflow's INFO lines (its database, registrations) are its own
            logging.getLogger("mlflow").setLevel(logging.WARNING)
        self.mlflow = mlflow
        uri = tracking_uri(config)
        if uri:
            mlflow.set_tracking_uri(uri)
        experiment = mlflow.set_experiment(config.experiment)
        if experiment.tags.get(EXPERIMENT_KIND) != MODEL_TRAINING:  # else MLflow's UI opens its GenAI view
            mlflow.set_experiment_tag(EXPERIMENT_KIND, MODEL_TRAINING)
        if config.system_metrics:
            mlflow.set_system_metrics_node_id(f"node{ctx.node_rank}")
        run = None
        if resume_run_id:  # a resumed training continues its run
            try:
                run = mlflow.start_run(run_id=resume_run_id, log_system_metrics=config.system_metrics)
            except mlflow.exceptions.MlflowException:
                run = None
        self.fresh = run is None
        if run is None:
            if config.parent_run_id:  # a cell of a grid (dist-dml grid): a child run of the grid's
                tags = {**tags, "mlflow.parentRunId": config.parent_run_id}
            run = mlflow.start_run(run_name=config.run_name, log_system_metrics=config.system_metrics, tags=tags)
        self.run_id = run.info.run_id
        self.location = f"{mlflow.get_tracking_uri()} (experiment {config.experiment!r}, run {self.run_id})"
        self.paused_until = 0.0

    def _call(self, what: str, fn, *args, **kwargs) -> None:
        """One MLflow call that never stops training: a failure warns, and tracking rests PAUSE_S."""
        now = time.time()
        if now < self.paused_until:
            return
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 -- whatever the server or the store says, training goes on
            self.paused_until = time.time() + PAUSE_S
            first = one_line(exc, first_line=True)
            print(f"[tracking] warning: {what} failed ({first}); training goes on, tracking retries in "
                  f"{PAUSE_S / 60:.0f} min", file=sys.stderr, flush=True)

    def log_params(self, params):
        """Only a fresh run logs params (MLflow refuses to change one): see record_resume."""
        if not self.fresh:
            return
        items = {k: ("" if v is None else str(v))[:6000] for k, v in params.items()}
        keys = list(items)
        for i in range(0, len(keys), 100):  # MLflow takes at most 100 params per call
            self._call("logging params", self.mlflow.log_params, {k: items[k] for k in keys[i:i + 100]})

    def log_metrics(self, metrics, step):
        clean = {metric_name(k): float(v) for k, v in flat_metrics(metrics).items() if v == v}  # drop NaN
        self._call(f"logging metrics at step {step}", self.mlflow.log_metrics, clean, step=step)

    def log_artifact(self, path, folder=None):
        self._call(f"logging {path}", self.mlflow.log_artifact, str(path), artifact_path=folder)

    def record_resume(self, step, changes):
        """A resume at ``step``: tag `resumed_at_step_N` with the changed keys (old -> new), and the full
        list as the artifact resume/step_N.json."""
        summary = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items()) or "no config change"
        self._call("tagging the resume", self.mlflow.set_tag, f"resumed_at_step_{step}", summary[:5000])
        if changes:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"step_{step}.json"
                path.write_text(json.dumps({k: {"was": old, "now": new} for k, (old, new) in changes.items()},
                                           indent=1, default=str))
                self.log_artifact(path, "resume")

    def set_tag(self, key, value):
        self._call(f"tagging {key}", self.mlflow.set_tag, key, value)

    def log_model(self, checkpoint, model, image_size):
        """The final model as an MLflow Model (pyfunc, from code: dist_dml/serve/mlflow_model.py with the dist_dml
        package beside it; nothing pickled): uint8 (N, H, W, 3) images in, L2-normalised float32 (N, d)
        embeddings out, with its signature and an input example; registered as tracking.register_as. ``model``: the
        model section (its backbone and embedding width), ``image_size``: the example's."""
        from mlflow.models.signature import ModelSignature
        from mlflow.types.schema import Schema, TensorSpec

        import dist_dml

        if not self.config.log_model:
            return
        size, dim = image_size, model.embedding_dim
        signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
                                   outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, dim))]))
        example = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
        package = Path(dist_dml.__file__).resolve().parent
        self._call("logging the model", self.mlflow.pyfunc.log_model, name="model",
                   python_model=str(package / "serve" / "mlflow_model.py"), artifacts={"checkpoint": str(checkpoint)},
                   code_paths=[str(package)], signature=signature, input_example=example,
                   pip_requirements=model_requirements(model),
                   registered_model_name=self.config.register_as or None)

    def close(self, status="FINISHED"):
        """The last call, tried even while logging rests after a failure: otherwise the run shows as running in
        MLflow for ever, and this process keeps it active (a next run here could not start)."""
        try:
            self.mlflow.end_run(status=status)
        except Exception as exc:  # noqa: BLE001 -- the training's result is written already
            first = one_line(exc, first_line=True)
            print(f"[tracking] warning: ending the MLflow run failed ({first}); it may show as running there",
                  file=sys.stderr, flush=True)


def build_tracker(config, ctx: DistContext, resume_run_id: str | None = None) -> Tracker:
    """MLflow on rank 0, a NullTracker elsewhere; every rank learns the run id, or every rank raises
    TrackingError where the server cannot be reached and tracking is required."""
    made: list[Tracker] = []

    def start() -> str | None:
        if not config.enabled:
            return None
        uri = tracking_uri(config)
        problem = unreachable(uri, config.timeout_s)
        if problem is None:
            tags = {"world_size": str(ctx.world_size), "git_commit": _git_commit()}
            try:
                made.append(MlflowTracker(config, ctx, tags, resume_run_id))
                return made[0].run_id
            except Exception as exc:  # noqa: BLE001 -- reported in one line below
                problem = one_line(exc, first_line=True)
        message = failure_message(uri, problem)
        if config.required:
            raise TrackingError(message)
        print(f"[tracking] warning: {message}; training without tracking", file=sys.stderr, flush=True)
        return None

    run_id = ctx.decide(start)
    return made[0] if made else NullTracker(run_id)


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
