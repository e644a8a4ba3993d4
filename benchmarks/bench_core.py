"""Sampler + margin loss (forward and backward) against the bare E @ E.T product, in one process.

    python benchmarks/bench_core.py [--sizes 1024 4096 16384] [--dim 128] [--k 4] [--sampler distance_weighted]
    python benchmarks/bench_core.py --sizes 4096 --memory 0 16384 65536      # with a cross-batch memory

One line per global batch size (and memory size):
    B=4096 d=128 memory=65536 step_ms=... gemm_ms=... ratio=... peak_mb=...
With a memory the candidates are the batch followed by the memory's items (in its storage dtype, fp32 by
default), and gemm_ms is the B x (B + memory) product.
step_ms: one training step's sampling and loss work on the full global batch (one rank holding all
anchors), median of repeats; gemm_ms: E @ E.T of the same size, median of repeats, same run;
peak_mb: the step's extra memory (CPU: peak RSS growth, measured in a fresh process per size;
CUDA: peak allocated).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch


def median_ms(fn, repeats: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure(size: int, dim: int, k: int, sampler_kind: str, device: str, repeats: int, memory: int = 0) -> dict:
    from dist_dml.method.losses import LossConfig, build_loss
    from dist_dml.method.cross_batch_memory import CrossBatchMemory, MemoryConfig
    from dist_dml.method.sampling import SamplerConfig, build_sampler

    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(size, dim, generator=g), dim=1).to(dev)
    labels = torch.arange(size // k).repeat_interleave(k)[torch.randperm(size, generator=g)].to(dev)
    ids = torch.arange(size, device=dev)
    sampler = build_sampler(SamplerConfig(kind=sampler_kind))
    loss_fn = build_loss(LossConfig()).to(dev)
    leaf = embeddings.clone().requires_grad_()
    bank = CrossBatchMemory(MemoryConfig(size=memory), dim, dev) if memory else None
    while bank is not None and bank.fill < memory:  # a full memory of other classes' items
        bank.enqueue(torch.nn.functional.normalize(torch.randn(size, dim, generator=g), dim=1).to(dev),
                     (torch.arange(size) // k + size * (bank.fill // size + 1)).to(dev), ids, 0)
    step = [0]

    def train_step():
        step[0] += 1
        candidates, c_labels, c_ids = leaf, labels, ids
        if bank is not None:
            m_emb, m_labels, m_ids, _ = bank.contents()
            candidates, c_labels, c_ids = torch.cat([leaf, m_emb]), torch.cat([labels, m_labels]), torch.cat([ids, m_ids])
        triplets = sampler(candidates.detach(), c_labels, 0, size, step[0], positive_limit=size if bank else None)
        loss_fn(candidates, c_labels, c_ids, triplets).loss.backward()
        leaf.grad = None

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_mb()
    step_ms = median_ms(train_step, repeats, sync)
    if dev.type == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    others = torch.cat([embeddings, bank.contents()[0]]) if bank is not None else embeddings
    gemm_ms = median_ms(lambda: embeddings @ others.T, repeats, sync)
    return dict(B=size, d=dim, memory=memory, step_ms=step_ms, gemm_ms=gemm_ms, ratio=step_ms / gemm_ms,
                peak_mb=max(peak_mb, 0.0))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--sampler", default="distance_weighted")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=0, help="0: 7 below B=16384, 3 from it")
    parser.add_argument("--memory", type=int, nargs="+", default=[0], help="cross-batch memory sizes")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child process: one size, JSON out
    args = parser.parse_args()
    if args.one:
        repeats = args.repeats or (7 if args.one < 16384 else 3)
        print(json.dumps(measure(args.one, args.dim, args.k, args.sampler, args.device, repeats, args.memory[0])))
        return
    print(f"# sampler={args.sampler} K={args.k} device={args.device} threads={torch.get_num_threads()}", flush=True)
    for size in args.sizes:
        for memory in args.memory:
            # A fresh process per size, so that the peak-memory reading belongs to that size alone.
            cmd = [sys.executable, __file__, "--one", str(size), "--dim", str(args.dim), "--k", str(args.k),
                   "--sampler", args.sampler, "--device", args.device, "--repeats", str(args.repeats),
                   "--memory", str(memory)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            shown = f" memory={r['memory']}" if len(args.memory) > 1 or memory else ""
            print(f"B={r['B']} d={r['d']}{shown} step_ms={r['step_ms']:.1f} gemm_ms={r['gemm_ms']:.1f} "
                  f"ratio={r['ratio']:.2f} peak_mb={r['peak_mb']:.0f}", flush=True)


if __name__ == "__main__":
    main()
