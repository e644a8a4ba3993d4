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
import time
from pathlib import Path

import torch

from dist_dml import plots
from dist_dml.checkpoint import Checkpointer
from dist_dml.config import RunConfig, dump_yaml
from dist_dml.data import TrainStream
from dist_dml.distributed import DistContext
from dist_dml.engine import TrainEngine
from dist_dml.evaluation import evaluate
from dist_dml.losses import build_loss
from dist_dml.models import TrainModule, build_model
from dist_dml.objective import GlobalBatchObjective, StepResult
from dist_dml.sampling import build_sampler
from dist_dml.tracking import build_tracker

HIST_BINS = 200  # sampled-negative distances over [0, 2]


class TrainingStopped(RuntimeError):
    pass


def sized_loss_config(loss, stream: TrainStream):
    """Per-class / per-image beta tables sized from the training split where the config says 0."""
    return dataclasses.replace(loss, num_classes=loss.num_classes or stream.num_classes,
                               num_images=loss.num_images or stream.num_images)


def train(cfg: RunConfig, ctx: DistContext) -> dict:
    out = Path(cfg.train.output_dir)
    stream = TrainStream(cfg.data, ctx.rank, ctx.world_size)
    total_steps = cfg.train.steps or sum(stream.steps_in_epoch(e) for e in range(cfg.train.epochs))
    torch.manual_seed(cfg.train.seed)
    module = TrainModule(build_model(cfg.model, ctx.device), build_loss(sized_loss_config(cfg.loss, stream)))
    engine = TrainEngine(module, ctx, cfg.optimizer, cfg.deepspeed, micro_batch=cfg.data.local_batch,
                         lr_lambda=cfg.optimizer.lr_lambda(total_steps))
    objective = GlobalBatchObjective(build_sampler(cfg.sampler), engine.module.loss, ctx)
    checkpoints = Checkpointer(out / "checkpoints", cfg.checkpoint.keep_last, ctx)
    step, resumed = _resume(cfg, engine, checkpoints, stream, ctx)
    tracker = build_tracker(cfg.tracking, ctx, resume_run_id=resumed.get("mlflow_run_id"))
    results: dict = {"mlflow": tracker.location, "run_id": tracker.run_id, "total_steps": total_steps}
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_yaml(cfg))
        tracker.log_params(cfg.flat())
        tracker.log_artifact(out / "config.yaml")
    if cfg.eval.at_start and step == 0:
        results["untrained"] = _evaluate(cfg, engine, ctx, tracker, step)

    meter = _Meter(ctx, cfg.train.log_every, total_steps, step)
    bad_in_row, status = 0, "FAILED"
    try:
        while step < total_steps:
            for batch in stream.loader():
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
                stream.step += 1
                meter.update(result, batch, engine, tracker, step)
                if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < total_steps:
                    _evaluate(cfg, engine, ctx, tracker, step)
                if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0:
                    _save(checkpoints, engine, stream, cfg, step, tracker.run_id)
                if step >= total_steps:
                    break
            if stream.step >= stream.steps_per_epoch:
                stream.set_epoch(stream.epoch + 1)
        _save(checkpoints, engine, stream, cfg, step, tracker.run_id)
        results["trained"] = _evaluate(cfg, engine, ctx, tracker, step, final=True)
        results["steps"] = step
        results["skipped_steps"] = meter.skipped
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


def _resume(cfg: RunConfig, engine, checkpoints: Checkpointer, stream: TrainStream, ctx) -> tuple[int, dict]:
    """(step, client state) of the checkpoint to continue from; (0, {}) for a fresh run."""
    resume = cfg.checkpoint.resume
    if resume == "none":
        return 0, {}
    directory, tag = checkpoints.directory, None
    if resume == "auto":
        tag = checkpoints.latest()
    else:
        path = Path(resume)
        directory, tag = path.parent, path.name
    if tag is None:
        return 0, {}
    state = Checkpointer(directory, cfg.checkpoint.keep_last, ctx).load(engine, tag)
    stream.load_state_dict(state["data"])
    torch.set_rng_state(state["torch_rng"])
    if state.get("config_digest") != cfg.digest() and ctx.is_main:
        print(f"[train] note: resuming {directory / tag} under a changed config", flush=True)
    if ctx.is_main:
        print(f"[train] resumed from {directory / tag} at step {state['step']}", flush=True)
    return int(state["step"]), state


def _save(checkpoints: Checkpointer, engine, stream: TrainStream, cfg: RunConfig, step: int,
          run_id: str | None) -> None:
    if checkpoints.latest() == f"step{step:08d}":
        return
    state = {"step": step, "data": stream.state_dict(), "torch_rng": torch.get_rng_state(),
             "config_digest": cfg.digest(), "mlflow_run_id": run_id or ""}
    checkpoints.save(engine, step, state)


def _evaluate(cfg: RunConfig, engine, ctx: DistContext, tracker, step: int, final: bool = False) -> dict[str, float]:
    plots_dir = Path(cfg.train.output_dir) / "plots" if final else None
    metrics, plot_paths = evaluate(engine.module.model, cfg.data, cfg.eval, ctx, progress=final, plots_dir=plots_dir)
    if ctx.is_main:
        tracker.log_metrics(metrics, step)
        for path in plot_paths:
            tracker.log_artifact(path, "plots")
        shown = " ".join(f"{k.replace('recall_at_', 'R@')}={v:.4f}" for k, v in metrics.items() if k != "unanswerable")
        print(f"[eval] step {step}: {shown}", flush=True)
    return metrics


