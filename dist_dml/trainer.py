"""`dist-dml train`: the training loop, read top to bottom.

    torchrun --nproc_per_node N -m dist_dml.cli train configs/sop_resnet50.yaml [section.key=value ...]

Per step, on every rank: a P x K batch of its own -> embeddings -> the global batch (all-gather) ->
triplets for its anchors -> its share of the loss -> DeepSpeed backward and step. A non-finite loss
on any rank skips the step on all ranks; `train.max_bad_steps` in a row stop the run.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dist_dml import plots
from dist_dml.checkpoint import CheckpointError, Checkpointer, read_meta, resume_target, saved_world_size
from dist_dml.config import RunConfig, dump_yaml
from dist_dml.data import FAULTS, TrainStream, verify
from dist_dml.distributed import DistContext
from dist_dml.engine import TrainEngine, to_universal
from dist_dml.errors import as_write_error
from dist_dml.evaluation import evaluate, evaluation_problem, format_metrics
from dist_dml.losses import build_loss
from dist_dml.models import TrainModule, build_model
from dist_dml.objective import GlobalBatchObjective, StepResult
from dist_dml.run_folder import FolderError, RunFolder
from dist_dml.sampling import build_sampler
from dist_dml.tracking import build_tracker
from dist_dml.weights import local_weights

HIST_BINS = 200  # sampled-negative distances over [0, 2]


class TrainingStopped(RuntimeError):
    pass


def sized_loss_config(loss, stream: TrainStream):
    """Per-class / per-image beta tables sized from the training split where the config says 0."""
    return dataclasses.replace(loss, num_classes=loss.num_classes or stream.num_classes,
                               num_images=loss.num_images or stream.num_images)


@dataclasses.dataclass
class Prepared:
    """A run set up to train: its stream and engine at the step it continues from."""

    stream: TrainStream
    engine: TrainEngine
    step: int
    total_steps: int
    resumed: dict  # the checkpoint's client state ({} for a fresh run)
    changes: dict  # {section.key: (saved, now)}
    run_id: str  # the run that owns the output folder (OUTPUT/run.json), recorded in every checkpoint


def prepare(cfg: RunConfig, ctx: DistContext) -> Prepared:
    """The data stream, the model and its engine, and the resume if any: the checkpoint rank 0 picks
    (converted for this world size where its ZeRO state was partitioned for another)."""
    stream = TrainStream(cfg.data, ctx.rank, ctx.world_size)
    for note in (stream.single_image_note(), stream.layout_note()):
        if ctx.is_main and note:
            print(f"[train] warning: {note}", flush=True)
    verify(stream, ctx, "training")
    target = _pick_checkpoint(cfg, ctx)
    run_id = _own_run(cfg, ctx, target)
    load_from, universal = _loadable(target, cfg, ctx) if target else (None, False)
    steps = {}
    schedule = _schedule(cfg.optimizer, cfg.train.steps or stream.remaining_steps(cfg.train.epochs), steps)
    torch.manual_seed(cfg.train.seed)
    weights = local_weights(cfg.model, ctx)  # fetched once per node where it is a download
    model = build_model(cfg.model, ctx.device, gather=ctx.all_gather_with_grad,  # BatchNorm as model.norm says
                        image_size=cfg.data.image_size, weights=weights)
    if ctx.is_main and model.weights_report:
        print(model.weights_report, flush=True)
    module = TrainModule(model, build_loss(sized_loss_config(cfg.loss, stream)))
    engine = TrainEngine(module, ctx, cfg.optimizer, cfg.deepspeed, micro_batch=cfg.data.local_batch,
                         lr_lambda=schedule, universal=universal)
    step, resumed, changes = _resume(cfg, engine, stream, ctx, target, load_from)
    # Steps to the end of the last epoch from where the data stream stands (another world size: other steps).
    steps["total"] = cfg.train.steps or step + stream.remaining_steps(cfg.train.epochs)
    return Prepared(stream, engine, step, steps["total"], resumed, changes, run_id)


def _own_run(cfg: RunConfig, ctx: DistContext, target: Path | None) -> str:
    """The id of the run that owns the output folder, decided by rank 0 (which holds the folder): a fresh
    start makes a new run; a resume continues the folder's run (or the checkpoint's, in a folder that has
    none yet). Every checkpoint records it."""
    run_id = None
    if ctx.is_main:
        folder = RunFolder(Path(cfg.train.output_dir))
        keep = (folder.run_id() or read_meta(target).get("run_id")) if target is not None else None
        run_id = folder.claim(keep)
    return ctx.broadcast_object(run_id)


def hold_output(cfg: RunConfig, ctx: DistContext) -> RunFolder | None:
    """Rank 0 holds the run's output folder for the training's life (None elsewhere); every rank stops alike,
    in one line, where another training holds it or it cannot be written."""
    folder, problem = None, None
    if ctx.is_main:
        folder = RunFolder(Path(cfg.train.output_dir))
        try:
            note = folder.acquire()
            if note:
                print(note, flush=True)
        except FolderError as exc:
            problem = str(exc)
    problem = ctx.broadcast_object(problem)
    if problem:
        raise FolderError(problem)
    return folder


def finished_already(cfg: RunConfig, step: int, total_steps: int) -> dict | None:
    """The results of this run if it finished at ``step`` already (a restart after its end: torchrun's
    --max-restarts after a designed exit, a rank killed after the results were written): nothing is
    trained or evaluated again."""
    path = Path(cfg.train.output_dir) / "results.json"
    if step < total_steps or not path.is_file():
        return None
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return results if isinstance(results, dict) and results.get("steps") == step and "trained" in results else None


def train(cfg: RunConfig, ctx: DistContext) -> dict:
    ctx.init_process_group(timeout_minutes=cfg.deepspeed.timeout_minutes)  # rank 0 decides for all
    folder = hold_output(cfg, ctx)
    try:
        return _train(cfg, ctx)
    finally:
        if folder is not None:
            folder.release()


def _train(cfg: RunConfig, ctx: DistContext) -> dict:
    out = Path(cfg.train.output_dir)
    run = prepare(cfg, ctx)
    stream, engine, step, total_steps, resumed, changes = (run.stream, run.engine, run.step, run.total_steps,
                                                            run.resumed, run.changes)
    done = finished_already(cfg, step, total_steps)
    if done is not None:
        if ctx.is_main:
            print(f"[train] run {cfg.train.name!r} finished at step {step} already ({out / 'results.json'}): nothing "
                  "is trained or evaluated again (raise train.steps or train.epochs to train on)", flush=True)
        return done
    objective = GlobalBatchObjective(build_sampler(cfg.sampler), engine.module.loss, ctx)
    checkpoints = Checkpointer(out / "checkpoints", cfg.checkpoint.keep_last, ctx)
    tracker = build_tracker(cfg.tracking, ctx, resume_run_id=resumed.get("mlflow_run_id"))
    results: dict = {"name": cfg.train.name, "mlflow": tracker.location, "run_id": tracker.run_id,
                     "world_size": ctx.world_size, "total_steps": total_steps}
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_yaml(cfg))
        tracker.log_params(cfg.flat())  # a fresh run only: MLflow refuses to change a param
        if resumed:
            tracker.record_resume(step, changes)
        tracker.log_artifact(out / "config.yaml")
    if cfg.eval.at_start and step == 0:
        results["untrained"] = _evaluate(cfg, engine, ctx, tracker, step)

    meter = _Meter(ctx, cfg.train.log_every, total_steps, step, cfg.train.collapse_spread)
    epochs = EpochReport(ctx, tracker)
    meter.load_state_dict(resumed)
    bad_in_row, status = 0, "FAILED"
    try:
        # One DataLoader for the whole run: its workers go on to the next epoch themselves.
        for batch in stream.loader(epochs=1 << 30) if step < total_steps else ():
            assert (batch["epoch"], batch["index"]) == (stream.epoch, stream.step), "data stream out of step"
            result = _forward(engine, objective, batch, ctx, step)
            if _finite_everywhere(result, ctx):
                engine.backward(result.output.loss)
                engine.step()
                bad_in_row = 0
            else:
                bad_in_row += 1
                meter.skipped += 1
                if bad_in_row >= cfg.train.max_bad_steps:
                    raise TrainingStopped(f"{bad_in_row} non-finite losses in a row at step {step}; stopping "
                                          "(train.max_bad_steps)")
            step += 1
            stream.consume(batch)
            finished = stream.advance()
            if finished is not None:
                epochs.finished(batch["epoch"], _global_draws(finished, ctx), step)
            if meter.update(result, batch, engine, tracker, step):
                epochs.flush()
            if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < total_steps:
                _evaluate(cfg, engine, ctx, tracker, step)
            if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0:
                _save(checkpoints, engine, stream, cfg, step, run.run_id, tracker.run_id, meter)
            if step >= total_steps:
                break
        epochs.flush()
        _save(checkpoints, engine, stream, cfg, step, run.run_id, tracker.run_id, meter)
        results["trained"] = _evaluate(cfg, engine, ctx, tracker, step, final=True)
        results["steps"] = step
        results["skipped_steps"] = meter.skipped
        results["data_faults"] = dict(meter.faults)
        _finish(cfg, engine, ctx, tracker, meter, results, out)
        status = "FINISHED"
        return results
    finally:
        tracker.close(status)


def _forward(engine, objective, batch, ctx, step) -> StepResult:
    embeddings = engine(batch["images"].to(ctx.device, non_blocking=True))
    return objective(embeddings, batch["labels"], batch["image_ids"], step)


def _finite_everywhere(result: StepResult, ctx: DistContext) -> bool:
    bad = torch.tensor([0.0 if torch.isfinite(result.output.loss.detach()) else 1.0], device=ctx.device)
    return float(ctx.all_reduce(bad, "max")) == 0.0


def _schedule(optimizer, total: int, holder: dict):
    """The learning-rate multiplier at a step, over ``holder["total"]`` steps (set again once a resume tells
    the steps left: at another world size an epoch has other steps). A function, not a callable object:
    LambdaLR pickles callable objects into its state, which weights_only loading refuses."""
    holder["total"] = total

    def factor(step: int) -> float:
        return optimizer.lr_lambda(holder["total"])(step)

    return factor


def _pick_checkpoint(cfg: RunConfig, ctx: DistContext) -> Path | None:
    """The checkpoint to continue from, or None for a fresh run: rank 0 picks it (reporting any it passes
    over) and every rank gets its pick, or the same CheckpointError."""
    chosen = None
    if ctx.is_main:
        try:
            chosen = ("path", str(resume_target(cfg, report=lambda line: print(line, flush=True)) or ""))
        except CheckpointError as exc:
            chosen = ("error", str(exc))
    kind, value = ctx.broadcast_object(chosen)
    if kind == "error":  # every rank stops alike
        raise CheckpointError(value)
    return Path(value) if value else None


def _loadable(target: Path, cfg: RunConfig, ctx: DistContext) -> tuple[Path, bool]:
    """(folder to load, whether it is a universal checkpoint). ZeRO-1/2 optimizer state saved at another
    world size is partitioned for that one: rank 0 converts it once to DeepSpeed's universal checkpoint
    (kept beside it as stepN.universal), which any world size loads."""
    meta = read_meta(target)
    stage = int(meta.get("zero_stage", cfg.deepspeed.zero_stage))
    world = saved_world_size(target)
    if stage == 0 or world in (None, ctx.world_size):
        return target, False
    dest = target.with_name(target.name + ".universal")
    outcome = None
    if ctx.is_main:
        try:
            if not dest.is_dir():
                print(f"[checkpoint] {target} holds ZeRO-{stage} optimizer state partitioned over {world} processes; "
                      f"converting it for {ctx.world_size} into a universal checkpoint at {dest} (seconds for a "
                      "small model, about a minute per GB of checkpoint)", flush=True)
                started = time.time()
                to_universal(target, dest)
                print(f"[checkpoint] converted in {time.time() - started:.0f}s", flush=True)
        except Exception as exc:  # noqa: BLE001 -- any failure of the converter stops every rank alike
            outcome = f"cannot convert {target} (saved at {world} processes) for {ctx.world_size}: {exc}"
    outcome = ctx.broadcast_object(outcome)
    if outcome:
        raise CheckpointError(outcome + f"; resume with {world} processes instead")
    return dest, True


def _resume(cfg: RunConfig, engine, stream: TrainStream, ctx, target: Path | None,
            load_from: Path | None) -> tuple[int, dict, dict]:
    """(step, client state, config changes) after loading ``load_from`` (``target`` or its universal
    conversion); (0, {}, {}) for a fresh run. The changes are {section.key: (saved, now)} against the
    config the checkpoint was saved with."""
    if target is None:
        return 0, {}, {}
    state = engine.load(load_from.parent, load_from.name)
    try:
        how = stream.load_state_dict(_arrays(state["data"]))
    except ValueError as exc:
        raise CheckpointError(f"cannot continue the data stream of {target}: {exc}") from None
    torch.set_rng_state(state["torch_rng"])
    meta = read_meta(target)
    changes = config_changes(meta.get("config", {}), cfg)
    if changes and ctx.is_main:
        shown = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
        print(f"[train] note: resuming {target} under a changed config: {shown}", flush=True)
    if ctx.is_main:
        saved = meta.get("world_size")
        where = f", saved at {saved} processes, now {ctx.world_size}" if saved not in (None, ctx.world_size) else ""
        print(f"[train] resumed from {target} at step {state['step']}{where}; the data continues {how}", flush=True)
    return int(state["step"]), state, changes


def _arrays(data: dict) -> dict:
    """A data position from a checkpoint: its tensors as numpy arrays."""
    return {k: v.numpy() if torch.is_tensor(v) else v for k, v in data.items()}


def _tensors(data: dict) -> dict:
    """A data position for a checkpoint (loaded with weights_only: tensors, not numpy arrays)."""
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in data.items()}


def _global_draws(draws: tuple[np.ndarray, np.ndarray], ctx: DistContext) -> np.ndarray:
    """The epoch's draws per record over all ranks, from TrainStream.local_draws (a collective)."""
    before, here = draws
    summed = ctx.all_reduce_sum(torch.from_numpy(here).to(ctx.device)).cpu().numpy()
    return before + summed


