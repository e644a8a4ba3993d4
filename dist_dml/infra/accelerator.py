"""The one place that chooses the accelerator and prepares a process for DeepSpeed. Every entry point (the
`dist-dml` command, the test workers, the benchmarks) calls :func:`configure` once, before DeepSpeed is
imported; importing a dist_dml module changes no environment variable.

- ``DS_ACCELERATOR``: ``cuda`` where the run's device is CUDA, else ``cpu`` (DeepSpeed reads it when it is
  imported, and would otherwise guess with a warning);
- ``TORCH_EXTENSIONS_DIR``: DeepSpeed's JIT-built ops (the CPU communication op) in this Python
  environment, not in the per-user cache that every environment of the machine would share, under one
  lock;
- ``PATH``: this environment's ``ninja`` first. torch builds the ops with the first ninja on PATH, and
  ninja's versions hash a build command differently (the system's 1.11 against the 1.13 DeepSpeed
  installs here): a process that found the other one rebuilt the op, a minute each time.

Values the caller set already are kept. On the CPU, torch's warning that it finds no CUDA runtime (which
DeepSpeed's import triggers) is kept out of the log. :func:`deepspeed_import` is where DeepSpeed is imported.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


def deepspeed_import():
    """Around the import of DeepSpeed (dist_dml.train.engine's): MLflow hidden from it. DeepSpeed's autotuner, which
    dist-dml does not use, imports MLflow whenever it is installed: seconds of every rank's start, in every
    launch. Where this process has not imported MLflow yet, the import
    of ``mlflow`` fails inside the block (the autotuner catches it and records has_mlflow=False) and works
    again after it: the tracker imports MLflow on the rank that tracks a run, only there."""
    from dist_dml.infra.patches import hidden_module

    return hidden_module("mlflow")


def configure(device: str = "auto") -> str:
    """Prepare this process for ``device`` (auto, cpu or cuda); the accelerator it will use: cpu or cuda."""
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        os.environ["DS_ACCELERATOR"] = "cuda" if use_cuda else "cpu"
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    if os.environ["DS_ACCELERATOR"] == "cpu":  # torch's "No CUDA runtime is found" on importing DeepSpeed: true, and
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # beside the point on the CPU
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if (Path(bin_dir) / "ninja").is_file() and path.split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = bin_dir + os.pathsep + path
    return os.environ["DS_ACCELERATOR"]


def on_cpu() -> bool:
    """Whether DeepSpeed runs on its CPU accelerator in this process."""
    return os.environ.get("DS_ACCELERATOR") == "cpu"
