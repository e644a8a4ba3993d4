"""A training's output folder: held by one training for its life, and the run that owns it.

A training holds ``OUTPUT/.dist-dml.lock`` from its start to its end (rank 0, an ``flock``, with host,
pid and start time written in it), so a second training on the same folder refuses in one line before
it touches anything: two trainings into one folder would interleave their checkpoints. The kernel
releases the lock of a process that is gone however it ended (a kill, a crash, a node reboot), and the
next training takes it over with a message naming the holder it replaces. The lock is an ``flock``:
local file systems and NFS honour it across hosts; a file system that does not is refused at start
(put the output folder on one that does).

``OUTPUT/run.json`` names the run that owns the folder (a random id, written by a fresh start; a resume
keeps it). Every checkpoint records the id of the run that wrote it, so a resume can refuse another
run's checkpoint (dist_dml.train.checkpoints).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
import uuid
from pathlib import Path

from dist_dml.infra.errors import UserError
from dist_dml.infra.files import write_atomically

LOCK = ".dist-dml.lock"
RUN = "run.json"


class FolderError(UserError):
    """The output folder is held by another training, or cannot be made or written."""

    on_every_rank = True


def _describe(holder: dict) -> str:
    since = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since {when}"


def make_folder(path: Path) -> Path:
    """``path`` as a folder that can be written, or a FolderError naming it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise FolderError(f"train.output_dir {path}: a file is there (or on its path), not a folder; give another "
                          "train.output_dir") from None
    except NotADirectoryError:
        raise FolderError(f"train.output_dir {path}: a part of its path is a file, not a folder") from None
    except OSError as exc:
        raise FolderError(f"train.output_dir {path}: cannot be made ({exc.strerror or exc})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise FolderError(f"train.output_dir {path}: not writable by this user; give another train.output_dir")
    return path


class RunFolder:
    """The output folder of one training, held (:meth:`acquire`) for the training's life."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = None

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK

    def holder(self) -> dict | None:
        """Who holds the folder now ({host, pid, started}), or None if nobody does (a lock left by a
        process that is gone is nobody's). Takes nothing."""
        if not self.lock_path.is_file() or self._file is not None:
            return None
        try:
            with open(self.lock_path, "r+") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return _read_holder(f) or {}
                fcntl.flock(f, fcntl.LOCK_UN)
        except OSError:
            return None
        return None

    def acquire(self) -> str | None:
        """Hold the folder (made if missing) for this process; returns a line about a lock taken over from a
        process that is gone, if any. FolderError where another training holds it or it cannot be written."""
        make_folder(self.path)
        try:
            f = open(self.lock_path, "a+")
        except OSError as exc:
            raise FolderError(f"train.output_dir {self.path}: cannot write {self.lock_path} ({exc.strerror or exc})") \
                from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(f)
            f.close()
            raise FolderError(f"train.output_dir {self.path} is in use by another training "
                              f"({_describe(holder) if holder else 'its holder is starting'}): one training per "
                              "output folder (give another train.name or train.output_dir, or wait for it to end)") \
                from None
        except OSError as exc:
            f.close()
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise FolderError(f"train.output_dir {self.path}: its file system does not support flock, which "
                                  "keeps two trainings out of one folder; put the output on one that does") from None
            raise
        previous = _read_holder(f)
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}))
        f.flush()
        self._file = f
        if previous:
            return (f"[train] took over {self.lock_path}: the training that held it ({_describe(previous)}) is gone "
                    "(killed, crashed or restarted)")
        return None

    def release(self) -> None:
        """Let the folder go: the lock file stays, empty (removing it would race a training taking it)."""
        if self._file is None:
            return
        try:
            self._file.seek(0)
            self._file.truncate()
            self._file.flush()
        except OSError:
            pass
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()
        self._file = None

    def run_id(self) -> str | None:
        """The id of the run that owns the folder (OUTPUT/run.json), None if none does yet."""
        try:
            value = json.loads((self.path / RUN).read_text()).get("run_id")
        except (OSError, ValueError, AttributeError):
            return None
        return value if isinstance(value, str) and value else None

    def claim(self, run_id: str | None = None) -> str:
        """Make ``run_id`` (a new id if None) the folder's run (written atomically); returns it."""
        run_id = run_id or uuid.uuid4().hex[:16]
        write_atomically(self.path / RUN, json.dumps({"run_id": run_id, "since": time.time()}))
        return run_id


