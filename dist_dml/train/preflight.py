"""What a training would meet before any of its processes starts (`dist-dml check`, which the launch scripts run
before torchrun or srun): the resume at the world size asked, the output folder, an earlier run in it, the
backbone's weights and the tracking server, each refused in one line naming what to change."""
from __future__ import annotations

import sys
from pathlib import Path

from dist_dml.infra.errors import UserError


class LaunchRefused(UserError):
    """A training that cannot start (or resume) as configured; found before any process starts."""


def resume_refusal(cfg, world_size: int) -> None:
    """A LaunchRefused where the run cannot resume where it would at ``world_size`` processes."""
    from dist_dml.train.checkpoints import resume_problem

    problem = resume_problem(cfg, world_size)
    if problem:
        raise LaunchRefused(f"cannot resume: {problem}")


def check_launch(cfg, world_size: int) -> None:
    """Every check a launch of ``cfg`` at ``world_size`` processes runs first: a LaunchRefused naming the first
    problem; a tracking server that does not answer is a warning on stderr where tracking.required is false."""
    from dist_dml.models.weights import weights_problem
    from dist_dml.train.checkpoints import resume_target
    from dist_dml.train.run_folder import earlier_run_problem, folder_problem

    if world_size < 1:
        raise LaunchRefused(f"--world-size must be >= 1, got {world_size}")
    resume_refusal(cfg, world_size)
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
