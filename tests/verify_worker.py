"""torchrun -m tests.verify_worker CONFIG_JSON OUT: data.verify_sha256 for a job (issue 12). Every rank checks
the training shards once for the job (data.verify), then reads its epoch 0; rank 0 saves each rank's
verdicts (shards that failed, shards that matched), what its reading counted corrupt and what it printed
is in stdout."""
import json
import sys
from pathlib import Path

from dist_dml.cli import leave
from dist_dml.data import DataConfig, TrainStream, verify
from dist_dml.infra.distributed import DistContext


def main() -> None:
    cfg = DataConfig(**json.loads(sys.argv[1]))
    ctx = DistContext.from_env(device="cpu")
    ctx.init_process_group()
    stream = TrainStream(cfg, ctx.rank, ctx.world_size)
    verify(stream, ctx, "training")
    corrupt = sum(b["errors"]["corrupt_shards"] for b in stream.worker_batches(0, 0))
    verdicts = stream.verdicts
    found = ctx.all_gather_object({"failed": sorted(verdicts.failed), "verified": sorted(verdicts.verified),
                                   "corrupt": corrupt})
    if ctx.is_main:
        Path(sys.argv[2]).write_text(json.dumps(found))
    ctx.barrier()
    ctx.shutdown()


if __name__ == "__main__":
    main()
    leave(0)  # without the interpreter's teardown, which can abort a finished rank (see dist_dml.cli.leave)
