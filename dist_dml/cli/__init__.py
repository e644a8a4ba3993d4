"""`dist-dml`: the entry point of every command. The commands live in :mod:`~dist_dml.cli.training` (train, check,
demo, config, setup, fetch-weights, grid) and :mod:`~dist_dml.cli.retrieval` (eval, embed, export, index, search,
prep); each reads its arguments, calls the library and prints. There is one error path: a command raises a
UserError (a mistake or a fault outside the program) and :func:`main` prints it in one line, exit code 2."""
from __future__ import annotations

import argparse
import errno
import os
import sys

from dist_dml.infra.errors import UserError, one_line


def build_parser() -> argparse.ArgumentParser:
    """`dist-dml` and its subcommands (each also takes --debug)."""
    from dist_dml.cli import retrieval, training
    from dist_dml.infra.patches import subcommands_with_parents

    parser = argparse.ArgumentParser(prog="dist-dml", description="Distributed deep metric learning")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of a user error (also DIST_DML_DEBUG=1)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of a user error (also DIST_DML_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    subcommands_with_parents(sub, [common])
    training.add_commands(sub)
    retrieval.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # section.key=value overrides placed after an option (argparse takes positionals before them only)
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    debug = getattr(args, "debug", False) or os.environ.get("DIST_DML_DEBUG", "") not in ("", "0")
    try:
        return args.func(args)
    except UserError as exc:
        if debug:
            raise
        from dist_dml.infra.distributed import env_rank

        rank = env_rank()
        if rank == 0 or not exc.on_every_rank:
            where = f" (rank {rank})" if rank else ""
            print(f"dist-dml {args.command}: error{where}: {one_line(exc, 2000)}", file=sys.stderr, flush=True)
        return 2
    except OSError as exc:
        if debug or exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"dist-dml {args.command}: error: no space left on the device of {exc.filename or 'the output'}: "
              f"free some space (or give another train.output_dir) and run again", file=sys.stderr, flush=True)
        return 2


def leave(code: int) -> None:
    """Exit a rank of a multi-process launch whose command returned: everything is written and its process group
    is down, so leave without the interpreter's teardown, where torch's C++ static destructors can abort a finished
    rank ("terminate called without an active exception", exit -6) and turn a run that succeeded into a failed
    launch."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

