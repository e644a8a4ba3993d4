"""torchrun, as the launch scripts run it: the same arguments, restarts only where they can help.

    python -m dist_dml.launch --nproc_per_node 8 [--max_restarts 3] -m dist_dml.cli train CONFIG ...

torchrun restarts its workers on any failure, and ends in its own ChildFailedError traceback. A rank of
dist-dml that exits 2 met a mistake in the config or the data, or a run that cannot go on (it said so in
one line): starting it again would meet the same, so this launcher does not restart then. It restarts
on a crash or a killed rank (what ``--max_restarts`` is for), and ends with one line per failed rank
instead of a traceback, with exit code 2 where a rank exited 2 and every other failed rank exited 2 too or was
stopped by the agent because of it (SIGTERM); else 1.
"""
from __future__ import annotations

import signal
import sys

USER_ERROR = 2  # dist-dml's exit code for a mistake or a run that cannot go on (dist_dml.infra.errors)


def exit_code(codes: list[int]) -> int:
    """The launch's exit code from its failed ranks' (a negative code: killed by that signal). 2 where a rank
    exited 2 and every other failed rank exited 2 too or was stopped by the agent because of it (SIGTERM): the
    launch ended for the user's reason. Else 1."""
    stopped = -signal.SIGTERM
    return USER_ERROR if USER_ERROR in codes and all(c in (USER_ERROR, stopped) for c in codes) else 1


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from dist_dml.infra.patches import torchrun_stops_restarting_on

    torchrun_stops_restarting_on(USER_ERROR, f"[launch] a rank exited with code {USER_ERROR} (its reason is above): "
                                             "not restarting, the same would happen again")
    try:
        run(parse_args(argv))
    except ChildFailedError as exc:
        codes = []
        for rank, failure in sorted(exc.failures.items()):
            code = failure.exitcode
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            print(f"[launch] rank {rank} {how}", file=sys.stderr, flush=True)
            codes.append(code)
        return exit_code(codes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
