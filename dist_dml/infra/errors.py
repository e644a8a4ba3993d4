"""Errors that are the user's to fix (a config key, a file, an argument, a server): every CLI command
turns them into one line on stderr and exit code 2; the traceback only with --debug or DIST_DML_DEBUG=1."""
from __future__ import annotations

import errno
import os
import re


class UserError(Exception):
    """A mistake or a fault outside the program, explained in one line that names the key, file or
    argument to look at."""

    #: raised alike on every rank of a run (decided by rank 0 and broadcast): only rank 0 prints it
    on_every_rank = False


def as_write_error(path, exc: BaseException) -> OSError:
    """A failed write as an OSError with its errno. torch.save reports a full disk as a RuntimeError
    ("basic_ios::clear: iostream error"): where the file system of ``path`` has (almost) no space left,
    that is ENOSPC."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc
    folder = os.path.dirname(os.path.abspath(str(path)))
    while folder and not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    try:
        stats = os.statvfs(folder or "/")
        full = stats.f_bavail * stats.f_frsize < (16 << 20)
    except OSError:
        full = False
    if full:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return OSError(errno.EIO, one_line(exc, limit=1000), str(path))


def one_line(exc: BaseException | str, limit: int = 300, first_line: bool = False) -> str:
    """What an error says, on one line of at most ``limit`` characters (its type where it says nothing): the
    one formatter of the messages we pass on from libraries. ``first_line``: only its first line (MLflow's and
    the servers' errors put their summary there and a stack or a page below). An error raised in a DataLoader
    worker reaches the main process with the worker's traceback in its message: its own message is that
    traceback's last line."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = re.sub(r"^[\w.]+: ", "", last.strip())
    elif first_line and text:
        text = text.splitlines()[0]
    text = " ".join(text.split())[:limit]
    return text or (type(exc).__name__ if isinstance(exc, BaseException) else "")
