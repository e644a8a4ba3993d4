"""torchrun -m tests.prototypes_worker OUT: class_sampling's prototypes (ClassPrototypes) on every rank, updated from
the global batch DistContext gathers in rank order, checked identical on every rank after each step (each rank's
table all-gathered and compared bit for bit); rank 0 saves the global batches, its table and its last snapshot."""
import sys

import torch
import torch.distributed as dist

from dist_dml.cli import leave
from dist_dml.data.grouping import ClassSamplingConfig
from dist_dml.infra.distributed import DistContext
from dist_dml.method.class_prototypes import ClassPrototypes

CLASSES, DIM, STEPS, LOCAL = 20, 8, 6, 6


def main() -> None:
    ctx = DistContext.from_env(device="cpu")
    ctx.init_process_group()
    protos = ClassPrototypes(ClassSamplingConfig(share=0.5, refresh_steps=2, momentum=0.7), CLASSES, DIM, workers=1)
    protos.begin(0)
    seen = []
    for step in range(STEPS):
        g = torch.Generator().manual_seed(1000 * step + ctx.rank)
        labels = torch.randint(0, CLASSES - 3, (LOCAL,), generator=g)  # 3 classes never seen
        local = torch.nn.functional.normalize(torch.randn(LOCAL, DIM, generator=g), dim=1)
        embeddings, all_labels = ctx.all_gather_no_grad(local), ctx.all_gather_no_grad(labels)
        protos.after_step(embeddings, all_labels, step)
        tables = ctx.all_gather_no_grad(protos.table.table.float()[None])  # fp16 in fp32: exact
        if not all(torch.equal(tables[0], t) for t in tables):
            raise SystemExit(f"rank {ctx.rank}: the prototypes differ across ranks after step {step}")
        seen.append((embeddings, all_labels))
    if ctx.rank == 0:
        newest = max(int(n) for n in protos.ring.numbers)
        torch.save({"batches": seen, "table": protos.table.table, "updated": protos.table.updated,
                    "snapshot": protos.ring.data[newest % protos.ring.slots].clone(), "newest": newest}, sys.argv[1])
    dist.barrier()
    ctx.shutdown()


if __name__ == "__main__":
    main()
    leave(0)  # without the interpreter's teardown, which can abort a finished rank (see dist_dml.cli.leave)
