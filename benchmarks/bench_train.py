"""Training throughput of the CPU default (configs/cpu_synthetic.yaml) with 1 and 2 processes, and the
share of a step spent in sampling + loss against the backbone.

    python benchmarks/bench_train.py [--steps 120]

Prints
    nproc=1 images_s=...
    nproc=2 images_s=... scaling=...           (images/s of 2 processes over 1; each process 1 thread)
    backbone_ms=... sampling_loss_ms=... share=...   (forward + backward of one step, one process)
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

from dist_dml.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/cpu_synthetic.yaml"


def throughput(nproc: int, data: Path, out: Path, steps: int) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           "-m", "dist_dml.cli", "train", str(CONFIG), f"data.root={data}", f"train.output_dir={out}",
           f"train.steps={steps}", "train.log_every=20", "eval.at_start=false", "eval.every_steps=0",
           "checkpoint.every_steps=0", "checkpoint.resume=none", "tracking.enabled=false"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    log = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    rates = [float(x) for x in re.findall(r"images/s=([0-9.]+)", log)]
    return statistics.median(rates[1:])  # the first interval pays start-up


def step_split(repeats: int = 10) -> tuple[float, float]:
    """ms of the backbone's and of sampling + loss's forward and backward, one global batch of 128."""
    from dist_dml.losses import LossConfig, build_loss
    from dist_dml.models import ModelConfig, build_model
    from dist_dml.sampling import SamplerConfig, build_sampler

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=120)
    args = parser.parse_args()
    from data_prep.cli import main as prep

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        prep(["synthetic", "--classes", "500", "--test-classes", "10", "--per-class", "4:8", "--size", "64",
              "--out", str(data), "--no-progress"])
        rates = {n: throughput(n, data, Path(tmp) / f"run{n}", args.steps) for n in (1, 2)}
    print(f"nproc=1 images_s={rates[1]:.0f}")
    print(f"nproc=2 images_s={rates[2]:.0f} scaling={rates[2] / rates[1]:.2f}")
    backbone, objective = step_split()
    print(f"backbone_ms={backbone:.1f} sampling_loss_ms={objective:.1f} share={objective / (backbone + objective):.3f}")


if __name__ == "__main__":
    main()
