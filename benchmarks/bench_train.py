"""Training throughput of the CPU default (configs/cpu_synthetic.yaml) with 1 and 2 processes, and the
share of a step spent in sampling + loss against the backbone.

    python benchmarks/bench_train.py [--steps 120]

Prints
    nproc=1 images_s=...
    nproc=2 images_s=... scaling=...           (images/s of 2 processes over 1; each process 1 thread)
    backbone_ms=... sampling_loss_ms=... share=...   (forward + backward of one step, one process)
    beta_classes=1000000 step_ms=... global_beta_step_ms=... overhead=...
        (2 processes: a per-class beta table of 1,000,000 rows, reduced by DeepSpeed and stepped by the
        lazy optimizer every step, against the global beta alone; runs alternated, medians)

    python benchmarks/bench_train.py --only class    # class_sampling's cost in training:
        class_sampling step_ms=... random_step_ms=... overhead=...
            (2 processes, class_sampling.share=0.5 refreshed every 10 steps against random batches; alternated)
        prototypes classes=1000000 dim=128 batch=128 update_ms=... publish_ms=... per_step_ms=... share_of_step=...
            (one process: the table's update from a global batch, its snapshot every 50 steps, against the
            step time above)
    python benchmarks/bench_train.py --only beta     # just the beta line
    python benchmarks/bench_train.py --only chunks   # train.embedding_chunks 1, 2, 4 at one global batch:
        chunks=N step_ms=... peak_rss_mb=... time_ratio=... memory_ratio=...
        (1 process, tiny CNN with frozen BatchNorm at 112 px, a local batch of 256; ratios against N=1)
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dist_dml.infra.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/cpu_synthetic.yaml"


def throughput(nproc: int, data: Path, out: Path, steps: int, *overrides: str) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           "-m", "dist_dml.cli", "train", str(CONFIG), f"data.root={data}", f"train.output_dir={out}",
           f"train.steps={steps}", "train.log_every=20", "eval.at_start=false", "eval.every_steps=0",
           "checkpoint.every_steps=0", "checkpoint.resume=none", "tracking.enabled=false", *overrides]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    log = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    rates = [float(x) for x in re.findall(r"images/s=([0-9.]+)", log)]
    return statistics.median(rates[1:])  # the first interval pays start-up


def step_split(repeats: int = 10) -> tuple[float, float]:
    """ms of the backbone's and of sampling + loss's forward and backward, one global batch of 128."""
    from dist_dml.method.losses import LossConfig, build_loss
    from dist_dml.models.embedding import ModelConfig, build_model
    from dist_dml.method.sampling import SamplerConfig, build_sampler

    torch.set_num_threads(1)
    model = build_model(ModelConfig(backbone="tiny_cnn", embedding_dim=64))
    loss_fn, sampler = build_loss(LossConfig()), build_sampler(SamplerConfig())
    images = torch.randint(0, 255, (128, 3, 56, 56), dtype=torch.uint8)
    labels = torch.arange(32).repeat_interleave(4)
    ids = torch.arange(128)
    backbone, objective = [], []
    for i in range(repeats + 2):
        start = time.perf_counter()
        emb = model(images)
        leaf = emb.detach().requires_grad_()
        mid = time.perf_counter()
        out = loss_fn(leaf, labels, ids, sampler(leaf.detach(), labels, 0, 128, i))
        out.loss.backward()
        after = time.perf_counter()
        emb.backward(leaf.grad)
        end = time.perf_counter()
        if i >= 2:
            backbone.append((mid - start) + (end - after))
            objective.append(after - mid)
    return 1e3 * statistics.median(backbone), 1e3 * statistics.median(objective)


def beta_overhead(data: Path, tmp: Path, steps: int, classes: int = 1_000_000, rounds: int = 2) -> str:
    """Step time of 2 processes with a per-class beta table of ``classes`` rows against the global beta
    alone, runs alternated so that both see the same machine."""
    batch = 2 * 16 * 4  # the CPU config's global batch: 2 ranks x P 16 x K 4
    per_class = ["loss.beta_per_class=true", f"loss.num_classes={classes}"]
    times: dict[str, list[float]] = {"table": [], "global": []}
    for r in range(rounds):
        for name, extra in (("global", []), ("table", per_class)):
            times[name].append(1e3 * batch / throughput(2, data, tmp / f"beta{name}{r}", steps, *extra))
    table, alone = statistics.median(times["table"]), statistics.median(times["global"])
    return (f"beta_classes={classes} step_ms={table:.1f} global_beta_step_ms={alone:.1f} "
            f"overhead={table / alone - 1:.3f}")


def class_sampling_overhead(data: Path, tmp: Path, steps: int, rounds: int = 2) -> tuple[str, float]:
    """Step time of 2 processes with class_sampling.share=0.5 against random batches, runs alternated."""
    batch = 2 * 16 * 4
    extra = ["class_sampling.share=0.5", "class_sampling.refresh_steps=10"]
    times: dict[str, list[float]] = {"random": [], "class": []}
    for r in range(rounds):
        for name, overrides in (("random", []), ("class", extra)):
            times[name].append(1e3 * batch / throughput(2, data, tmp / f"class{name}{r}", steps, *overrides))
    grouped, alone = statistics.median(times["class"]), statistics.median(times["random"])
    return (f"class_sampling step_ms={grouped:.1f} random_step_ms={alone:.1f} overhead={grouped / alone - 1:.3f}",
            alone)


def prototype_cost(step_ms: float, classes: int = 1_000_000, dim: int = 128, batch: int = 128,
                   refresh: int = 50) -> str:
    """The prototypes' cost per step at ``classes`` classes: the update from a global batch of ``batch`` and the
    snapshot every ``refresh`` steps, against a step of ``step_ms``."""
    from dist_dml.data.grouping import ClassSamplingConfig
    from dist_dml.method.class_prototypes import ClassPrototypes

    torch.set_num_threads(1)  # as each training process runs (OMP_NUM_THREADS=1)
    protos = ClassPrototypes(ClassSamplingConfig(share=0.5, refresh_steps=refresh), classes, dim, workers=2)
    update, publish = [], []
    for step in range(30):
        embeddings = torch.nn.functional.normalize(torch.randn(batch, dim), dim=1)
        labels = torch.randint(0, classes, (batch // 4,)).repeat_interleave(4)
        start = time.perf_counter()
        protos.table.update(embeddings, labels, step)
        mid = time.perf_counter()
        protos.ring.publish(step, protos.table.table)
        update.append(mid - start)
        publish.append(time.perf_counter() - mid)
    update_ms, publish_ms = 1e3 * statistics.median(update), 1e3 * statistics.median(publish)
    per_step = update_ms + publish_ms / refresh
    return (f"prototypes classes={classes} dim={dim} batch={batch} update_ms={update_ms:.2f} "
            f"publish_ms={publish_ms:.1f} per_step_ms={per_step:.2f} share_of_step={per_step / step_ms:.4f}")


def chunk_costs(data: Path, tmp: Path, steps: int) -> list[str]:
    """Step time and peak RSS of one process at train.embedding_chunks 1, 2 and 4 for the same batch."""
    found = {}
    for chunks in (1, 2, 4):
        train = [sys.executable, "-m", "dist_dml.cli", "train", str(CONFIG), f"data.root={data}",
                 f"train.output_dir={tmp / f'chunks{chunks}'}", f"train.steps={steps}", "train.log_every=10",
                 "eval.at_start=false", "eval.every_steps=0", "checkpoint.every_steps=0", "checkpoint.resume=none",
                 "tracking.enabled=false", "data.classes_per_batch=64", "data.images_per_class=4",
                 "data.image_size=112", "data.resize=128", "data.workers=1", "model.norm=frozen",
                 f"train.embedding_chunks={chunks}"]
        # The training's peak RSS: a wrapper process that runs it and reads its children's maximum.
        wrapper = ("import resource, subprocess, sys; out = subprocess.run(sys.argv[1:], capture_output=True, text=True, "
                   "check=True).stdout; print(out); print('peak_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "2"}
        log = subprocess.run([sys.executable, "-c", wrapper, *train], env=env, capture_output=True, text=True,
                             check=True).stdout
        rates = [float(x) for x in re.findall(r"images/s=([0-9.]+)", log)]
        peak_mb = int(re.findall(r"peak_kb (\d+)", log)[-1]) / 1024
        found[chunks] = (1e3 * 256 / statistics.median(rates[1:] or rates), peak_mb)
    base_ms, base_mb = found[1]
    return [f"chunks={n} step_ms={ms:.0f} peak_rss_mb={mb:.0f} time_ratio={ms / base_ms:.2f} "
            f"memory_ratio={mb / base_mb:.2f}" for n, (ms, mb) in found.items()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--only", choices=["beta", "chunks", "class"], help="run one measurement only")
    args = parser.parse_args()
    from data_prep.cli import main as prep

    print("[bench_train] synthetic data, then 2-process trainings of about 30 s each (a few minutes)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        prep(["synthetic", "--classes", "500", "--test-classes", "10", "--per-class", "4:8", "--size", "64",
              "--out", str(data), "--no-progress"])
        if args.only == "class":
            line, step_ms = class_sampling_overhead(data, Path(tmp), args.steps)
            print(line, flush=True)
            print(prototype_cost(step_ms), flush=True)
            return
        if args.only == "chunks":
            print("\n".join(chunk_costs(data, Path(tmp), 40)), flush=True)
            return
        if args.only != "beta":
            rates = {n: throughput(n, data, Path(tmp) / f"run{n}", args.steps) for n in (1, 2)}
            print(f"nproc=1 images_s={rates[1]:.0f}")
            print(f"nproc=2 images_s={rates[2]:.0f} scaling={rates[2] / rates[1]:.2f}")
            backbone, objective = step_split()
            print(f"backbone_ms={backbone:.1f} sampling_loss_ms={objective:.1f} "
                  f"share={objective / (backbone + objective):.3f}", flush=True)
        print(beta_overhead(data, Path(tmp), args.steps), flush=True)


if __name__ == "__main__":
    main()
