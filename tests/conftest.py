import os
import subprocess
import sys
from pathlib import Path

import pytest

from dist_dml.distributed import free_port

from dist_dml.accelerator import configure  # noqa: E402

configure("cpu")  # the tests' processes and every subprocess they start: DeepSpeed on the CPU, its ops here
ROOT = Path(__file__).resolve().parents[1]
# Wall-clock limits in the tests only catch hangs: far above what a loaded 2-core machine needs.
HANG_GUARD_S = 1200


def torchrun(nproc: int, module: str, *args: str, timeout: float = HANG_GUARD_S) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` under torchrun with ``nproc`` CPU processes (gloo)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", "-m", module, *args]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


@pytest.fixture
def run_torchrun():
    return torchrun


def synthetic_shards(out: Path, classes: int, test_classes: int, shard_mb: float) -> Path:
    """32-px synthetic products, 3 to 6 images each, in shards of about shard_mb."""
    from data_prep.cli import main as prep

    assert prep(["synthetic", "--classes", str(classes), "--test-classes", str(test_classes), "--per-class", "3:6",
                 "--size", "32", "--shard-mb", str(shard_mb), "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """48 training classes, 32 held out, several shards each."""
    return synthetic_shards(tmp_path_factory.mktemp("tiny_shards"), 48, 32, 0.03)


def tiny_overrides(shards: Path, output: Path, **extra) -> list[str]:
    """configs/cpu_synthetic.yaml shrunk to seconds: a few dozen steps on 28-px crops, no plots."""
    values = {
        "data.root": str(shards), "data.classes_per_batch": 8, "data.images_per_class": 3, "data.image_size": 28,
        "data.resize": 32, "data.workers": 1, "model.embedding_dim": 32, "train.output_dir": str(output),
        "train.steps": 60, "train.log_every": 10, "eval.every_steps": 0, "eval.at_start": True,
        "eval.recall_ks": "[1,2]", "checkpoint.every_steps": 20, "optimizer.warmup_steps": 0,
        "optimizer.lr": 0.003, "tracking.system_metrics": False, "eval.plots": False,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def cpu_env(**extra) -> dict:
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
            "PYTHONFAULTHANDLER": "1", "PYTHON": sys.executable, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", **extra}
