"""torchrun -m tests.gather_worker OUT: the gradient of each rank's input through DistContext.gather."""
import sys

import torch
import torch.distributed as dist

from dist_dml.infra.distributed import DistContext


def main() -> None:
    ctx = DistContext.from_env(device="cpu")
    ctx.init_process_group()
    x = torch.full((2, 3), float(ctx.rank + 1), requires_grad=True)
    gathered = ctx.all_gather_with_grad(x)
    w = torch.arange(gathered.numel(), dtype=torch.float32).view_as(gathered)
    ((ctx.rank + 1) * (gathered * w).sum()).backward()
    grads = ctx.all_gather_no_grad(x.grad)
    if ctx.rank == 0:
        torch.save(grads, sys.argv[1])
    dist.barrier()
    ctx.shutdown()


if __name__ == "__main__":
    main()
