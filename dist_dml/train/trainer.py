"""`dist-dml train`: a run's parts, and its loop read top to bottom.

    torchrun --nproc_per_node N -m dist_dml.cli train configs/sop_resnet50.yaml [section.key=value ...]

Per step, on every rank: a P x K batch of its own -> embeddings -> the global batch (all-gather) ->
triplets for its anchors -> its share of the loss -> DeepSpeed backward and step. A non-finite loss
on any rank skips the step on all ranks; `train.max_bad_steps` in a row stop the run.

The run's state is a set of named parts (dist_dml.train.parts) given to the checkpoint manager once (engine
aside, which DeepSpeed saves itself): the data position, the meter, the RNG, the tracker's run, and the optional
features the config turns on (dist_dml.train.features). The loop calls the parts' hooks and names no feature.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

from dist_dml.config import RunConfig
from dist_dml.config.optimizer import LrSchedule
from dist_dml.config.run import inert_settings
from dist_dml.config.schedule import resolve
from dist_dml.data import TrainStream, Verdicts, verify
from dist_dml.infra.distributed import DistContext
from dist_dml.infra.errors import UserError, as_write_error
from dist_dml.infra.files import replacing, write_atomically
from dist_dml.method.losses import build_loss
from dist_dml.method.objective import GlobalBatchObjective
from dist_dml.method.sampling import build_sampler
from dist_dml.models.embedding import TrainModule, build_model
from dist_dml.models.weights import local_weights
from dist_dml.retrieval import plots
from dist_dml.retrieval.evaluation import evaluate, evaluation_problem, format_metrics
from dist_dml.train.checkpoints import CheckpointManager, read_meta
from dist_dml.train.engine import TrainEngine
from dist_dml.train.features import optional_parts
from dist_dml.train.head_init import init_head_by_pca
from dist_dml.train.meter import EpochReport, Meter
from dist_dml.train.preflight import shm_problem
from dist_dml.train.parts import DataPosition, EngineShapes, RngState, RunParts, TrackerRun, global_draws
from dist_dml.train.run_folder import FolderError, RunFolder, earlier_run, fresh_start_refused, move_aside
from dist_dml.train.step import take_step
from dist_dml.train.tracking import build_tracker


class GroupSchedules:
    """The learning-rate multiplier of each param group by its name (what TrainEngine's LambdaLR calls): the
    resolved schedule for every group, the backbone's held at 0 through the head-only warm-up."""

    def __init__(self, optimizer, schedule):
        self.optimizer, self.schedule, self.made = optimizer, schedule, {}

    def for_group(self, name: str) -> LrSchedule:
        if name not in self.made:
            self.made[name] = LrSchedule.of(self.optimizer, self.schedule, held=name.split(".")[0] == "backbone")
        return self.made[name]

    def set(self, schedule) -> None:
        """Every group's lengths resolved again (a resume restores the lengths its checkpoint saved)."""
        self.schedule = schedule
        for name, made in self.made.items():
            made.set(schedule, held=name.split(".")[0] == "backbone")


class SharedMemoryShort(UserError):
    """A node's shared memory cannot hold what the run's ranks would put there (decided alike on every rank)."""

    on_every_rank = True


class TrainingStopped(UserError, RuntimeError):
    """train.max_bad_steps non-finite losses in a row: a designed stop (decided alike on every rank), not a crash:
    one line and exit 2, and the launcher does not start the same run again."""

    on_every_rank = True


def train(cfg: RunConfig, ctx: DistContext) -> dict:
    """Train ``cfg`` on a live context (distributed.process_group): the output folder held for the whole
    run; a run that finished already is not trained or evaluated again."""
    folder = hold_output(cfg, ctx)
    try:
        trainer = Trainer(cfg, ctx)
        status = "FAILED"
        try:
            done = trainer.finished_already()
            results = done if done is not None else trainer.fit()
            status = "FINISHED"
            return results
        finally:
            trainer.tracker.close(status)
    finally:
        if folder is not None:
            folder.release()


class Trainer:
    """A run set up to continue from where its checkpoints stand: the stream, the engine, the stateful
    parts registered with the checkpoint manager, the step and the steps to go."""

    def __init__(self, cfg: RunConfig, ctx: DistContext):
        self.cfg, self.ctx = cfg, ctx
        self.out = Path(cfg.train.output_dir)
        self.verdicts = Verdicts()  # the job's sha256 verdicts: its training and evaluation shards, once each
        self.stream = TrainStream(cfg.data, ctx.rank, ctx.world_size, verdicts=self.verdicts,
                                  class_sampling=cfg.class_sampling)
        for note in (self.stream.single_image_note(), self.stream.layout_note(), self.stream.class_sampling_note(),
                     *inert_settings(cfg)):
            if ctx.is_main and note:
                print(f"[train] warning: {note}", flush=True)
        held_out = self.stream.held_out_note()
        if ctx.is_main and held_out:
            print(f"[train] {held_out}", flush=True)
        self._refuse_short_shared_memory()
        verify(self.stream, ctx, "training")
        # The checkpoint to continue from, converted if need be.
        self.checkpoints = CheckpointManager(cfg.checkpoint, cfg.train.output_dir, ctx, cfg.to_dict())
        self.run_id = _own_run(cfg, ctx, self.checkpoints.target)
        # Before the engine: a tracking server that does not answer stops the run in seconds. A resume continues
        # its MLflow run, which the checkpoint's index names.
        self.tracker = build_tracker(cfg.tracking, ctx, resume_run_id=self.checkpoints.meta.get("tracker", {}).get(
            "mlflow_run_id") or None)
        try:
            self._set_up()
        except BaseException:
            self.tracker.close("FAILED")
            raise

    def _refuse_short_shared_memory(self) -> None:
        """Every rank stops alike where a node's /dev/shm cannot hold what its ranks will put there (each node's
        first rank measures its own)."""
        problem = shm_problem(self.cfg, self.ctx.local_world_size, self.stream.num_classes) \
            if self.ctx.local_rank == 0 else None
        found = [p for p in self.ctx.all_gather_object(problem) if p]
        if found:
            raise SharedMemoryShort(found[0])

    def _set_up(self) -> None:
        """The engine and the stateful parts, restored from the chosen checkpoint."""
        cfg, ctx = self.cfg, self.ctx
        # The schedule over the steps a fresh run would take at this world size; resolved again once the data
        # position is restored (DeepSpeed needs the scheduler before the checkpoint loads, which tells the steps left).
        self.steps_per_epoch = self.stream.plan.steps(self.stream.position.epoch)
        self.schedule = resolve(cfg, ctx.world_size, self.steps_per_epoch,
                                cfg.train.steps or self.stream.remaining_steps(cfg.train.epochs))
        self.group_schedules = GroupSchedules(cfg.optimizer, self.schedule)
        self.engine = self._engine()
        self.data, self.meter = DataPosition(self.stream.position, ctx), Meter(ctx, cfg.train)
        self.parts = RunParts(self.checkpoints)
        for name, part in (("data", self.data), ("meter", self.meter), ("rng", RngState()),
                           ("tracker", TrackerRun(self.tracker)), ("shapes", EngineShapes(self.engine)),
                           *optional_parts(cfg, self.stream, ctx, self.engine)):
            self.parts.add(name, part)
        self.step = self.checkpoints.restore(self.engine)
        # Steps to the end of the last epoch from where the data stream stands (another world size: other steps).
        self.total_steps = cfg.train.steps or self.step + self.stream.remaining_steps(cfg.train.epochs)
        self.schedule = resolve(cfg, ctx.world_size, self.steps_per_epoch, self.total_steps)
        self.group_schedules.set(self.schedule)  # over what the checkpoint's scheduler saved
        self.meter.begin(self.step, self.total_steps)
        if ctx.is_main:
            print(f"[train] schedule: {self.schedule.describe()}", flush=True)
        self._say_resumed()

    def _engine(self) -> TrainEngine:
        cfg, ctx = self.cfg, self.ctx
        torch.manual_seed(cfg.train.seed)
        weights = local_weights(cfg.model, ctx)  # fetched once per node where it is a download
        model = build_model(cfg.model, ctx.device, gather=ctx.all_gather_with_grad,  # BatchNorm as model.norm says
                            image_size=cfg.data.image_size, weights=weights)
        if ctx.is_main and model.weights_report:
            print(model.weights_report, flush=True)
        if cfg.model.head_init == "pca" and self.checkpoints.target is None:  # a resume keeps its trained head
            if ctx.is_main:
                print(f"[train] head: embedding {cfg.model.head_init_images} training images for its principal "
                      "directions (model.head_init=pca; seconds to a minute)", flush=True)
            line = init_head_by_pca(model.to(ctx.device), cfg, ctx, self.verdicts)
            if ctx.is_main:
                print(line, flush=True)
        module = TrainModule(model, build_loss(sized_loss_config(cfg.loss, self.stream)))
        chunks = cfg.train.embedding_chunks  # DeepSpeed accumulates one backward pass per chunk (dist_dml.train.step)
        return TrainEngine(module, ctx, cfg.optimizer.scaled(self.schedule.lr_factor), cfg.deepspeed,
                           micro_batch=cfg.data.local_batch // chunks, lr_lambda=self.group_schedules,
                           universal=self.checkpoints.universal, accumulation=chunks)

    def _say_resumed(self) -> None:
        target = self.checkpoints.target
        if target is None or not self.ctx.is_main:
            return
        changes = self.checkpoints.changes()
        if changes:
            shown = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
            print(f"[train] note: resuming {target} under a changed config: {shown}", flush=True)
        saved = self.checkpoints.meta.get("world_size")
        where = f", saved at {saved} processes, now {self.ctx.world_size}" if saved not in (None, self.ctx.world_size) else ""
        print(f"[train] resumed from {target} at step {self.step}{where}; the data continues {self.data.how}",
              flush=True)

    def finished_already(self) -> dict | None:
        """The results of this run if it finished at this step already (a restart after its end: torchrun's
        --max-restarts after a designed exit, a rank killed after the results were written), or stopped early at it
        (train.patience)."""
        path = self.out / "results.json"
        if not path.is_file():
            return None
        try:
            results = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not (isinstance(results, dict) and results.get("steps") == self.step and "trained" in results):
            return None
        if self.step < self.total_steps and not results.get("stopped_early"):
            return None
        if self.ctx.is_main:
            print(f"[train] run {self.cfg.train.name!r} finished at step {self.step} already ({path}): nothing is "
                  "trained or evaluated again (raise train.steps or train.epochs to train on)", flush=True)
        return results

    def fit(self) -> dict:
        cfg, ctx, engine, stream, meter, tracker = self.cfg, self.ctx, self.engine, self.stream, self.meter, self.tracker
        position, parts = stream.position, self.parts
        results = self._start(tracker)
        objective = GlobalBatchObjective(build_sampler(cfg.sampler), engine.module.loss, ctx,
                                         pair_weight=cfg.loss.weight, **parts.objective_options())
        epochs, bad_in_row = EpochReport(ctx, tracker), 0
        if self.step == 0 and cfg.data.validation_split and cfg.checkpoint.best_by != "none":
            self._validate(tracker)  # the start is a candidate: a fine-tune never ends worse on validation
        parts.begin(self.step)
        # One DataLoader for the whole run: its workers go on to the next epoch themselves.
        loader = stream.loader(epochs=1 << 30, first_step=self.step, **parts.reader_options())
        for batch in loader if self.step < self.total_steps else ():
            assert (batch["epoch"], batch["index"]) == (position.epoch, position.step), "data stream out of step"
            result, taken = take_step(engine, objective, batch["images"], batch["labels"], batch["image_ids"],
                                      self.step, cfg.train.embedding_chunks)
            bad_in_row = 0 if taken else bad_in_row + 1
            if not taken:
                meter.skipped += 1
                if bad_in_row >= cfg.train.max_bad_steps:
                    raise TrainingStopped(f"{bad_in_row} non-finite losses in a row at step {self.step}; stopping "
                                          "(train.max_bad_steps): lower optimizer.lr, or check model.weights and "
                                          "the data; the last checkpoint is kept")
            parts.after_step(result, batch, self.step, taken)
            self.step += 1
            position.consume(batch)
            finished = position.advance()
            if finished is not None:
                epochs.finished(batch["epoch"], global_draws(finished, ctx), self.step, stream.plan.kept(batch["epoch"]))
            if meter.update(result, batch, engine, tracker, self.step):
                epochs.flush()
                parts.on_log(tracker, self.step)
            last, stop = self.step >= self.total_steps, False
            # Validations when due, and at the last step (a candidate too), before its checkpoint; without a
            # validation split the last step's evaluation is the test's, after the loop.
            if self.schedule.eval_every and self.step % self.schedule.eval_every == 0 and not last \
                    or last and cfg.data.validation_split:
                stop = self._validate(tracker)
            if self.schedule.checkpoint_every and self.step % self.schedule.checkpoint_every == 0:
                self._save()
            if stop:
                results["stopped_early"] = True
                if ctx.is_main:
                    print(f"[train] stopped at step {self.step}: train.patience={cfg.train.patience} validations "
                          "without a better one", flush=True)
                break
            if last:
                break
        epochs.flush()
        self._save()
        self._take_final_weights()
        results.update(trained=self._evaluate(tracker, final=True), steps=self.step, skipped_steps=meter.skipped,
                       data_faults=dict(meter.faults), **parts.summary())
        self._finish(tracker, results)
        return results

    def _validate(self, tracker) -> bool:
        """An evaluation during the run: of the validation classes where data.val_split or val_share gives them (and every part
        hears it: the best one's checkpoint kept), else of the test split. Whether a part asks to stop."""
        validation = bool(self.cfg.data.validation_split)
        metrics = self._evaluate(tracker, validation=validation)
        asks = self.parts.after_evaluation(metrics, self.step) if validation else set()
        if "save" in asks:
            self._save()
        return "stop" in asks

    def _take_final_weights(self) -> None:
        """The weights a part chose (the best validation's) into the model on every rank, where not the last."""
        weights = self.parts.final_weights(self.checkpoints)
        if weights is None:
            return
        self.engine.module.model.load_state_dict(weights)
        if self.ctx.is_main:
            chosen = self.parts.summary()
            print(f"[train] the final model is step {chosen.get('best_step')}'s, the best by {chosen.get('best_by')} "
                  f"({chosen.get('best_value', float('nan')):.4f} on {self.cfg.data.validation_split!r})", flush=True)

    def _start(self, tracker) -> dict:
        """The run's record in the output folder and the tracker; the untrained model's metrics if asked."""
        cfg = self.cfg
        results: dict = {"name": cfg.train.name, "mlflow": tracker.location, "run_id": tracker.run_id,
                         "world_size": self.ctx.world_size, "total_steps": self.total_steps}
        if self.ctx.is_main:
            (self.out / "config.yaml").write_text(cfg.to_yaml())
            tracker.log_params(cfg.flat())  # a fresh run only: MLflow refuses to change a param
            if self.checkpoints.target is not None:
                tracker.record_resume(self.step, self.checkpoints.changes())
            tracker.log_artifact(self.out / "config.yaml")
        if cfg.eval.at_start and self.step == 0:
            results["untrained"] = self._evaluate(tracker)
        return results

    def _save(self) -> None:
        share_norm_statistics(self.engine.module.model, self.cfg.model.norm, self.ctx)
        self.checkpoints.save(self.engine, self.step, self.run_id)

    def _evaluate(self, tracker, final: bool = False, validation: bool = False) -> dict:
        """The metrics of the model as it stands (and, under their names, of the weights the parts evaluate beside
        it): on the validation split with ``validation`` (logged as val_*), else on eval.split."""
        cfg, ctx, step = self.cfg, self.ctx, self.step
        eval_cfg = dataclasses.replace(cfg.eval, split=cfg.data.validation_split) if validation else cfg.eval
        share_norm_statistics(self.engine.module.model, cfg.model.norm, ctx)

        def measure(plots_dir=None):
            return evaluate(self.engine.module.model, cfg.data, eval_cfg, ctx, progress=final, plots_dir=plots_dir,
                            title=f"{cfg.train.name}, step {step}", verdicts=self.verdicts)

        metrics, plot_paths = measure(self.out / "plots" if final and cfg.eval.plots else None)
        if not final:
            metrics.update(self.parts.extra_evaluations(lambda: measure()[0]))
        if ctx.is_main:
            tracker.log_metrics({"val": metrics} if validation else metrics, step)
            for path in plot_paths:
                tracker.log_artifact(path, "plots")
            on = f" on {eval_cfg.split!r}" if validation else ""
            print(f"[eval] step {step}{on}: {format_metrics(metrics)}", flush=True)
            for name, other in metrics.items():
                if isinstance(other, dict) and name != "postprocessed":
                    print(f"[eval] step {step}{on}, {name}: {format_metrics(other)}", flush=True)
            problem = evaluation_problem(metrics, eval_cfg)
            if problem:
                print(f"[eval] {'error' if final else 'warning'}: step {step}: {problem}", file=sys.stderr, flush=True)
        return metrics

    def _finish(self, tracker, results: dict) -> None:
        """Rank 0: the final model (written atomically, logged as an MLflow Model), the negative-distance
        plot of the whole run, results.json last (what marks the run finished)."""
        if not self.ctx.is_main:
            return
        cfg, out, meter = self.cfg, self.out, self.meter
        state = {k: v.detach().float().cpu() for k, v in self.engine.module.model.state_dict().items()}
        try:
            with replacing(out / "final_model.pt") as tmp:
                torch.save({"state_dict": state, "config": cfg.to_dict()}, tmp)
        except (OSError, RuntimeError) as exc:
            raise as_write_error(out / "final_model.pt", exc) from None
        tracker.log_model(out / "final_model.pt", cfg.model, cfg.data.image_size)
        if meter.histogram.sum() > 0 and cfg.eval.plots:
            (out / "plots").mkdir(exist_ok=True)
            plot = plots.negative_distances(meter.histogram.numpy(), cfg.model.embedding_dim, cfg.sampler.cutoff,
                                            cfg.sampler.nonzero_loss_cutoff, out / "plots" / "negative_distances.png",
                                            steps=(meter.histogram_from, results["steps"]))
            tracker.log_artifact(plot, "plots")
        write_atomically(out / "results.json", json.dumps(results, indent=1))  # last: it marks the run finished


# --- helpers -----------------------------------------------------------------------------------

def sized_loss_config(loss, stream: TrainStream):
    """Per-class / per-image beta tables sized from the training split where the config says 0."""
    return dataclasses.replace(loss, num_classes=loss.num_classes or stream.num_classes,
                               num_images=loss.num_images or stream.num_images)


def _own_run(cfg: RunConfig, ctx: DistContext, target: Path | None) -> str:
    """The id of the run that owns the output folder, decided by rank 0 (which holds the folder): a fresh
    start makes a new run; a resume continues the folder's run (or the checkpoint's, in a folder that has
    none yet). Every checkpoint records it. A fresh start in a folder that holds an earlier run's checkpoints
    or results is refused on every rank, or moves them aside first (train.move_aside): nothing is overwritten."""
    def decide() -> str:
        out = Path(cfg.train.output_dir)
        earlier = earlier_run(out) if target is None else None
        if earlier and not cfg.train.move_aside:
            raise FolderError(fresh_start_refused(out, earlier))
        if earlier:
            print(f"[train] moved {earlier} into {move_aside(out)} (train.move_aside): this run starts afresh",
                  flush=True)
        folder = RunFolder(out)
        keep = (folder.run_id() or read_meta(target).get("run_id")) if target is not None else None
        return folder.claim(keep)

    return ctx.decide(decide)


def hold_output(cfg: RunConfig, ctx: DistContext) -> RunFolder | None:
    """Rank 0 holds the run's output folder for the training's life (None elsewhere); every rank stops alike,
    in one line, where another training holds it or it cannot be written."""
    folder = RunFolder(Path(cfg.train.output_dir)) if ctx.is_main else None

    def acquire() -> None:
        note = folder.acquire()
        if note:
            print(note, flush=True)

    ctx.decide(acquire)
    return folder


def share_norm_statistics(model: torch.nn.Module, norm: str, ctx: DistContext) -> None:
    """``norm`` (model.norm) local: rank 0's BatchNorm buffers on every rank, so that all ranks embed alike and a
    checkpoint holds the statistics every rank evaluates with (sync computes them alike on every rank;
    frozen never changes them)."""
    if norm == "local":
        for buffer in model.buffers():
            ctx.broadcast_(buffer)
