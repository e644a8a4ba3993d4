"""What a training would meet before any of its processes starts (`dist-dml check`, which the launch scripts run
before torchrun or srun): the resume at the world size asked, the output folder, an earlier run in it, the
backbone's weights and the tracking server, each refused in one line naming what to change."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from dist_dml.infra.errors import UserError


class LaunchRefused(UserError):
    """A training that cannot start (or resume) as configured; found before any process starts."""


def world_size_refusal(cfg, world_size: int) -> str | None:
    """A LaunchRefused where ``world_size`` processes cannot train the split: not a positive count, or more ranks than
    the training split has records (a rank would have none of its own). Where a global batch holds more records
    than the split, a note that says so (every record drawn more than once a step); None otherwise."""
    from dist_dml.data import Manifest

    if world_size < 1:
        raise LaunchRefused(f"--world-size must be >= 1, got {world_size}")
    split = Manifest(cfg.data.root, cfg.data.max_manifest_mb).split(cfg.data.train_split)
    records = sum(int(shard["records"]) for shard in split["shards"])
    if world_size > records:
        raise LaunchRefused(f"{world_size} processes for the {records:,} records of split {cfg.data.train_split!r}: a "
                            f"rank would have no record of its own to draw; use at most {records} processes")
    per_step = world_size * cfg.data.classes_per_batch
    if per_step > records:
        return (f"{world_size} processes x data.classes_per_batch={cfg.data.classes_per_batch} take {per_step} records "
                f"a step from the {records:,} of split {cfg.data.train_split!r}: every record is drawn about "
                f"{per_step / records:.1f} times a step (fewer classes per batch, or fewer processes, draw each once)")
    return None


SHM = "/dev/shm"


def shm_free_bytes() -> int | None:
    """The free bytes of this machine's shared memory (None where it has no /dev/shm to measure)."""
    try:
        stats = os.statvfs(SHM)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def shm_need(cfg, classes: int) -> dict[str, int]:
    """What one rank of a run puts in shared memory, by use, in bytes: the batches its DataLoader workers hand over
    (a worker's prefetched batches, and the one the rank holds; the training's and an evaluation's loaders live at
    once), and the prototypes' snapshot ring (class_sampling)."""
    from dist_dml.data.snapshots import PREFETCH, loader_lag, ring_slots
    from dist_dml.infra.dtypes import DTYPES

    data, workers = cfg.data, cfg.data.workers
    image = 3 * data.image_size * data.image_size
    need = {}
    if workers:
        need["training batches"] = (PREFETCH * workers + 1) * data.local_batch * image
        need["evaluation batches"] = (PREFETCH * workers + 1) * cfg.eval.batch_size * image
    sampling = cfg.class_sampling
    if sampling.enabled:
        slots = ring_slots(loader_lag(workers), sampling.refresh_steps)
        need["class prototypes' snapshots"] = slots * classes * cfg.model.embedding_dim * DTYPES[sampling.dtype].itemsize
    return need