class EpochReport:
    """How many of each epoch's records were drawn, and how often (its metrics logged at its end). An epoch
    that missed a record or drew one again is printed at once; epochs whose every record was drawn once are
    printed together with the next log line (a short epoch would otherwise fill the log)."""

    def __init__(self, ctx: DistContext, tracker):
        self.ctx, self.tracker = ctx, tracker
        self.clean: list[tuple[int, int, int]] = []  # (epoch, its last step, records), not printed yet

    def finished(self, epoch: int, drawn: np.ndarray, step: int) -> None:
        """``drawn``: the epoch's draws per record over all ranks (the same on every rank)."""
        once, never, again = int((drawn == 1).sum()), int((drawn == 0).sum()), int((drawn > 1).sum())
        if not self.ctx.is_main:
            return
        self.tracker.log_metrics({"epoch_records_drawn": float(once + again), "epoch_records_missed": float(never)},
                                 step)
        if never == 0 and again == 0:
            self.clean.append((epoch, step, len(drawn)))
            return
        self.flush()
        print(f"[train] epoch {epoch} done at step {step}: {once} of its {len(drawn)} records drawn once, "
              f"{never} never (unreadable or skipped: see the reader's warnings), {again} more than once (fewer "
              f"records than classes_per_batch per slot)", flush=True)

    def flush(self) -> None:
        if not self.clean or not self.ctx.is_main:
            return
        (first, _, records), (last, step, _) = self.clean[0], self.clean[-1]
        if first == last:
            print(f"[train] epoch {first} done at step {step}: each of its {records} records drawn once", flush=True)
        else:
            print(f"[train] epochs {first}-{last} done by step {step}: in each, each of its {records} records drawn "
                  "once", flush=True)
        self.clean.clear()


