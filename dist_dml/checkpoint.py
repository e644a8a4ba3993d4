"""Atomic, rotating DeepSpeed checkpoints under OUTPUT/checkpoints.

Every rank writes its part into `stepNNNNNNNN.partial`; once all have finished, rank 0 renames the
folder to `stepNNNNNNNN` and then points `latest` at it (written to a temporary file and renamed).
A checkpoint under its final name is therefore always whole, and `latest` never names a partial
one. The oldest complete checkpoints beyond `keep_last` are removed.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from dist_dml.distributed import DistContext


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

    def save(self, engine, step: int, client_state: dict) -> str:
        tag = f"step{step:08d}"
        partial = f"{tag}.partial"
        if self.ctx.is_main:
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.directory / partial, ignore_errors=True)
        self.ctx.barrier()
        engine.save(self.directory, partial, client_state)  # every rank
        self.ctx.barrier()
        if self.ctx.is_main:
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
