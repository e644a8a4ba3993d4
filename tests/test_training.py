"""End to end on the CPU under the launchers: a rank killed mid-run, two local "nodes", a real one-node SLURM
cluster, ZeRO-1 in fp32 and bf16, non-finite losses. The shared trained run and what it leaves (learning,
checkpoints, MLflow, the registered model) are tests/test_trained_run.py."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from .conftest import HANG_GUARD_S, ROOT, cpu_env, dist_dml_here, free_port, tiny_overrides

CONFIG = str(ROOT / "configs/cpu_synthetic.yaml")


def torchrun_train(nproc, overrides, env, max_restarts=0, timeout=HANG_GUARD_S):
    """Under torchrun as the launch scripts run it (dist_dml.launch: restarts on a crash, not on exit 2)."""
    cmd = [sys.executable, "-m", "dist_dml.launch", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           f"--max_restarts={max_restarts}", "-m", "dist_dml.cli", "train", CONFIG, *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc, timeout=HANG_GUARD_S) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout}s:\n{out[-6000:]}")
    assert proc.returncode == 0, out[-6000:]
    return out


def logged_losses(output: str) -> list[float]:
    return [float(x) for x in re.findall(r"\[train\] step \d+/\d+ loss=([0-9.]+)", output)]


def test_killed_rank_resumes_from_last_checkpoint(tiny_shards, tmp_path):
    out = tmp_path / "run"
    overrides = tiny_overrides(tiny_shards, out, **{"train.steps": 40, "checkpoint.every_steps": 10,
                                                    "eval.at_start": False, "tracking.enabled": False})
    proc = torchrun_train(2, overrides, cpu_env(), max_restarts=1)
    killed = {}

    def kill_rank_one_after_first_checkpoint():
        deadline = time.time() + HANG_GUARD_S
        while time.time() < deadline and proc.poll() is None:
            latest = out / "checkpoints" / "latest"
            if latest.exists() and latest.read_text() >= "step00000010":
                # The agent's own children are the ranks (their DataLoader workers share RANK).
                for child in psutil.Process(proc.pid).children(recursive=False):
                    try:
                        if child.environ().get("RANK") == "1":
                            killed["step"] = latest.read_text()
                            child.send_signal(signal.SIGKILL)
                            return
                    except psutil.Error:
                        continue
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_rank_one_after_first_checkpoint)
    watcher.start()
    log = finish(proc)
    watcher.join()
    assert killed, "rank 1 was never killed"
    assert re.search(r"resumed from .*step000000[1-3]0 at step [1-3]0", log), log[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 40
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text() == "step00000040"
    assert not list(ckpt.glob("*.partial"))
    # The sampled-negative histogram spans the whole run across the resume: one draw per (anchor,
    # positive) pair, 2 ranks x 8 classes x 3 images, 2 positives each, every step from step 1.
    state = checkpoint_client_state(ckpt / "step00000040")["parts"]["meter"]
    assert state["histogram_from"] == 1
    assert float(state["negative_histogram"].sum()) == 40 * (2 * 8 * 3) * 2


def checkpoint_client_state(folder: Path) -> dict:
    import torch

    from dist_dml.train.engine import WeightsOnlyCheckpointEngine

    with torch.serialization.safe_globals(WeightsOnlyCheckpointEngine.SAFE_GLOBALS):
        return torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)


def test_two_local_nodes(tiny_shards, tmp_path):
    out = tmp_path / "run"
    overrides = tiny_overrides(tiny_shards, out, **{"train.steps": 10, "eval.at_start": False,
                                                    "tracking.enabled": False, "checkpoint.every_steps": 0})
    proc = subprocess.run(["bash", str(ROOT / "launch/multinode_local.sh"), "train", CONFIG, *overrides],
                          cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 10


def slurm_cluster_up() -> bool:
    if not shutil.which("sbatch"):
        return False
    probe = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return probe.returncode == 0 and any(s in probe.stdout for s in ("idle", "mixed"))


@pytest.mark.skipif(not slurm_cluster_up() and not os.environ.get("DIST_DML_REQUIRE_SLURM"),
                    reason="no SLURM cluster here (CI starts one: tests/slurm/start_cluster.sh)")
def test_sbatch_runs_to_completion(tiny_shards, tmp_path):
    out = tmp_path / "run"
    overrides = tiny_overrides(tiny_shards, out, **{"train.steps": 10, "eval.at_start": False,
                                                    "tracking.enabled": False, "checkpoint.every_steps": 0})
    # As the guide writes it: ./dml launch slurm puts sbatch's options before the script, the command after it.
    env = cpu_env(NPROC_PER_NODE="2", DIST_DML_VENV=sys.prefix)
    proc = subprocess.run([str(ROOT / "dml"), "launch", "slurm", "--wait", f"--output={tmp_path}/slurm-%j.out",
                           "--cpus-per-task=2", "train", CONFIG, *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    logs = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert proc.returncode == 0, (proc.stdout + proc.stderr + logs)[-6000:]
    assert json.loads((out / "results.json").read_text())["steps"] == 10
    assert "2 processes" in logs or "x 2 processes" in logs


def test_non_finite_losses_are_skipped_then_stop_the_run(tiny_shards, tmp_path):
    """An absurd learning rate blows the weights up after one step: every later loss is NaN."""
    out = tmp_path / "run"
    overrides = tiny_overrides(tiny_shards, out, **{"optimizer.lr": 1e30, "optimizer.beta_lr": 1e30,
                                                    "train.max_bad_steps": 3, "eval.at_start": False,
                                                    "tracking.enabled": False, "checkpoint.every_steps": 0})
    proc = dist_dml_here("train", CONFIG, *overrides)
    # A designed stop is the user's to fix: one line and exit 2 (which the launcher does not restart), no traceback.
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("dist-dml train: error")]
    assert len(lines) == 1 and "3 non-finite losses in a row at step" in lines[0] and "optimizer.lr" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (out / "final_model.pt").exists()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_zero1_runs_complete_and_resume(tiny_shards, tmp_path, precision):
    """The CPU config under ZeRO-1, in fp32 and bf16: 6 steps with checkpoints, then resumed to 10."""
    out = tmp_path / "run"
    overrides = tiny_overrides(tiny_shards, out, **{"train.steps": 6, "checkpoint.every_steps": 3, "train.log_every": 2,
                                                    "eval.at_start": False, "tracking.enabled": False,
                                                    "deepspeed.zero_stage": 1, "deepspeed.precision": precision})
    finish(torchrun_train(2, overrides, cpu_env()))
    assert json.loads((out / "results.json").read_text())["steps"] == 6
    log = finish(torchrun_train(2, overrides + ["train.steps=10"], cpu_env()))
    assert re.search(r"resumed from .*step00000006 at step 6", log), log[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 10 and results["skipped_steps"] == 0
    assert all(0 < loss < 2 for loss in logged_losses(log)), log[-3000:]


def test_ranks_die_with_their_launcher(tiny_shards, tmp_path):
    """kill -9 of the launcher (python -m dist_dml.launch) mid-run: its ranks and their DataLoader workers stop
    within seconds, and the output folder's lock is free for a scheduler's restart (they trained on to the end,
    holding it)."""
    from dist_dml.train.run_folder import RunFolder

    out = tmp_path / "run"
    overrides = tiny_overrides(tiny_shards, out, **{"train.steps": 100000, "checkpoint.every_steps": 0,
                                                    "eval.at_start": False, "tracking.enabled": False})
    proc = torchrun_train(2, overrides, cpu_env())
    try:
        deadline = time.time() + HANG_GUARD_S
        while RunFolder(out).holder() is None and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)  # until rank 0 holds the folder: the ranks are training
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        family = psutil.Process(proc.pid).children(recursive=True)
        assert len([p for p in family if p.ppid() == proc.pid]) == 2
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        gone, alive = psutil.wait_procs(family, timeout=60)
        assert not alive, [p.cmdline()[-3:] for p in alive]
        assert RunFolder(out).holder() is None  # free for the next training
    finally:
        for p in psutil.Process().children(recursive=True):
            if p.pid != os.getpid():
                try:
                    p.kill()
                except psutil.Error:
                    pass