def config_changes(saved: dict, cfg: RunConfig) -> dict[str, tuple]:
    """{section.key: (saved value, this run's)} for every key that differs (a key the saved config lacks
    counts as changed from None)."""
    now = cfg.to_dict()
    changes = {}
    for section, values in now.items():
        for key, value in values.items():
            was = saved.get(section, {}).get(key)
            value = list(value) if isinstance(value, tuple) else value
            was = list(was) if isinstance(was, tuple) else was
            if was != value:
                changes[f"{section}.{key}"] = (was, value)
    return changes


def share_norm_statistics(model: torch.nn.Module, cfg: RunConfig, ctx: DistContext) -> None:
    """model.norm=local: rank 0's BatchNorm buffers on every rank, so that all ranks embed alike and a
    checkpoint holds the statistics every rank evaluates with (sync computes them alike on every rank;
    frozen never changes them)."""
    if cfg.model.norm == "local":
        for buffer in model.buffers():
            ctx.broadcast_(buffer)


def _save(checkpoints: Checkpointer, engine, stream: TrainStream, cfg: RunConfig, step: int, run_id: str,
          mlflow_run_id: str | None, meter: "_Meter") -> None:
    if checkpoints.saved_already(step):
        return
    share_norm_statistics(engine.module.model, cfg, checkpoints.ctx)
    data = _tensors(stream.state_dict(drawn=_global_draws(stream.local_draws(), checkpoints.ctx)))
    state = {"step": step, "data": data, "torch_rng": torch.get_rng_state(),
             "config_digest": cfg.digest(), "mlflow_run_id": mlflow_run_id or "", **meter.state_dict()}
    meta = {"step": step, "run_id": run_id, "world_size": checkpoints.ctx.world_size,
            "zero_stage": cfg.deepspeed.zero_stage,
            "data": {k: data[k] for k in ("epoch", "step", "base_step", *TrainStream.GEOMETRY)},
            "config": cfg.to_dict()}
    checkpoints.save(engine, step, state, meta)


