"""What a training reports: step statistics over each log window (reduced over ranks, printed and logged by
rank 0), the sampled-negative distance histogram of the whole run, a collapse watch, and each epoch's
coverage of its records. The Meter is one of a run's stateful parts (it travels in the checkpoint)."""
from __future__ import annotations

import math
import sys
import time

import numpy as np
import torch

from dist_dml.data import FAULTS
from dist_dml.infra.distributed import DistContext
from dist_dml.method.objective import StepResult

HIST_BINS = 200  # sampled-negative distances over [0, 2]


class Meter:
    """Step statistics summed over the log window, reduced over ranks every `log_every` steps, printed and
    logged by rank 0: every figure (loss, distances, fallback, beta) is the window's mean, not the last
    step's. The sampled-negative histogram covers the whole run, across resumes (it travels in the
    checkpoint with the step it starts at)."""

    MEMORY = ("memory_negatives", "memory_positives", "memory_age_sum", "memory_draws", "memory_fill")
    SUMS = ("loss", "steps", "active", "terms", "d_ap_sum", "d_an_sum", "triplets", "beta_sum", "fallback",
            "anchors", "images", "spread", *MEMORY, *FAULTS)
    # Already global on every rank: not summed over ranks (the memory's fill is the same on every rank too).
    GLOBAL = ("steps", "active", "terms", "spread", "memory_fill")
    INACTIVE_WINDOWS = 3  # log windows in a row without an active pair that count as a collapse

    def __init__(self, ctx: DistContext, config):
        """``config``: the train section (log_every, collapse_spread)."""
        self.ctx, self.every, self.total = ctx, config.log_every, 0
        self.collapse_spread = config.collapse_spread  # a window's mean embedding spread below: a collapse
        self.inactive_windows, self.collapsed = 0, False
        self.start_step, self.start_time, self.last_time = 0, time.time(), time.time()
        self.skipped = 0
        self.window = dict.fromkeys(self.SUMS, 0.0)
        self.beta_range = [math.inf, -math.inf]
        self.window_histogram = torch.zeros(HIST_BINS)  # sampled-negative distances since the last reduction
        self.histogram = torch.zeros(HIST_BINS)  # all ranks, steps histogram_from.. (rank 0's copy is used)
        self.histogram_from: int | None = None  # the first step the histogram covers (None: not begun)
        self.faults = dict.fromkeys(FAULTS, 0)  # the run's totals over all ranks (as of the last reduction)

    def begin(self, step: int, total: int) -> None:
        """Training goes on from ``step`` (after a restore) to ``total``: the ETA counts from here."""
        self.start_step, self.total = step, total
        self.start_time = self.last_time = time.time()
        if self.histogram_from is None:
            self.histogram_from = step + 1

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
        for key, value in result.memory.items():
            w[key] = value if key == "memory_fill" else w[key] + value
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
                  + (f" memory={metrics['memory_fill']:.0f} negatives_from_memory={metrics['memory_negative_share']:.2f}"
                     f" age={metrics['memory_mean_age']:.1f}" if "memory_fill" in metrics else "")
                  + "".join(f" {k}={v}" for k, v in self.faults.items() if v), flush=True)
        return True

    @staticmethod
    def _memory_metrics(total: dict, triplets: float) -> dict[str, float]:
        """The cross-batch memory's fill, the shares of sampled negatives and positives it gave, and the mean
        age in steps of the items drawn from it (nothing without a memory)."""
        if not total["memory_fill"]:
            return {}
        return {"memory_fill": total["memory_fill"], "memory_negative_share": total["memory_negatives"] / triplets,
                "memory_positive_share": total["memory_positives"] / triplets,
                "memory_mean_age": total["memory_age_sum"] / max(total["memory_draws"], 1.0)}

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
            print(f"[train] warning: step {step}: {problem}; {self._collapse_hint(metrics)}", file=sys.stderr,
                  flush=True)
            tracker.set_tag("warning", f"step {step}: {problem}"[:5000])
        elif problem is None and self.collapsed and self.ctx.is_main:
            print(f"[train] step {step}: the embeddings are spread again (spread {spread:.3f})", flush=True)
            tracker.set_tag("warning", f"collapsed before step {step}, spread again since")
        self.collapsed = problem is not None

    def _collapse_hint(self, metrics: dict[str, float]) -> str:
        """What to try: the cross-batch memory where it gave negatives in the window (the usual cause: its
        negatives, nearly all of them, drive the margin loss's beta down and the batch contracts with it), else
        the learning rate."""
        share = metrics.get("memory_negative_share", 0.0)
        if share > 0:
            return (f"the cross-batch memory gave {share:.0%} of the sampled negatives: keep its pairs from moving "
                    "beta (memory.beta=false), keep the batch's own negatives beside the memory's (memory.mode=add) "
                    "and start it later (memory.start_step)")
        return "the learning rate (optimizer.lr) may be too high"

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
            **self._memory_metrics(total, n),
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


class EpochReport:
    """How many of each epoch's records were drawn, and how often (its metrics logged at its end). An epoch
    that missed a record or drew one again is printed at once; epochs whose every record was drawn once are
    printed together with the next log line (a short epoch would otherwise fill the log)."""

    def __init__(self, ctx: DistContext, tracker):
        self.ctx, self.tracker = ctx, tracker
        self.clean: list[tuple[int, int, int]] = []  # (epoch, its last step, records), not printed yet

    def finished(self, epoch: int, drawn: np.ndarray, step: int, kept: np.ndarray | None = None) -> None:
        """``drawn``: the epoch's draws per record over all ranks (the same on every rank); ``kept``: the records
        the epoch holds (EpochPlan.kept: those of held-out classes are in none), None for all."""
        drawn = drawn if kept is None else drawn[kept]
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
