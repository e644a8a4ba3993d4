"""torchrun -m tests.centres_worker OUT: each centre loss with its centres sharded over the ranks, in float64, on a
seeded global batch (every rank builds the same and takes its slice); rank 0 saves the summed shares, the gradient
of every image's embedding and of every centre, gathered in rank (class) order."""
import sys

import torch
import torch.distributed as dist

from dist_dml.cli import leave
from dist_dml.infra.distributed import DistContext
from dist_dml.method.proxies import CentreLoss, CentreLossConfig

CLASSES, DIM, PER_RANK_IMAGES = 11, 5, 6
CASES = [CentreLossConfig(kind="proxy_anchor"), CentreLossConfig(kind="norm_softmax"),
         CentreLossConfig(kind="cosface", scale=8.0), CentreLossConfig(kind="arcface", scale=8.0),
         CentreLossConfig(kind="arcface", scale=8.0, sample_rate=0.5, seed=3)]


def batch(world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A global batch of 6 images a rank, the same whatever the rank asks (classes repeat, some are absent)."""
    generator = torch.Generator().manual_seed(world_size)
    n = PER_RANK_IMAGES * world_size
    return (torch.randn(n, DIM, generator=generator, dtype=torch.float64),
            torch.randint(0, CLASSES - 2, (n,), generator=generator))


def run(ctx: DistContext, config: CentreLossConfig, embeddings: torch.Tensor, labels: torch.Tensor, step: int = 7):
    """(the summed shares, this rank's embeddings' gradient, this rank's centres' gradient, its centres)."""
    loss = CentreLoss(config, CLASSES, DIM, ctx).double()
    per = len(embeddings) // ctx.world_size
    local = embeddings[ctx.rank * per:(ctx.rank + 1) * per].clone().requires_grad_()
    share = loss(ctx.all_gather_with_grad(local), labels, step)
    share.backward()
    return ctx.all_reduce(share.detach(), "sum"), local.grad, loss.centres.grad, loss.centres.detach()


def main() -> None:
    ctx = DistContext.from_env(device="cpu")
    ctx.init_process_group()
    embeddings, labels = batch(ctx.world_size)
    out = []
    for config in CASES:
        total, grad, centre_grad, centres = run(ctx, config, embeddings, labels)
        out.append({"loss": total, "grad": ctx.all_gather_no_grad(grad),
                    "centre_grad": ctx.all_gather_uneven(centre_grad), "centres": ctx.all_gather_uneven(centres)})
    if ctx.rank == 0:
        torch.save(out, sys.argv[1])
    dist.barrier()
    ctx.shutdown()


if __name__ == "__main__":
    main()
    leave(0)  # without the interpreter's teardown, which can abort a finished rank (see dist_dml.cli.leave)
