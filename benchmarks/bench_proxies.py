"""The cost of class centres beside margin + DWS: a step's loss part and memory per rank at 10^4 and 10^6 classes.

    python benchmarks/bench_proxies.py [--nproc 2] [--batch 256] [--dim 128] [--steps 8] [--classes 10000,1000000]

Each arm is a launch of --nproc CPU processes (gloo, one thread each) that times the loss part of a training step
on a seeded global batch of embeddings (no backbone: what the loss adds to any step): the gather, distance-weighted
sampling and the margin loss over the global batch, and, in the proxy arms, the loss against the class centres
sharded over the ranks, the backward into the embeddings and the centres, and the centres' optimizer step (Adam).
Prints per arm the median step in ms, its ratio to margin + DWS alone (the first arm; every arm of one run), the
centres' state per rank (rows x dim in float32, with the gradient and Adam's two moments) and rank 0's peak
resident memory over the arm's process (its start-up included; the margin arm's is the floor):

    arm=margin classes=0 step_ms=... ratio=1.00 state_mb_per_rank=0.0 peak_rss_mb=...
    arm=margin+arcface classes=1000000 sample_rate=1 step_ms=... ratio=... state_mb_per_rank=... peak_rss_mb=...
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = [("margin", 0, 1.0), ("margin+proxy_anchor", None, 1.0), ("margin+norm_softmax", None, 1.0),
        ("margin+arcface", None, 1.0), ("margin+arcface", None, 0.1)]


def worker(args) -> None:
    import torch

    from dist_dml.infra.distributed import DistContext
    from dist_dml.method.losses import LossConfig, build_loss
    from dist_dml.method.objective import GlobalBatchObjective
    from dist_dml.method.proxies import ProxyConfig
    from dist_dml.method.sampling import SamplerConfig, build_sampler
    from dist_dml.config.optimizer import OptimizerConfig
    from dist_dml.train.centres import ClassCentres

    torch.set_num_threads(1)
    ctx = DistContext.from_env(device="cpu")
    ctx.init_process_group()
    kind = args.arm.partition("+")[2]
    classes = args.classes if kind else 0
    centres = None
    if kind:
        config = ProxyConfig(kind=kind, sample_rate=args.sample_rate, num_classes=classes)
        centres = ClassCentres(config, classes, args.dim, ctx, OptimizerConfig(name="adam", lr=1e-3), lambda s: 1e-3)
    objective = GlobalBatchObjective(build_sampler(SamplerConfig(kind="distance_weighted", seed=1)),
                                     build_loss(LossConfig()), ctx, centres=centres)
    per_class = 4
    times = []
    for step in range(args.steps + 2):
        generator = torch.Generator().manual_seed(step * 1000 + ctx.rank)
        local = torch.randn(args.batch, args.dim, generator=generator).requires_grad_()
        # P x K classes spread over the catalogue (the same labels on every rank's slice: a class per K images)
        first = torch.randint(0, max(classes, 1000) - args.batch, (1,), generator=torch.Generator().manual_seed(step))
        labels = (first + ctx.rank * args.batch // per_class + torch.arange(args.batch) // per_class) % max(classes, 1000)
        ids = torch.arange(args.batch) + ctx.rank * args.batch
        ctx.barrier()
        start = time.perf_counter()
        result = objective(local, labels, ids, step)
        (result.output.loss * ctx.world_size).backward()
        if centres is not None:
            centres.after_step(result, {}, step, True)
        ctx.barrier()
        if step >= 2:  # the first two pay for allocation
            times.append(time.perf_counter() - start)
    if ctx.rank == 0:
        rows = centres.rows[1] - centres.rows[0] if centres else 0
        state = rows * args.dim * 4 * 4 / 2**20
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print("RESULT " + json.dumps({"step_ms": statistics.median(times) * 1e3, "state_mb": state, "peak_mb": peak}),
              flush=True)
    ctx.barrier()
    ctx.shutdown()


def launch(args, arm: str, classes: int, sample_rate: float) -> dict:
    from dist_dml.infra.distributed import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
           f"--master_port={free_port()}", str(Path(__file__).resolve()), "--worker", "--arm", arm, "--classes",
           str(classes), "--sample-rate", str(sample_rate), "--batch", str(args.batch), "--dim", str(args.dim),
           "--steps", str(args.steps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    ran = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    found = re.search(r"RESULT (\{.*\})", ran.stdout)
    if ran.returncode or not found:
        raise SystemExit(f"arm {arm} at {classes} classes failed:\n{ran.stdout[-3000:]}\n{ran.stderr[-3000:]}")
    return json.loads(found[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256, help="embeddings per rank (the global batch: nproc x this)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--classes", default="10000,1000000")
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--arm", default="margin")
    parser.add_argument("--sample-rate", type=float, default=1.0)
    args = parser.parse_args()
    if args.worker:
        args.classes = int(args.classes)
        worker(args)
        return
    sizes = [int(c) for c in args.classes.split(",")]
    plan = [(arm, 0, rate) if arm == "margin" else (arm, size, rate) for arm, _, rate in ARMS
            for size in (sizes if arm != "margin" else sizes[:1])]
    print(f"[proxies] {len(plan)} arms of {args.steps} steps on {args.nproc} processes, a global batch of "
          f"{args.nproc * args.batch} x {args.dim}; about a minute each at 10^6 classes, seconds below", flush=True)
    base = None
    for arm, classes, rate in plan:
        got = launch(args, arm, classes, rate)
        base = base or got["step_ms"]
        print(f"arm={arm} classes={classes} sample_rate={rate:g} step_ms={got['step_ms']:.1f} "
              f"ratio={got['step_ms'] / base:.2f} state_mb_per_rank={got['state_mb']:.1f} "
              f"peak_rss_mb={got['peak_mb']:.0f}", flush=True)


if __name__ == "__main__":
    main()
