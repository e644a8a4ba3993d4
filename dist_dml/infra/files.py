"""Files written whole or not at all: a reader (a resume, a search, a rank of another node, a person) sees the
old file or the new one, never a part. The one way this package writes a file that others read."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

from dist_dml.infra.errors import UserError, one_line


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write in the block (torch.save, an exporter); when the block ends
    without error it is flushed to the disk and renamed over ``path`` (the folder flushed too, so the rename
    survives a crash of the machine); when it raises, the temporary file is removed and ``path`` is as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)  # an output's folder (eval --out runs/x/metrics.json)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


def write_atomically(path: str | Path, data: str | bytes) -> Path:
    """``data`` (text as UTF-8) written into ``path`` whole or not at all (see :func:`replacing`); ``path``."""
    with replacing(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return Path(path)


def _sync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # a folder that cannot be opened for reading (some network file systems): the rename stands
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_plain(path: str | Path, what: str, error: type[Exception], prefix: str = ""):
    """``torch.load(path, weights_only=True)``: tensors, numbers, strings and containers of them, nothing that runs
    code. A file that holds other Python objects, or that is no torch file at all, raises ``error`` ("PREFIX PATH:
    ...", ``what`` naming what it should be: a checkpoint, a state dict), in our words: torch's own message on a
    refused object goes on to explain how to load it unsafely, and cut to one line it reads as that advice."""
    import pickle

    import torch

    problem = regular_file_problem(path)
    if problem:
        raise error(f"{prefix}{problem}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" in str(exc).lower():
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
            held = f" ({found.group(1)})" if found else ""
            raise error(f"{prefix}{path}: holds Python objects{held}, not a plain {what}: refused (never unpickled)") \
                from None
        raise error(f"{prefix}{path}: not a readable {what} ({one_line(exc, 200)})") from None
    except Exception as exc:  # noqa: BLE001 -- a damaged or foreign file raises anything: all mean "unreadable"
        raise error(f"{prefix}{path}: not a readable {what} ({one_line(exc, 200)})") from None


def parse_json(text: str | bytes):
    """``json.loads``, with a document nested deeper than Python's parser can follow (a hostile manifest of
    100,000 brackets) a ValueError like any other malformed JSON, not a RecursionError."""
    import json

    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested deeper than a JSON document of ours ever is (thousands of levels)") from None


def read_json_object(path: Path, remedy: str) -> dict:
    """A small JSON object file of ours (an export's model.json, an index's meta.json); a damaged one is a
    UserError that says what to do (``remedy``)."""
    try:
        meta = parse_json(read_regular(path))
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise UserError(f"{path}: damaged ({one_line(exc, 2000)}); {remedy}") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path}: damaged (not a JSON object); {remedy}")
    return meta


class NotRegularFile(OSError):
    """A path to read that is a named pipe, a device or a socket: opening it could block for ever or never end."""


_KINDS = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def open_regular(path: str | Path, buffering: int = -1):
    """``open(path, "rb")`` of a regular file only: a FIFO, a device or a socket is refused (NotRegularFile, an
    OSError) without blocking on it, a folder is IsADirectoryError. Every local file the package reads opens
    through here (or :func:`read_regular`)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO with no writer would block a plain open() for ever
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "a folder, not a file", str(path))
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
            raise NotRegularFile(errno.EINVAL, f"{kind}, not a regular file: refused", str(path))
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb", buffering)
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | Path) -> bytes:
    """All the bytes of a regular file (see :func:`open_regular`)."""
    with open_regular(path) as f:
        return f.read()


def regular_file_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be read as a regular file (None if it can): for readers that open it themselves (torch,
    numpy, faiss, PIL)."""
    try:
        open_regular(path).close()
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    return None


def python_objects_in(path: str | Path, safe_globals: list = ()) -> str | None:
    """What in the torch file ``path`` a weights-only load would refuse, read from its pickle without unpickling
    it (torch.serialization.get_unsafe_globals_in_checkpoint): "holds Python objects (NAMES)", "not a torch zip
    file", or None where every object is a tensor, a container or one of ``safe_globals``."""
    import torch

    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (ValueError, RuntimeError, OSError) as exc:
        return f"not a torch zip file ({type(exc).__name__})"
    return f"holds Python objects ({', '.join(names[:3])}), not plain tensors" if names else None


def output_problem(path: str | Path, folder: bool = False) -> str | None:
    """Why ``path`` cannot take an output (a file, or with ``folder`` a folder of files) that a command will write
    after its work: it is a folder where a file goes (or a file where a folder goes), lies under a file, or its
    nearest existing folder is not writable (a read-only mount). None if it can. Checked before the work starts:
    an export or an evaluation that cannot be written is found at once, not after minutes."""
    path = Path(path)
    if path.is_dir() and not folder:
        return f"{path} is a folder, not a file"
    if path.exists() and folder and not path.is_dir():
        return f"{path} is a file, not a folder"
    if path.exists() and not os.access(path, os.W_OK):
        return f"{path} cannot be written here"
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{path} lies under {parent}, a file, not a folder"
    if not path.exists() and not os.access(parent, os.W_OK | os.X_OK):
        return f"{path} cannot be made: {parent} cannot be written (a read-only folder or mount?)"
    return None
