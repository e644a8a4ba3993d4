"""Errors that are the user's to fix (a config key, a file, an argument, a server): every CLI command
turns them into one line on stderr and exit code 2; the traceback only with --debug or DIST_DML_DEBUG=1."""
from __future__ import annotations


class UserError(Exception):
    """A mistake or a fault outside the program, explained in one line that names the key, file or
    argument to look at."""

    #: raised alike on every rank of a run (decided by rank 0 and broadcast): only rank 0 prints it
    on_every_rank = False