def _finish(cfg, engine, ctx, tracker, meter: "_Meter", results: dict, out: Path) -> None:
    if not ctx.is_main:
        return
    model = engine.module.model
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    tmp = out / ".final_model.pt.tmp"
    torch.save({"state_dict": state, "config": cfg.to_dict()}, tmp)
    os.replace(tmp, out / "final_model.pt")
    tracker.log_artifact(out / "final_model.pt", "model")
    if meter.histogram.sum() > 0:
        (out / "plots").mkdir(exist_ok=True)
        plot = plots.negative_distances(meter.histogram.numpy(), cfg.model.embedding_dim, cfg.sampler.cutoff,
                                        cfg.sampler.nonzero_loss_cutoff, out / "plots" / "negative_distances.png")
        tracker.log_artifact(plot, "plots")
    (out / "results.json").write_text(json.dumps(results, indent=1))


class _Meter:
    """Step statistics, reduced over ranks every `log_every` steps, printed and logged by rank 0."""

    SUMS = ("loss", "d_ap_sum", "d_an_sum", "triplets", "beta_sum", "fallback", "anchors", "images",
            "corrupt_shards", "bad_records", "unknown_members")

    def __init__(self, ctx: DistContext, every: int, total: int, start_step: int):
        self.ctx, self.every, self.total = ctx, every, total
        self.start_step, self.start_time, self.last_time = start_step, time.time(), time.time()
        self.skipped = 0
        self.window = dict.fromkeys(("images", "corrupt_shards", "bad_records", "unknown_members"), 0.0)
        self.window_histogram = torch.zeros(HIST_BINS)  # sampled-negative distances since the last log
        self.histogram = torch.zeros(HIST_BINS)  # all ranks, whole run (rank 0's copy is the one used)

    def update(self, result: StepResult, batch: dict, engine, tracker, step: int) -> None:
        self.window["images"] += batch["labels"].numel()
        for key, value in batch["errors"].items():
            self.window[key] += value
        d_an = result.output.negative_distances.float().cpu()
        self.window_histogram += torch.histc(d_an, bins=HIST_BINS, min=0.0, max=2.0)
        if step % self.every and step != self.total:
            return
        metrics = self._reduce(result, engine, step)
        if self.ctx.is_main:
            tracker.log_metrics(metrics, step)
            print(f"[train] step {step}/{self.total} loss={metrics['loss']:.4f} "
                  f"active={metrics['active_fraction']:.3f} d_ap={metrics['d_ap_mean']:.3f} "
                  f"d_an={metrics['d_an_mean']:.3f} fallback={metrics['fallback_rate']:.3f} "
                  f"images/s={metrics['images_per_s']:.0f} ETA {_duration(metrics['eta_s'])}", flush=True)

    def _reduce(self, result: StepResult, engine, step: int) -> dict[str, float]:
        out, triplets, stats = result.output, result.triplets, result.output.stats
        local = {"loss": out.loss.detach(), "fallback": triplets.num_fallback, "anchors": triplets.num_anchors,
                 "beta_sum": stats.get("beta_sum", 0.0), **{k: stats[k] for k in ("d_ap_sum", "d_an_sum", "triplets")},
                 **self.window}
        sums = torch.tensor([float(local[k]) for k in self.SUMS], device=self.ctx.device)
        total = dict(zip(self.SUMS, self.ctx.all_reduce_sum(sums).cpu().tolist()))
        hist = self.ctx.all_reduce_sum(self.window_histogram.to(self.ctx.device)).cpu()
        self.histogram += hist
        now, done = time.time(), max(step - self.start_step, 1)
        n = max(total["triplets"], 1.0)
        metrics = {
            "loss": total["loss"], "active_fraction": float(out.active) / max(float(out.terms), 1.0),
            "d_ap_mean": total["d_ap_sum"] / n, "d_an_mean": total["d_an_sum"] / n,
            "fallback_rate": total["fallback"] / max(total["anchors"], 1.0),
            "images_per_s": total["images"] / max(now - self.last_time, 1e-9),
            "eta_s": (self.total - step) * (now - self.start_time) / done,
            "skipped_steps": float(self.skipped),
            **{k: total[k] for k in ("corrupt_shards", "bad_records", "unknown_members")},
            **{f"d_an_q{int(q * 100)}": v for q, v in _quantiles(hist).items()},
            **{f"lr_{name}": lr for name, lr in engine.learning_rates().items()},
        }
        if "beta_sum" in stats:
            inf = torch.tensor([float("inf")], device=self.ctx.device)
            low = self.ctx.all_reduce(stats["beta_min"].reshape(1).float() if "beta_min" in stats else inf, "min")
            high = self.ctx.all_reduce(stats["beta_max"].reshape(1).float() if "beta_max" in stats else -inf, "max")
            metrics.update(beta_mean=total["beta_sum"] / n, beta_min=float(low), beta_max=float(high))
        self.last_time = now
        self.window = dict.fromkeys(self.window, 0.0)
        self.window_histogram.zero_()
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