def shm_problem(cfg, ranks_on_node: int, classes: int) -> str | None:
    """Why ``ranks_on_node`` ranks of this run would run out of this machine's shared memory (a container's is 64
    MB unless given more), None where they fit or it cannot be measured."""
    free = shm_free_bytes()
    need = {use: ranks_on_node * n for use, n in shm_need(cfg, classes).items()}
    total = sum(need.values())
    if free is None or total <= free:
        return None
    shown = ", ".join(f"{use} {n / 2**20:,.0f} MB" for use, n in need.items())
    suggest = max(1, -(-int(total * 1.25) // 2**30))
    return (f"{ranks_on_node} process{'es' if ranks_on_node > 1 else ''} of this run would put about "
            f"{total / 2**20:,.0f} MB in {SHM} ({shown}), which has {free / 2**20:,.0f} MB free: give the container "
            f"more (docker run --shm-size {suggest}g, or a larger /dev/shm on the node), or lower data.workers")


def centres_note(cfg, world_size: int, classes: int) -> str | None:
    """What one rank holds of the class centres (the `proxy` section) at ``world_size`` processes, None without
    them: its ceil(C / W) rows in float32 with their gradient and the optimizer's moments, and a step's logits
    against them (the global batch x its rows, about three such matrices alive in the backward)."""
    proxy = cfg.proxy
    if not proxy.enabled:
        return None
    classes = proxy.num_classes or classes
    rows = -(-classes // world_size)
    copies = {"adam": 4, "adamw": 4}.get(cfg.optimizer.name, 3 if cfg.optimizer.momentum else 2)
    held = rows * cfg.model.embedding_dim * 4 * copies
    batch = world_size * cfg.data.local_batch
    logits = batch * rows * 4 * 3 * (proxy.sample_rate if proxy.kind != "proxy_anchor" else 1)
    return (f"class centres (proxy.kind={proxy.kind}): {classes:,} classes x {cfg.model.embedding_dim} over {world_size} "
            f"process{'es' if world_size > 1 else ''}, {rows:,} rows a rank: {held / 2**20:,.1f} MB a rank (float32, "
            f"with the gradient and {copies - 2} optimizer moment{'s' if copies != 3 else ''}), and about "
            f"{logits / 2**20:,.1f} MB of logits a step (a global batch of {batch:,} against them)")


def schedule_at(cfg, world_size: int, stream=None):
    """The run's schedule resolved at ``world_size`` processes, as a fresh start takes it (config/schedule.py),
    from the manifest's counts alone (``stream``: rank 0's TrainStream at that world size, where one is built)."""
    from dist_dml.config.schedule import resolve
    from dist_dml.data import TrainStream

    stream = stream or TrainStream(cfg.data, 0, world_size, decode_images=False)
    return resolve(cfg, world_size, stream.plan.steps(0), cfg.train.steps or stream.remaining_steps(cfg.train.epochs))


def resume_refusal(cfg, world_size: int, say=None) -> None:
    """A LaunchRefused where the run cannot start at ``world_size`` processes (world_size_refusal) or cannot
    resume where it would at that world size; ``say`` (if given) hears the note of a batch larger than the split."""
    from dist_dml.train.resume_checks import resume_problem

    note = world_size_refusal(cfg, world_size)
    if note and say is not None:
        say(note)
    problem = resume_problem(cfg, world_size)
    if problem:
        raise LaunchRefused(f"cannot resume: {problem}")


def check_launch(cfg, world_size: int, ranks_per_node: int | None = None) -> None:
    """Every check a launch of ``cfg`` at ``world_size`` processes (``ranks_per_node`` of them on this machine: all
    by default) runs first: a LaunchRefused naming the first problem; a tracking server that does not answer is a
    warning on stderr where tracking.required is false."""
    from dist_dml.config.run import inert_settings
    from dist_dml.data import Manifest
    from dist_dml.models.weights import weights_problem
    from dist_dml.train.checkpoints import resume_target
    from dist_dml.train.run_folder import earlier_run_problem, folder_problem

    resume_refusal(cfg, world_size, say=lambda note: print(f"[check] warning: {note}", file=sys.stderr, flush=True))
    classes = Manifest(cfg.data.root, cfg.data.max_manifest_mb).split(cfg.data.train_split)["classes"]
    problem = shm_problem(cfg, min(ranks_per_node or world_size, world_size), classes)
    if problem:
        raise LaunchRefused(problem)
    for note in inert_settings(cfg):
        print(f"[check] warning: {note}", file=sys.stderr, flush=True)
    from dist_dml.data import TrainStream

    stream = TrainStream(cfg.data, 0, world_size, decode_images=False)  # the manifest's counts, read once
    held_out = stream.held_out_note()
    if held_out:
        print(f"[check] {held_out}", flush=True)
    centres = centres_note(cfg, world_size, classes)
    if centres:
        print(f"[check] {centres}", flush=True)
    print(f"[check] schedule: {schedule_at(cfg, world_size, stream).describe()}", flush=True)
    out = Path(cfg.train.output_dir)
    fresh = resume_target(cfg.checkpoint, out) is None  # whole and of this run: checked just above
    problem = folder_problem(out) or (earlier_run_problem(out, cfg.train.move_aside) if fresh else None) \
        or weights_problem(cfg.model)
    if problem:
        raise LaunchRefused(problem)
    if cfg.tracking.enabled:
        from dist_dml.train.tracking import failure_message, tracking_uri, unreachable

        uri = tracking_uri(cfg.tracking)
        problem = unreachable(uri, cfg.tracking.timeout_s)
        if problem and cfg.tracking.required:
            raise LaunchRefused(failure_message(uri, problem))
        if problem:
            print(f"[check] warning: {failure_message(uri, problem)}; the run will train without tracking",
                  file=sys.stderr, flush=True)
