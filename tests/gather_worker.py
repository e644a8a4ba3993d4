"""torchrun -m tests.gather_worker OUT: the gradient of each rank's input through DistContext.gather, and what
every rank gets of a decision taken by rank 0 (DistContext.decide): its value, or its refusal raised alike."""
import os
import sys

import torch
import torch.distributed as dist

from dist_dml.cli import leave
from dist_dml.infra.distributed import DistContext
from dist_dml.infra.errors import UserError


class Refused(UserError):
    pass


def main() -> None:
    ctx = DistContext.from_env(device="cpu")
    ctx.init_process_group()
    x = torch.full((2, 3), float(ctx.rank + 1), requires_grad=True)
    gathered = ctx.all_gather_with_grad(x)
    w = torch.arange(gathered.numel(), dtype=torch.float32).view_as(gathered)
    ((ctx.rank + 1) * (gathered * w).sum()).backward()
    grads = ctx.all_gather_no_grad(x.grad)
    ran = []
    value = ctx.decide(lambda: ran.append(ctx.rank) or f"chosen by pid {os.getpid()}")
    try:
        ctx.decide(lambda: (_ for _ in ()).throw(Refused(f"refused by rank {ctx.rank}")))
        refusal = None
    except Refused as exc:
        refusal = str(exc)
    decisions = ctx.all_gather_object((value, refusal, ran))
    if ctx.rank == 0:
        torch.save({"grads": grads, "decisions": decisions}, sys.argv[1])
    dist.barrier()
    ctx.shutdown()


if __name__ == "__main__":
    main()
    leave(0)  # without the interpreter's teardown, which can abort a finished rank (see dist_dml.cli.leave)