def _read_holder(f) -> dict | None:
    try:
        f.seek(0)
        text = f.read(4096)
        holder = json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def folder_problem(path: Path) -> str | None:
    """Why a training could not hold ``path`` now (a file there, an unwritable parent, another training
    holding it), or None; makes and takes nothing (the launch scripts' check)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        return f"train.output_dir {path}: a file is there, not a folder; give another train.output_dir"
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"train.output_dir {path}: {existing} on its path is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"train.output_dir {path}: {existing} is not writable by this user; give another train.output_dir"
    holder = RunFolder(path).holder()
    if holder is not None:
        return (f"train.output_dir {path} is in use by another training ({_describe(holder) if holder else 'starting'}"
                "): one training per output folder (give another train.name or train.output_dir, or wait for it)")
    return None


# What a run leaves in its folder, moved aside together (train.move_aside); the folder's shards (a demo's data),
# lock and anything else stay.
RUN_FILES = ("checkpoints", "final_model.pt", "results.json", "config.yaml", "run.json", "plots")
# What marks an earlier run worth keeping: all but what every start writes first (run.json, config.yaml), which a
# start that crashed before saving anything leaves and its restart writes again.
KEPT_FILES = ("checkpoints", "final_model.pt", "results.json", "plots")
PREVIOUS = "previous"
STAGING = ".moving-"  # previous/.moving-NAME: a move aside under way; renamed to previous/NAME when whole


def earlier_run(path: Path) -> str | None:
    """What an earlier run left in ``path`` that a fresh start would overwrite or prune (its checkpoints, final
    model, results, plots, or a move aside cut short), in a few words; None if nothing."""
    path = Path(path)
    found = []
    steps = sorted(p.name for p in (path / "checkpoints").glob("step*") if p.is_dir()) \
        if (path / "checkpoints").is_dir() else []
    if steps:
        found.append(f"{len(steps)} checkpoint{'s' if len(steps) > 1 else ''} (the newest {steps[-1]})")
    found += [name for name in KEPT_FILES[1:] if (path / name).exists()]
    found += [f"{moving.relative_to(path)} (a move aside cut short: train.move_aside=true completes it)"
              for moving in _staged(path)]
    if not found:
        return None
    owner = RunFolder(path).run_id()
    return f"{'run ' + owner if owner else 'an earlier run'}'s " + ", ".join(found)


def earlier_run_problem(path: Path, move_aside: bool) -> str | None:
    """Why a fresh start cannot use ``path`` (an earlier run's checkpoints or results there, which it would
    overwrite, or prune by step number), unless ``move_aside`` (train.move_aside) says to move them aside first."""
    earlier = earlier_run(path)
    return None if earlier is None or move_aside else fresh_start_refused(path, earlier)


def fresh_start_refused(path: Path, earlier: str) -> str:
    """The line that refuses a fresh start over ``earlier`` (earlier_run's words) in ``path``."""
    return (f"train.output_dir {path} holds {earlier}: a fresh start would overwrite them; give another train.name "
            f"or train.output_dir, or train.move_aside=true to move them into {Path(path) / PREVIOUS}/ first "
            "(checkpoint.resume=auto continues that run instead)")


def move_aside(path: Path) -> Path | None:
    """The earlier run's files (RUN_FILES) moved into ``path``/previous/RUN (its id, else the time; a free name);
    where they went, or None if there was nothing to move. One step that a kill cannot leave half-done: the files
    go into previous/.moving-RUN first, which one rename makes previous/RUN; a move that a kill cut short is
    completed first (the rest of its run's files into it). Renames within the folder: nothing is copied or
    deleted."""
    path = Path(path)
    completed = finish_interrupted_moves(path)
    present = [name for name in RUN_FILES if (path / name).exists()]
    if not present:
        return completed[-1] if completed else None
    dest = _free_name(path / PREVIOUS, RunFolder(path).run_id() or time.strftime("%Y%m%d-%H%M%S"))
    staging = dest.with_name(STAGING + dest.name)
    staging.mkdir(parents=True)
    for item in present:
        os.replace(path / item, staging / item)
    os.replace(staging, dest)
    return dest


def finish_interrupted_moves(path: Path) -> list[Path]:
    """Every move aside that a kill cut short (a previous/.moving-RUN folder left), completed: the run's files still
    in ``path`` moved into it, then it renamed to a free previous/RUN. Where they went."""
    done = []
    for staging in _staged(path):
        for item in RUN_FILES:
            if (path / item).exists() and not (staging / item).exists():
                os.replace(path / item, staging / item)
        dest = _free_name(staging.parent, staging.name[len(STAGING):], own=staging)
        os.replace(staging, dest)
        done.append(dest)
    return done


def _staged(path: Path) -> list[Path]:
    folder = Path(path) / PREVIOUS
    return sorted(p for p in folder.glob(f"{STAGING}*") if p.is_dir()) if folder.is_dir() else []


def _free_name(folder: Path, name: str, own: Path | None = None) -> Path:
    """folder/name, or folder/name-2, -3, ... where that is taken (by a folder, or a move aside under way other
    than ``own``)."""
    candidate, n = folder / name, 1
    while candidate.exists() or candidate.with_name(STAGING + candidate.name) not in (own, None) and \
            candidate.with_name(STAGING + candidate.name).exists():
        n += 1
        candidate = folder / f"{name}-{n}"
    return candidate


def folder_run_id(output_dir: Path) -> str | None:
    """The id of the run that owns ``output_dir``, if any (read-only)."""
    return RunFolder(output_dir).run_id()
