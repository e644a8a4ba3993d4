"""Sets a training run up as `dist-dml train` would (the resume included) under torchrun, and rank 0
saves what the engine holds: every parameter's fp32 value and optimizer moments, whole, and the step.

    torchrun --nproc_per_node W -m tests.resume_worker CONFIG OUT.pt section.key=value ...

Shared with tests/test_faults.py, which compares it with the checkpoint's own partitions.
"""
from __future__ import annotations

import sys

import torch

from dist_dml.cli import leave
from dist_dml.config import load_config
from dist_dml.infra.distributed import DistContext


def main(config: str, out: str, *overrides: str) -> None:
    from dist_dml.infra.accelerator import configure

    configure("cpu")
    from dist_dml.train.trainer import Trainer  # first: it imports DeepSpeed (dist_dml.infra.accelerator.deepspeed_import)

    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    cfg = load_config(config, list(overrides))
    ctx = DistContext.from_env(device="cpu")
    ctx.init_process_group()
    run = Trainer(cfg, ctx)
    engine = run.engine.engine
    found = {}
    for name, param in engine.module.named_parameters():
        full = {"fp32": safe_get_full_fp32_param(param)}  # collectives: every rank
        for key in ("exp_avg", "exp_avg_sq"):
            full[key] = safe_get_full_optimizer_state(param, key)
        found[name] = {k: v.detach().float().cpu().clone() for k, v in full.items()}
    optimizer = run.engine.optimizer.optimizer if hasattr(run.engine.optimizer, "optimizer") else run.engine.optimizer
    steps = {float(state["step"]) for state in optimizer.state.values() if "step" in state}
    if ctx.is_main:
        torch.save({"params": found, "step": run.step, "optimizer_steps": sorted(steps),
                    "lr": run.engine.learning_rates()}, out)
    ctx.barrier()
    ctx.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
    leave(0)  # without the interpreter's teardown, which can abort a finished rank (see dist_dml.cli.leave)