def _evaluate(cfg: RunConfig, engine, ctx: DistContext, tracker, step: int, final: bool = False) -> dict[str, float]:
    plots_dir = Path(cfg.train.output_dir) / "plots" if final else None
    share_norm_statistics(engine.module.model, cfg, ctx)
    metrics, plot_paths = evaluate(engine.module.model, cfg.data, cfg.eval, ctx, progress=final, plots_dir=plots_dir,
                                   title=f"{cfg.train.name}, step {step}")
    if ctx.is_main:
        tracker.log_metrics(metrics, step)
        for path in plot_paths:
            tracker.log_artifact(path, "plots")
        print(f"[eval] step {step}: {format_metrics(metrics)}", flush=True)
        problem = evaluation_problem(metrics, cfg.eval)
        if problem:
            print(f"[eval] {'error' if final else 'warning'}: step {step}: {problem}", file=sys.stderr, flush=True)
    return metrics


def _finish(cfg, engine, ctx, tracker, meter: "_Meter", results: dict, out: Path) -> None:
    if not ctx.is_main:
        return
    model = engine.module.model
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    tmp = out / ".final_model.pt.tmp"
    try:
        torch.save({"state_dict": state, "config": cfg.to_dict()}, tmp)
    except (OSError, RuntimeError) as exc:
        tmp.unlink(missing_ok=True)
        raise as_write_error(out / "final_model.pt", exc) from None
    os.replace(tmp, out / "final_model.pt")
    tracker.log_model(out / "final_model.pt", cfg)
    if meter.histogram.sum() > 0:
        (out / "plots").mkdir(exist_ok=True)
        plot = plots.negative_distances(meter.histogram.numpy(), cfg.model.embedding_dim, cfg.sampler.cutoff,
                                        cfg.sampler.nonzero_loss_cutoff, out / "plots" / "negative_distances.png",
                                        steps=(meter.histogram_from, results["steps"]))
        tracker.log_artifact(plot, "plots")
    (out / "results.json").write_text(json.dumps(results, indent=1))


