"""Atomic, rotating DeepSpeed checkpoints under OUTPUT/checkpoints.

Every rank writes its part into `stepNNNNNNNN.partial`; once all have finished, rank 0 renames the
folder to `stepNNNNNNNN` and then points `latest` at it (written to a temporary file and renamed).
A checkpoint under its final name is therefore always whole, and `latest` never names a partial
one. The oldest complete checkpoints beyond `keep_last` are removed.

Beside DeepSpeed's files each checkpoint holds `dist_dml.json` (step, world size, ZeRO stage and the
run's config), readable without unpickling anything: :func:`resume_problem` uses it to refuse,
before any process starts, a resume that cannot apply.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from dist_dml.distributed import DistContext

META = "dist_dml.json"


class Checkpointer:
    def __init__(self, directory: Path, keep_last: int, ctx: DistContext):
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.ctx = ctx

    def latest(self) -> str | None:
        pointer = self.directory / "latest"
        if not pointer.is_file():
            return None
        tag = pointer.read_text().strip()
        return tag if (self.directory / tag).is_dir() else None

    def save(self, engine, step: int, client_state: dict, meta: dict) -> str:
        """Every rank: ``client_state`` goes into DeepSpeed's files, ``meta`` (JSON) into META."""
        tag = f"step{step:08d}"
        partial = f"{tag}.partial"
        if self.ctx.is_main:
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.directory / partial, ignore_errors=True)
        self.ctx.barrier()
        engine.save(self.directory, partial, client_state)  # every rank
        self.ctx.barrier()
        if self.ctx.is_main:
            (self.directory / partial / META).write_text(json.dumps(meta, indent=1))
            shutil.rmtree(self.directory / tag, ignore_errors=True)
            os.replace(self.directory / partial, self.directory / tag)
            tmp = self.directory / ".latest.tmp"
            tmp.write_text(tag)
            os.replace(tmp, self.directory / "latest")
            self._prune()
        self.ctx.barrier()
        return tag

    def _prune(self) -> None:
        complete = sorted(p for p in self.directory.glob("step*") if p.is_dir() and not p.name.endswith(".partial"))
        for old in complete[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.directory.glob("step*.partial"):  # left by a run that died while saving
            shutil.rmtree(stale, ignore_errors=True)

    def load(self, engine, tag: str) -> dict:
        return engine.load(self.directory, tag)


def read_meta(checkpoint: Path) -> dict:
    """A checkpoint folder's META; {} for one written before it existed."""
    try:
        return json.loads((Path(checkpoint) / META).read_text())
    except FileNotFoundError:
        return {}


def saved_world_size(checkpoint: Path) -> int | None:
    """The data-parallel size a checkpoint was written at: META's, else its count of ZeRO partitions."""
    meta = read_meta(checkpoint)
    if "world_size" in meta:
        return int(meta["world_size"])
    parts = list(Path(checkpoint).glob("*zero_pp_rank_*_optim_states.pt"))
    return len(parts) or None


def resume_target(config) -> Path | None:
    """The checkpoint folder a run with this config would resume from, or None for a fresh start."""
    resume = config.checkpoint.resume
    if resume == "none":
        return None
    if resume == "auto":
        directory = Path(config.train.output_dir) / "checkpoints"
        tag = Checkpointer(directory, 1, DistContext()).latest()
        return directory / tag if tag else None
    return Path(resume)


def resume_problem(config, world_size: int) -> str | None:
    """Why a run with this config at ``world_size`` processes cannot resume where it would; None if it can.

    Read from the checkpoint's META (no unpickling): a folder that is not a checkpoint, a model or beta
    table of another shape, or ZeRO-1/2 optimizer state partitioned over another number of ranks.
    """
    target = resume_target(config)
    if target is None:
        return None
    how = ("checkpoint.resume=auto found " if config.checkpoint.resume == "auto" else
           f"checkpoint.resume={config.checkpoint.resume}: ")
    if not (target / "mp_rank_00_model_states.pt").is_file():
        return f"{how}{target}, which is not a checkpoint folder (no mp_rank_00_model_states.pt)"
    fresh = ("; to start afresh instead, give another train.name (or train.output_dir) or "
             "checkpoint.resume=none")
    meta = read_meta(target)
    saved = meta.get("config", {})
    for section, key in (("model", "backbone"), ("model", "embedding_dim"), ("loss", "kind"),
                         ("loss", "beta_per_class"), ("loss", "beta_per_image"), ("deepspeed", "zero_stage")):
        if section in saved and key in saved[section]:
            was, now = saved[section][key], getattr(getattr(config, section), key)
            if was != now:
                return f"{how}{target}, saved with {section}.{key}={was}, but this run has {now}{fresh}"
    stage = saved.get("deepspeed", {}).get("zero_stage", config.deepspeed.zero_stage)
    world = saved_world_size(target)
    if stage > 0 and world is not None and world != world_size:
        return (f"{how}{target}, whose ZeRO-{stage} optimizer state is partitioned over {world} processes; this "
                f"run has {world_size}. Resume with {world} processes{fresh}")
    return None
