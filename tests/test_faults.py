"""Faults an operator meets (issue 11), the checkpoint part: a stale or empty `latest`, a truncated newest
checkpoint, a save killed half-way, nothing whole at all. A run resumes from the newest whole checkpoint
and says which; it never starts afresh over checkpoints without saying so, and never deletes one unless
newer whole ones exist."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dist_dml.checkpoint import verify

from .conftest import HANG_GUARD_S, ROOT, cpu_env, tiny_overrides

CONFIG = str(ROOT / "configs/cpu_synthetic.yaml")


def train(output: Path, shards: Path, steps: int) -> subprocess.CompletedProcess:
    """One process (ZeRO-2, as the CPU config), checkpoints every 4 steps, the last 3 kept."""
    overrides = tiny_overrides(shards, output, **{"train.steps": steps, "checkpoint.every_steps": 4,
                                                  "checkpoint.keep_last": 3, "eval.at_start": False,
                                                  "tracking.enabled": False, "train.log_every": 4})
    return subprocess.run([sys.executable, "-m", "dist_dml.cli", "train", CONFIG, *overrides], cwd=ROOT,
                          env=cpu_env(), capture_output=True, text=True, timeout=HANG_GUARD_S)


@pytest.fixture(scope="module")
def twelve_steps(tiny_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "run"
    proc = train(out, tiny_shards, 12)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(p.name for p in (out / "checkpoints").glob("step*")) == \
        ["step00000004", "step00000008", "step00000012"]
    return out


@pytest.fixture
def run(twelve_steps, tmp_path) -> Path:
    """A copy of the 12-step run to damage."""
    copy = tmp_path / "run"
    shutil.copytree(twelve_steps, copy)
    return copy


def resumed_step(log: str) -> int:
    match = re.search(r"resumed from \S+step(\d{8}) at step (\d+)", log)
    assert match, log[-3000:]
    return int(match.group(2))


@pytest.mark.parametrize("pointer", ["step00000099", ""], ids=["stale", "empty"])
def test_stale_or_empty_latest_resumes_from_the_newest_whole_checkpoint(run, tiny_shards, pointer):
    (run / "checkpoints" / "latest").write_text(pointer)
    proc = train(run, tiny_shards, 16)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert resumed_step(proc.stdout) == 12
    assert "`latest` names" in proc.stdout and "the newest whole checkpoint is step00000012" in proc.stdout
    assert json.loads((run / "results.json").read_text())["steps"] == 16


def test_truncated_newest_checkpoint_is_reported_and_passed_over(run, tiny_shards):
    states = run / "checkpoints" / "step00000012" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])
    assert "mp_rank_00_model_states.pt has" in verify(states.parent)
    proc = train(run, tiny_shards, 16)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "passing over" in proc.stdout and "step00000012: mp_rank_00_model_states.pt has" in proc.stdout
    assert resumed_step(proc.stdout) == 8
    # The damaged one is gone only now that newer whole ones exist; the 3 newest whole ones stay.
    assert sorted(p.name for p in (run / "checkpoints").glob("step*")) == \
        ["step00000008", "step00000012", "step00000016"]
    assert all(verify(p) is None for p in (run / "checkpoints").glob("step*"))


def test_save_killed_half_way_leaves_the_previous_checkpoint(run, tiny_shards):
    """A save cut short leaves a .partial folder (or a folder without its index, written last)."""
    checkpoints = run / "checkpoints"
    shutil.copytree(checkpoints / "step00000012", checkpoints / "step00000016.partial")
    shutil.copytree(checkpoints / "step00000012", checkpoints / "step00000020")
    (checkpoints / "step00000020" / "dist_dml.json").unlink()
    proc = train(run, tiny_shards, 16)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert resumed_step(proc.stdout) == 12
    assert "step00000020: no dist_dml.json index" in proc.stdout
    assert not list(checkpoints.glob("*.partial"))
    assert (checkpoints / "step00000020").is_dir()  # newer than any whole checkpoint: kept for the operator


def test_nothing_whole_is_refused_and_nothing_deleted(run, tiny_shards):
    checkpoints = run / "checkpoints"
    for folder in checkpoints.glob("step*"):
        (folder / "dist_dml.json").unlink()
    before = sorted(p.name for p in checkpoints.iterdir())
    proc = train(run, tiny_shards, 16)
    assert proc.returncode == 2
    assert "none of the checkpoints" in proc.stderr and "checkpoint.resume=none starts afresh" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert sorted(p.name for p in checkpoints.iterdir()) == before


def test_eval_of_a_truncated_checkpoint_is_one_line(run, capsys):
    from dist_dml.cli import main as cli

    states = run / "checkpoints" / "step00000012" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:1000])
    assert cli(["eval", str(states.parent)]) == 2
    err = capsys.readouterr().err
    assert "not a whole checkpoint folder" in err and len(err.strip().splitlines()) == 1
