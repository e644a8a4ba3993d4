"""Atomic, verified, rotating DeepSpeed checkpoints under OUTPUT/checkpoints.

Every rank writes its part into `stepNNNNNNNN.partial`; once all have finished, rank 0 writes the
folder's index `dist_dml.json` last (step, world size, ZeRO stage, the run's config, and every file
with its size), then renames the folder to `stepNNNNNNNN` and points `latest` at it. A checkpoint
counts only once it is verified whole against its index (:func:`verify`): a truncated or missing file,
or no index at all (a save cut short, a copy gone wrong), and it is reported and passed over.
`latest` is only a hint: a resume takes the newest whole checkpoint and says which. No checkpoint is
deleted unless `keep_last` newer whole ones exist (a damaged one once a newer whole one exists).
Decisions that every rank must take alike (which checkpoint, whether this step is saved already)
are taken by rank 0 and broadcast. The output folder must be on a file system that every rank sees.

The index is readable without unpickling anything: :func:`dist_dml.train.resume_checks.resume_problem` uses it
to refuse, before any process starts, a resume that cannot apply.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Protocol

from dist_dml.infra.distributed import DistContext
from dist_dml.infra.errors import UserError, as_write_error
from dist_dml.infra.files import parse_json, write_atomically

META = "dist_dml.json"
_TAG = re.compile(r"step(\d{8})")


class CheckpointError(UserError, RuntimeError):
    """No checkpoint to resume from where the run expects one (all damaged, or not whole)."""

    on_every_rank = True


class CheckpointSaveError(UserError):
    """A checkpoint could not be written (a full disk, a read-only folder); the partial one is removed."""

    on_every_rank = True


def _write_error(path: str, exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device writing {path}"
    return f"cannot write {path}: {exc.strerror or exc}"


def verify(folder: Path) -> str | None:
    """None if the checkpoint folder is whole per its index; else why not, in a few words."""
    folder = Path(folder)
    try:
        files = parse_json((folder / META).read_text())["files"]
        if not isinstance(files, dict):
            raise TypeError
    except FileNotFoundError:
        return f"no {META} index (a save cut short, or written before dist-dml kept one)"
    except (ValueError, KeyError, TypeError):
        return f"its {META} index is unreadable"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, its index says {size}"
    return None


class CheckpointFolder:
    """OUTPUT/checkpoints: its whole checkpoints (newest first), saving one atomically on every rank, and pruning
    what a run no longer needs. Which checkpoint a run continues from, and its parts, are the CheckpointManager's."""

    def __init__(self, directory: Path, keep_last: int, ctx: DistContext):
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.ctx = ctx

    def tags(self) -> list[str]:
        """The checkpoint folders (not partial ones), newest first."""
        if not self.directory.is_dir():
            return []
        return sorted((p.name for p in self.directory.iterdir() if p.is_dir() and _TAG.fullmatch(p.name)), reverse=True)

    def newest_whole(self, report=None, inspect=None) -> str | None:
        """The newest checkpoint verified whole (and, with ``inspect``, a function of a checkpoint folder that
        says what else is wrong with it, passing it by too). ``report`` (e.g. print) hears of every newer one
        passed over and why, and of a `latest` pointer that names another."""
        chosen = None
        for tag in self.tags():
            problem = verify(self.directory / tag) or (inspect(self.directory / tag) if inspect else None)
            if problem is None:
                chosen = tag
                break
            if report:
                report(f"[checkpoint] passing over {self.directory / tag}: {problem}")
        pointer = self.directory / "latest"
        hint = pointer.read_text().strip() if pointer.is_file() else None
        if report and chosen and hint != chosen:
            report(f"[checkpoint] `latest` names {hint or 'nothing'}; the newest whole checkpoint is {chosen}")
        return chosen

    def saved_already(self, step: int) -> bool:
        """Whether the newest whole checkpoint is this step's; decided by rank 0 for every rank."""
        return self.ctx.decide(lambda: self.newest_whole() == f"step{step:08d}")

    def save(self, engine, step: int, client_state: dict, meta: dict, keep: tuple[int, ...] = (),
             writers: tuple = ()) -> str:
        """Every rank: ``client_state`` goes into DeepSpeed's files, ``meta`` (JSON) into the index. ``keep``: steps
        whose checkpoints pruning never removes (the best by validation, which the `best` pointer names).
        ``writers``: functions of the partial folder that every rank calls after DeepSpeed's files, each returning
        its failed writes as (path, error): files of a part's own (a shard per rank), which the index then lists."""
        tag = f"step{step:08d}"
        partial = self.directory / f"{tag}.partial"
        if self.ctx.is_main:
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
        self.ctx.barrier()
        failures = engine.save(self.directory, partial.name, client_state)  # every rank
        for write in writers if not failures else ():
            failures += write(partial)
        if writers:
            self.ctx.barrier()  # every rank's files are in before rank 0 lists them in the index
        problem = None
        if self.ctx.is_main and not failures:
            try:
                self._index(partial, meta)
            except OSError as exc:
                failures = [(str(exc.filename or partial), as_write_error(partial / META, exc))]
        if failures:
            path, exc = failures[0]
            problem = f"rank {self.ctx.rank}: {_write_error(path, exc)}"
        problems = [p for p in self.ctx.all_gather_object(problem) if p]
        if problems:  # every rank: remove the partial folder, keep what was there, stop alike
            if self.ctx.is_main:
                shutil.rmtree(partial, ignore_errors=True)
            self.ctx.barrier()
            kept = self.newest_whole() if self.ctx.is_main else None
            raise CheckpointSaveError(f"saving checkpoint {tag} failed ({'; '.join(problems)}); the partial "
                                      f"checkpoint is removed, {'the previous one, ' + kept + ', is kept' if kept else 'no earlier checkpoint exists'}")
        if self.ctx.is_main:
            shutil.rmtree(self.directory / tag, ignore_errors=True)
            os.replace(partial, self.directory / tag)
            write_atomically(self.directory / "latest", tag)
            if keep:
                write_atomically(self.directory / "best", f"step{max(keep):08d}")
            self._prune(meta.get("run_id"), {f"step{s:08d}" for s in keep})
        self.ctx.barrier()
        return tag

    @staticmethod
    def _index(partial: Path, meta: dict) -> None:
        files = {str(p.relative_to(partial)): p.stat().st_size for p in sorted(partial.rglob("*")) if p.is_file()}
        # Last: the index makes the folder a checkpoint.
        write_atomically(partial / META, json.dumps({**meta, "files": files}, indent=1))

    def _prune(self, run_id: str | None, keep: set[str] = frozenset()) -> None:
        """Remove this run's checkpoints (``run_id``, as their indexes say) older than its ``keep_last`` newest
        whole ones (but those of ``keep``: the best by validation), and its damaged ones older than its newest whole
        one; and partial folders (left by a save that died). Another run's checkpoints, or one whose index names no run, are never removed: ranked by step
        alone, a longer earlier run's checkpoints would make a new run's look old, and the new ones would go."""
        tags = [t for t in self.tags() if run_id is not None and read_meta(self.directory / t).get("run_id") == run_id]
        whole = [t for t in tags if verify(self.directory / t) is None]
        if whole:
            for tag in tags:
                if tag in keep and tag in whole:
                    continue
                if tag < whole[min(self.keep_last, len(whole)) - 1] or (tag < whole[0] and tag not in whole):
                    shutil.rmtree(self.directory / tag, ignore_errors=True)
        for stale in self.directory.glob("step*.partial"):
            shutil.rmtree(stale, ignore_errors=True)
        (self.directory / "latest_universal").unlink(missing_ok=True)  # DeepSpeed's, after loading a conversion
        # The trainer's conversions of checkpoints for another world size: once a newer whole checkpoint exists
        # (or the checkpoint is gone) they are a copy nobody resumes from; made again if ever needed.
        for converted in self.directory.glob("step*.universal*"):
            base = converted.name.split(".")[0]
            if converted.name.endswith(".tmp") or not (self.directory / base).is_dir() or (whole and whole[0] > base):
                shutil.rmtree(converted, ignore_errors=True)