class _Meter:
    """Step statistics summed over the log window, reduced over ranks every `log_every` steps, printed and
    logged by rank 0: every figure (loss, distances, fallback, beta) is the window's mean, not the last
    step's. The sampled-negative histogram covers the whole run, across resumes (it travels in the
    checkpoint with the step it starts at)."""

    SUMS = ("loss", "steps", "active", "terms", "d_ap_sum", "d_an_sum", "triplets", "beta_sum", "fallback",
            "anchors", "images", "spread", *FAULTS)
    GLOBAL = ("steps", "active", "terms", "spread")  # already global on every rank: not summed over ranks
    INACTIVE_WINDOWS = 3  # log windows in a row without an active pair that count as a collapse

    def __init__(self, ctx: DistContext, every: int, total: int, start_step: int, collapse_spread: float = 0.2):
        self.ctx, self.every, self.total = ctx, every, total
        self.collapse_spread = collapse_spread  # a window's mean embedding spread below this is a collapse
        self.inactive_windows, self.collapsed = 0, False
        self.start_step, self.start_time, self.last_time = start_step, time.time(), time.time()
        self.skipped = 0
        self.window = dict.fromkeys(self.SUMS, 0.0)
        self.beta_range = [math.inf, -math.inf]
        self.window_histogram = torch.zeros(HIST_BINS)  # sampled-negative distances since the last reduction
        self.histogram = torch.zeros(HIST_BINS)  # all ranks, steps histogram_from.. (rank 0's copy is used)
        self.histogram_from = start_step + 1
        self.faults = dict.fromkeys(FAULTS, 0)  # the run's totals over all ranks (as of the last reduction)

    def state_dict(self) -> dict:
        """What a checkpoint keeps (call on every rank: it reduces the pending histogram)."""
        self._reduce_histogram()
        return {"negative_histogram": self.histogram.clone(), "histogram_from": self.histogram_from,
                "skipped_steps": self.skipped, "data_faults": dict(self.faults)}

    def load_state_dict(self, state: dict) -> None:
        if "negative_histogram" in state:
            self.histogram = state["negative_histogram"].float().clone()
            self.histogram_from = int(state["histogram_from"])
            self.skipped = int(state.get("skipped_steps", 0))
            self.faults.update({k: int(v) for k, v in state.get("data_faults", {}).items() if k in self.faults})

    def update(self, result: StepResult, batch: dict, engine, tracker, step: int) -> bool:
        """Add a step to the window; at the end of a log window, reduce, log and print it (returns True)."""
        out, triplets, stats = result.output, result.triplets, result.output.stats
        # The step's device scalars in one transfer (each float() would be a host sync of its own on a GPU).
        keys = ("loss", "active", "terms", "d_ap_sum", "d_an_sum", "triplets", "beta_sum", "spread", "beta_min",
                "beta_max")
        found = {"loss": out.loss.detach(), "active": out.active, "terms": out.terms, "spread": result.spread, **stats}
        values = dict(zip(keys, torch.stack([torch.as_tensor(found.get(k, 0.0), dtype=torch.float32,
                                                             device=out.loss.device).reshape(())
                                             for k in keys]).tolist()))
        w = self.window
        for key in keys[:8]:
            w[key] += values[key]
        w["steps"] += 1
        w["fallback"] += triplets.num_fallback
        w["anchors"] += triplets.num_anchors
        w["images"] += batch["labels"].numel()
        for key, value in batch["errors"].items():
            w[key] += value
        if "beta_min" in stats:
            self.beta_range = [min(self.beta_range[0], values["beta_min"]), max(self.beta_range[1], values["beta_max"])]
        d_an = out.negative_distances.float().cpu()
        self.window_histogram += torch.histc(d_an, bins=HIST_BINS, min=0.0, max=2.0)
        if step % self.every and step != self.total:
            return False
        metrics = self._reduce(engine, step, has_beta="beta_sum" in stats)
        self._watch_collapse(metrics, tracker, step)
        if self.ctx.is_main:
            tracker.log_metrics(metrics, step)
            print(f"[train] step {step}/{self.total} loss={metrics['loss']:.4f} "
                  f"active={metrics['active_fraction']:.3f} d_ap={metrics['d_ap_mean']:.3f} "
                  f"d_an={metrics['d_an_mean']:.3f} spread={metrics['embedding_spread']:.3f} "
                  f"fallback={metrics['fallback_rate']:.3f} "
                  f"images/s={metrics['images_per_s']:.0f} ETA {_duration(metrics['eta_s'])}"
                  + "".join(f" {k}={v}" for k, v in self.faults.items() if v), flush=True)
        return True

    def _watch_collapse(self, metrics: dict[str, float], tracker, step: int) -> None:
        """Warn (log and MLflow) when the embeddings collapse: the window's spread (RMS distance between the
        embeddings of a global batch) below collapse_spread, or INACTIVE_WINDOWS windows without an active
        pair; and say so again when they recover. The same decision on every rank (global figures)."""
        self.inactive_windows = self.inactive_windows + 1 if metrics["active_fraction"] == 0 else 0
        spread = metrics["embedding_spread"]
        problem = None
        if spread < self.collapse_spread:
            problem = (f"the embeddings have collapsed: their spread (RMS distance between the embeddings of a batch; "
                       f"about 1 in a healthy run) is {spread:.4f}, below train.collapse_spread="
                       f"{self.collapse_spread}")
        elif self.inactive_windows >= self.INACTIVE_WINDOWS:
            problem = (f"no active pair in the last {self.inactive_windows} log windows: the loss gives no gradient "
                       "(a margin too small for these distances, or collapsed embeddings)")
        metrics["embedding_collapsed"] = float(problem is not None)
        if problem is not None and not self.collapsed and self.ctx.is_main:
            print(f"[train] warning: step {step}: {problem}; the learning rate (optimizer.lr) may be too high",
                  file=sys.stderr, flush=True)
            tracker.set_tag("warning", f"step {step}: {problem}"[:5000])
        elif problem is None and self.collapsed and self.ctx.is_main:
            print(f"[train] step {step}: the embeddings are spread again (spread {spread:.3f})", flush=True)
            tracker.set_tag("warning", f"collapsed before step {step}, spread again since")
        self.collapsed = problem is not None

    def _reduce_histogram(self) -> torch.Tensor:
        hist = self.ctx.all_reduce_sum(self.window_histogram.to(self.ctx.device)).cpu()
        self.histogram += hist
        self.window_histogram.zero_()
        return hist

    def _reduce(self, engine, step: int, has_beta: bool) -> dict[str, float]:
        sums = torch.tensor([self.window[k] for k in self.SUMS], dtype=torch.float64, device=self.ctx.device)
        reduced = dict(zip(self.SUMS, self.ctx.all_reduce_sum(sums).cpu().tolist()))
        total = {k: (self.window[k] if k in self.GLOBAL else reduced[k]) for k in self.SUMS}
        hist = self._reduce_histogram()
        for key in FAULTS:
            self.faults[key] += int(total[key])
        now, done = time.time(), max(step - self.start_step, 1)
        n, steps = max(total["triplets"], 1.0), max(total["steps"], 1.0)
        metrics = {
            "loss": total["loss"] / steps, "active_fraction": total["active"] / max(total["terms"], 1.0),
            "d_ap_mean": total["d_ap_sum"] / n, "d_an_mean": total["d_an_sum"] / n,
            "fallback_rate": total["fallback"] / max(total["anchors"], 1.0),
            "images_per_s": total["images"] / max(now - self.last_time, 1e-9),
            "eta_s": (self.total - step) * (now - self.start_time) / done,
            "skipped_steps": float(self.skipped),
            "embedding_spread": total["spread"] / steps,
            **{k: total[k] for k in FAULTS},
            **{f"d_an_q{int(q * 100)}": v for q, v in _quantiles(hist).items()},
            **{f"lr_{name}": lr for name, lr in engine.learning_rates().items()},
        }
        if has_beta:
            low = self.ctx.all_reduce(torch.tensor([self.beta_range[0]], device=self.ctx.device), "min")
            high = self.ctx.all_reduce(torch.tensor([self.beta_range[1]], device=self.ctx.device), "max")
            metrics.update(beta_mean=total["beta_sum"] / n, beta_min=float(low), beta_max=float(high))
        self.last_time = now
        self.window = dict.fromkeys(self.window, 0.0)
        self.beta_range = [math.inf, -math.inf]
        return metrics


def _quantiles(hist: torch.Tensor, qs=(0.1, 0.5, 0.9)) -> dict[float, float]:
    total = float(hist.sum())
    if total == 0:
        return {}
    cdf = torch.cumsum(hist, 0) / total
    width = 2.0 / len(hist)
    return {q: float(torch.searchsorted(cdf, torch.tensor(q))) * width + width / 2 for q in qs}


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
