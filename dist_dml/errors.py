"""Errors that are the user's to fix (a config key, a file, an argument, a server): every CLI command
turns them into one line on stderr and exit code 2; the traceback only with --debug or DIST_DML_DEBUG=1."""
from __future__ import annotations

import errno
import os


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
    return OSError(errno.EIO, " ".join(str(exc).split()) or type(exc).__name__, str(path))