def read_meta(checkpoint: Path) -> dict:
    """A checkpoint folder's META; {} for one written before it existed."""
    try:
        meta = parse_json((Path(checkpoint) / META).read_text())
    except FileNotFoundError:
        return {}
    except ValueError:  # verify() reports it; nothing of it is used
        return {}
    return meta if isinstance(meta, dict) else {}


def saved_world_size(checkpoint: Path) -> int | None:
    """The data-parallel size a checkpoint was written at: META's, else its count of ZeRO partitions."""
    meta = read_meta(checkpoint)
    if "world_size" in meta:
        return int(meta["world_size"])
    parts = list(Path(checkpoint).glob("*zero_pp_rank_*_optim_states.pt"))
    return len(parts) or None


def resume_target(section, output_dir: str | Path, report=None, inspect=None) -> Path | None:
    """The checkpoint folder a run with this checkpoint section and output folder would resume from, or None
    for a fresh start. ``inspect``: a function of a checkpoint folder saying what else makes it unusable (see
    plain_files), which the newest whole ones are passed over for as well.

    Raises CheckpointError where checkpoints exist but none is whole (the run would otherwise start
    afresh over them without a word), or where checkpoint.resume names one that is not whole."""
    resume = section.resume
    if resume == "none":
        return None
    if resume == "auto":
        checkpoints = CheckpointFolder(Path(output_dir) / "checkpoints", 1, DistContext())
        tag = checkpoints.newest_whole(report, inspect)
        if tag is None and checkpoints.tags():
            raise CheckpointError(
                f"none of the checkpoints in {checkpoints.directory} is whole ("
                + "; ".join(f"{t}: {verify(checkpoints.directory / t)}" for t in checkpoints.tags())
                + "). They are kept; checkpoint.resume=none starts afresh (with train.move_aside=true, which moves them into OUTPUT/previous/ first), or give another train.name")
        if tag is None:
            return None
        _same_run(checkpoints.directory / tag, Path(output_dir), section.allow_other_run)
        return checkpoints.directory / tag
    target = Path(resume)
    problem = (verify(target) or (inspect(target) if inspect else None)) if target.is_dir() else "no such folder"
    if problem:
        raise CheckpointError(f"checkpoint.resume={resume} is not a whole checkpoint: {problem}")
    return target


