"""torchrun -m tests.sharded_worker MODE OUT: sharded retrieval metrics of a seeded embedding set split over
the ranks (MODE: same | query_gallery), plain and post-processed; rank 0 saves the metrics and the kept neighbours.

The split puts class 0 on rank 0 only and deals the rest out unevenly, so that classes present on one
rank only and ranks of different sizes are covered."""
import sys

import numpy as np
import torch

from dist_dml.cli import leave
from dist_dml.retrieval.evaluation import EvalConfig
from dist_dml.infra.distributed import DistContext
from dist_dml.retrieval.sharded_metrics import Embedded, sharded_metrics

KS = (1, 2, 4, 8)
KEEP = (3, 17, 42)
# every post-processing step too: its metrics on W ranks must equal one process's
CONFIG = EvalConfig(recall_ks=KS, nmi=False, query_chunk=16, postprocess="dba+qe+k_reciprocal", kr_k1=6, kr_k2=3,
                    kr_shortlist=20)


def dataset(n: int, classes: int, seed: int, dim: int = 8):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centers = rng.normal(size=(classes, dim))
    emb = centers[labels] + 0.8 * rng.normal(size=(n, dim))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb.astype(np.float32), labels.astype(np.int64), np.arange(n, dtype=np.int64)


def owners(labels: np.ndarray, world: int) -> np.ndarray:
    rng = np.random.default_rng(7)
    out = rng.choice(world, len(labels), p=np.linspace(1, 2, world) / np.linspace(1, 2, world).sum())
    return np.where(labels == 0, 0, out)


def sets(mode: str):
    if mode == "same":
        return dataset(300, 40, 1), None
    return dataset(120, 30, 2), dataset(260, 30, 3)


def main(mode: str, out: str) -> None:
    ctx = DistContext.from_env(device="cpu")
    ctx.init_process_group()
    query, gallery = sets(mode)
    mine = lambda part: Embedded(*(torch.from_numpy(a[owners(part[1], ctx.world_size) == ctx.rank]) for a in part))  # noqa: E731
    metrics, kept = sharded_metrics(mine(query), None if gallery is None else mine(gallery),
                                    CONFIG, ctx, keep_ids=KEEP)
    if ctx.is_main:
        torch.save({"metrics": metrics, "kept": {k: v for k, v in kept.items()}}, out)
    ctx.barrier()
    ctx.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
    leave(0)  # without the interpreter's teardown, which can abort a finished rank (see dist_dml.cli.leave)
