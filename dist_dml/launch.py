"""torchrun, as the launch scripts run it: the same arguments, restarts only where they can help.

    python -m dist_dml.launch --nproc_per_node 8 [--max_restarts 3] -m dist_dml.cli train CONFIG ...

torchrun restarts its workers on any failure, and ends in its own ChildFailedError traceback. A rank of
dist-dml that exits 2 met a mistake in the config or the data, or a run that cannot go on (it said so in
one line): starting it again would meet the same, so this launcher does not restart then. It restarts
on a crash or a killed rank (what ``--max_restarts`` is for), and ends with one line per failed rank
instead of a traceback, with exit code 2 where every failed rank exited 2 (else 1).
"""
from __future__ import annotations

import sys

USER_ERROR = 2  # dist-dml's exit code for a mistake or a run that cannot go on (dist_dml.errors)


def _no_restart_on_user_errors() -> None:
    """torchrun's local agent, told that a worker group in which a rank exited USER_ERROR has no restarts
    left (so it stops instead of starting the same mistake again)."""
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    monitor = LocalElasticAgent._monitor_workers
    if getattr(monitor, "dist_dml", False):
        return

    def monitor_workers(self, worker_group):
        result = monitor(self, worker_group)
        if result.is_failed() and self._remaining_restarts > 0 and \
                any(f.exitcode == USER_ERROR for f in result.failures.values()):
            print(f"[launch] a rank exited with code {USER_ERROR} (its reason is above): not restarting, the same "
                  "would happen again", file=sys.stderr, flush=True)
            self._remaining_restarts = 0
        return result

    monitor_workers.dist_dml = True
    LocalElasticAgent._monitor_workers = monitor_workers


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    _no_restart_on_user_errors()
    try:
        run(parse_args(argv))
    except ChildFailedError as exc:
        codes = []
        for rank, failure in sorted(exc.failures.items()):
            code = failure.exitcode
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            print(f"[launch] rank {rank} {how}", file=sys.stderr, flush=True)
            codes.append(code)
        return USER_ERROR if codes and all(c == USER_ERROR for c in codes) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