def plain_files(safe_globals: list):
    """An ``inspect`` for resume_target: a checkpoint folder any of whose torch files holds Python objects beyond
    tensors, containers and ``safe_globals`` (a file replaced by a pickle, its index's sizes made to match) is
    not loaded: DeepSpeed's load would refuse it deep inside (weights-only), after the engine is built."""
    from dist_dml.infra.files import python_objects_in

    def problem(folder: Path) -> str | None:
        for path in sorted(Path(folder).rglob("*.pt")):
            found = python_objects_in(path, safe_globals)
            if found:
                return f"{path.relative_to(folder)} {found}: refused (never unpickled)"
        return None

    return problem


def _same_run(checkpoint: Path, output_dir: Path, allow_other: bool) -> None:
    """A CheckpointError where ``checkpoint`` was written by another run than the one that owns
    ``output_dir`` (OUTPUT/run.json): two trainings wrote into one folder, and continuing would mix them."""
    from dist_dml.train.run_folder import folder_run_id

    mine, theirs = folder_run_id(output_dir), read_meta(checkpoint).get("run_id")
    if allow_other or not mine or not theirs or mine == theirs:
        return
    raise CheckpointError(f"the newest whole checkpoint, {checkpoint}, was written by run {theirs}, but {output_dir} "
                          f"belongs to run {mine} (its run.json): another training wrote into this folder. "
                          "checkpoint.allow_other_run=true continues from it, checkpoint.resume=PATH resumes the "
                          "checkpoint you choose, checkpoint.resume=none train.move_aside=true starts afresh (moving "
                          "that run's files into OUTPUT/previous/ first)")


