"""Full evaluation against faiss search alone and a plain torch brute-force kNN, in one run.

    python benchmarks/bench_eval.py [--n 100000] [--classes 10000] [--dim 128] [--postprocess none,qe,dba,dba+qe]

Random L2-normalised embeddings in `classes` classes (each item queries all others, SOP-style):
    eval_s=... faiss_search_s=... torch_bruteforce_s=... ratio=...   (ratio = eval / faiss search)
eval: Recall@{1,10,100}, R-Precision, MAP@R and NMI (faiss k-means, one cluster per class);
faiss search: the exact k-NN search the evaluation runs, alone; torch: blocked matmul + topk.

Then retrieval post-processing (eval.postprocess), each in one run beside the plain evaluation without NMI:
    postprocess=dba+qe eval_s=... ratio=... R@1 0.0123 -> 0.0145 MAP@R ...   (ratio = with it / without it)
The evaluation with post-processing reports the plain metrics too, so its ratio counts the plain pass.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--postprocess", default="none,qe,dba,dba+qe,k_reciprocal",
                        help="comma-separated eval.postprocess values, the first none (the baseline)")
    args = parser.parse_args()

    from dist_dml.retrieval.evaluation import EvalConfig
    from dist_dml.infra.distributed import DistContext
    from dist_dml.retrieval.faiss_search import knn
    from dist_dml.retrieval.sharded_metrics import Embedded, sharded_metrics

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.n, args.dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = rng.integers(0, args.classes, args.n)
    ks = (1, 10, 100)

    start = time.perf_counter()
    metrics, _ = sharded_metrics(Embedded(torch.from_numpy(x), torch.from_numpy(labels), torch.arange(args.n)), None,
                                 EvalConfig(recall_ks=ks, nmi=True), DistContext())
    eval_s = time.perf_counter() - start

    k = max(max(ks), int(np.bincount(labels).max()) - 1)
    start = time.perf_counter()
    knn(x, None, k, exclude_self=True, use_gpu=False)
    search_s = time.perf_counter() - start

    xt = torch.from_numpy(x)
    start = time.perf_counter()
    for lo in range(0, args.n, 4096):
        sim = xt[lo:lo + 4096] @ xt.T
        sim[torch.arange(sim.shape[0]), torch.arange(lo, lo + sim.shape[0])] = -float("inf")
        sim.topk(k, dim=1)
    torch_s = time.perf_counter() - start

    print(" ".join(f"{name}={value:.4f}" for name, value in metrics.items()))
    print(f"eval_s={eval_s:.1f} faiss_search_s={search_s:.1f} torch_bruteforce_s={torch_s:.1f} "
          f"ratio={eval_s / search_s:.2f}", flush=True)

    # Class structure, so post-processing has neighbours worth averaging: the same items pulled towards their
    # class centres (random unit vectors alone have none).
    centres = rng.standard_normal((args.classes, args.dim), dtype=np.float32)
    x = x + 0.6 * centres[labels] / np.sqrt(args.dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    embedded = Embedded(torch.from_numpy(x), torch.from_numpy(labels), torch.arange(args.n))
    plain_s = None
    for spec in args.postprocess.split(","):
        start = time.perf_counter()
        metrics, _ = sharded_metrics(embedded, None, EvalConfig(recall_ks=ks, nmi=False, postprocess=spec),
                                     DistContext())
        seconds = time.perf_counter() - start
        plain_s = seconds if spec == "none" else plain_s
        after = metrics.get("postprocessed", metrics)
        print(f"postprocess={spec} eval_s={seconds:.1f}" + (f" ratio={seconds / plain_s:.2f}" if plain_s else "")
              + "".join(f" {name} {metrics[key]:.4f} -> {after[key]:.4f}" for name, key in
                        (("R@1", "recall_at_1"), ("MAP@R", "map_at_r"))), flush=True)


if __name__ == "__main__":
    main()