class Stateful(Protocol):
    """A part of a run that a checkpoint keeps: the data position, the meters, the RNG, the tracker's run, a
    cross-batch memory. ``state_dict`` is called on every rank (it may hold collectives) and returns what
    torch.save and weights_only loading take (tensors, numbers, strings, lists and dicts of them)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class CheckpointManager:
    """A training's checkpoints. Built before the engine (whether the checkpoint to load is a universal one
    decides how the engine is built), it chooses the checkpoint to continue from (rank 0 picks it, every
    rank gets its pick) and converts one saved at another world size; it is then given the run's stateful
    parts once (:meth:`register`), restores each from the checkpoint with the engine (model, optimizer,
    schedule: DeepSpeed's own files), saves them all, and prunes. Adding a part to a run is one
    register call."""

    def __init__(self, section, output_dir: str | Path, ctx: DistContext, record: dict):
        """``section``: the checkpoint section; ``record``: the run's whole config as a dict (RunConfig.to_dict),
        which every checkpoint's index keeps and a resume compares with the saved one."""
        self.section, self.output_dir, self.ctx, self.record = section, Path(output_dir), ctx, record
        self.zero_stage = int(record["deepspeed"]["zero_stage"])
        self.store = CheckpointFolder(self.output_dir / "checkpoints", section.keep_last, ctx)
        self.parts: dict[str, Stateful] = {}
        self.target = self._choose()
        self.load_from, self.universal = self._loadable() if self.target is not None else (None, False)
        self.meta = read_meta(self.target) if self.target is not None else {}

    def register(self, name: str, part: Stateful) -> None:
        self.parts[name] = part

    def _choose(self) -> Path | None:
        """The checkpoint to continue from, or None for a fresh run: rank 0 picks it (reporting any it passes
        over) and every rank gets its pick, or the same CheckpointError."""
        def pick() -> str:
            from dist_dml.train.engine import WeightsOnlyCheckpointEngine

            inspect = plain_files(WeightsOnlyCheckpointEngine.SAFE_GLOBALS)
            say = lambda line: print(line, flush=True)  # noqa: E731
            return str(resume_target(self.section, self.output_dir, report=say, inspect=inspect) or "")

        chosen = self.ctx.decide(pick)
        return Path(chosen) if chosen else None

    def _loadable(self) -> tuple[Path, bool]:
        """(folder to load, whether it is a universal checkpoint). ZeRO-1/2 optimizer state saved at another
        world size is partitioned for that one: rank 0 converts it once to DeepSpeed's universal checkpoint
        (kept beside it as stepN.universal), which any world size loads."""
        from dist_dml.train.engine import to_universal

        target, ctx = self.target, self.ctx
        stage = int(read_meta(target).get("zero_stage", self.zero_stage))
        world = saved_world_size(target)
        if stage == 0 or world in (None, ctx.world_size):
            return target, False
        dest = target.with_name(target.name + ".universal")

        def convert() -> None:
            if dest.is_dir():
                return
            print(f"[checkpoint] {target} holds ZeRO-{stage} optimizer state partitioned over {world} processes; "
                  f"converting it for {ctx.world_size} into a universal checkpoint at {dest} (seconds for a small "
                  "model, about a minute per GB of checkpoint)", flush=True)
            started = time.time()
            try:
                to_universal(target, dest)
            except Exception as exc:  # noqa: BLE001 -- any failure of the converter stops every rank alike
                raise CheckpointError(f"cannot convert {target} (saved at {world} processes) for {ctx.world_size}: "
                                      f"{exc}; resume with {world} processes instead") from None
            print(f"[checkpoint] converted in {time.time() - started:.0f}s", flush=True)

        ctx.decide(convert)
        return dest, True

    def restore(self, engine) -> int:
        """Load the chosen checkpoint into the engine and every registered part; the step it was saved at
        (0 for a fresh run)."""
        if self.target is None:
            return 0
        state = engine.load(self.load_from.parent, self.load_from.name)
        saved = state.get("parts")
        if not isinstance(saved, dict):
            raise CheckpointError(f"{self.target} holds no named parts (data position, meters, RNG): not a "
                                  "checkpoint of this dist-dml; checkpoint.resume=none train.move_aside=true starts afresh")
        for name, part in self.parts.items():
            if name not in saved:
                continue  # a part the checkpoint's run did not have: it starts afresh
            try:
                part.load_state_dict(saved[name])
                if hasattr(part, "load_files"):  # a part with files of its own in the folder (a shard per rank)
                    part.load_files(self.target)
            except ValueError as exc:
                raise CheckpointError(f"cannot continue the {name} of {self.target}: {exc}") from None
        return int(state["step"])

    def saved_state(self, step: int) -> dict:
        """The model states DeepSpeed saved at ``step`` (``module``: the model and loss, ``parts``: every part's
        state), loaded weights-only."""
        import torch

        from dist_dml.train.engine import WeightsOnlyCheckpointEngine

        path = self.store.directory / f"step{step:08d}" / "mp_rank_00_model_states.pt"
        with torch.serialization.safe_globals(WeightsOnlyCheckpointEngine.SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)

    def changes(self) -> dict[str, tuple]:
        """{section.key: (saved, now)}: this run's config against the chosen checkpoint's."""
        return config_changes(self.meta.get("config", {}), self.record) if self.target is not None else {}

    def save(self, engine, step: int, run_id: str) -> None:
        """Every rank: the engine and every part at ``step`` (nothing if that step is saved already). The
        index holds, besides the files, what a launch check reads without unpickling: the step, the run,
        the world size, the ZeRO stage, the config, and each part's plain values."""
        if self.store.saved_already(step):
            return
        states = {name: part.state_dict() for name, part in self.parts.items()}
        keep = tuple(s for part in self.parts.values() for s in getattr(part, "kept_steps", lambda: ())())
        meta = {"step": step, "run_id": run_id, "world_size": self.ctx.world_size,
                "zero_stage": self.zero_stage, "config": self.record,
                **{name: {k: v for k, v in state.items() if isinstance(v, (int, float, str, bool))}
                   for name, state in states.items()}}
        writers = tuple(part.save_files for part in self.parts.values() if hasattr(part, "save_files"))
        self.store.save(engine, step, {"step": step, "parts": states}, meta, keep, writers)


def config_changes(saved: dict, now: dict) -> dict[str, tuple]:
    """{section.key: (saved value, this run's)} for every key that differs, between two configs as dicts
    (RunConfig.to_dict; a key the saved config lacks counts as changed from None)."""
    changes = {}
    for section, values in now.items():
        for key, value in values.items():
            was = saved.get(section, {}).get(key)
            value = list(value) if isinstance(value, tuple) else value
            was = list(was) if isinstance(was, tuple) else was
            if was != value:
                changes[f"{section}.{key}"] = (was, value)
    return changes
