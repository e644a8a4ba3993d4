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


def copy_to_damage(source: Path, tmp_path: Path) -> Path:
    """A copy of ``source`` in this test's folder, to damage."""
    return Path(shutil.copytree(source, tmp_path / source.name))


@pytest.fixture
def run(twelve_steps, tmp_path) -> Path:
    return copy_to_damage(twelve_steps, tmp_path)


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


# --- shards and sources a user or an adversary hands us ------------------------------------------

def train_errors(root: Path) -> dict:
    """The read-error counts of one training epoch over ``root`` (2 workers' worth, in this process)."""
    from dist_dml.data import DataConfig, TrainStream

    cfg = DataConfig(root=str(root), classes_per_batch=4, images_per_class=2, workers=2, image_size=16, resize=20)
    stream, totals = TrainStream(cfg, decode_images=False), {}
    for worker in range(2):
        for batch in stream.worker_batches(0, worker):
            for key, value in batch["errors"].items():
                totals[key] = totals.get(key, 0) + value
    return totals


@pytest.fixture
def shards_copy(tiny_shards, tmp_path) -> Path:
    return copy_to_damage(tiny_shards, tmp_path)


def test_a_nul_shard_is_counted_corrupt_not_read_as_empty(shards_copy):
    victim = sorted(shards_copy.glob("train-*.tar"))[0]
    victim.write_bytes(b"\0" * victim.stat().st_size)
    assert train_errors(shards_copy)["corrupt_shards"] == 1
    from dist_dml.data import ReadErrors, read_records

    errors = ReadErrors()
    assert list(read_records([str(victim)], errors)) == [] and errors.corrupt_shards == {str(victim)}


def test_a_member_declaring_a_huge_size_is_damage_not_a_memory_error(shards_copy):
    """A pax header may declare any size (here 10^15 bytes); the reader would try to read it into memory."""
    import io
    import tarfile

    victim = sorted(shards_copy.glob("train-*.tar"))[0]
    with tarfile.open(victim) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(victim, "w", format=tarfile.PAX_FORMAT) as tar:
        for i, (member, data) in enumerate(members):
            if i == len(members) - 1:
                member.pax_headers = {"size": str(10**15)}
            tar.addfile(member, io.BytesIO(data))
    from dist_dml.data import ReadErrors, read_records

    errors = ReadErrors()
    records = list(read_records([str(victim)], errors))
    assert errors.corrupt_shards == {str(victim)} and len(records) >= 1  # the records before it are kept
    assert train_errors(shards_copy)["corrupt_shards"] == 1


def write_csv(folder: Path, rows: list[tuple[str, str, str]]) -> Path:
    from PIL import Image

    lines = ["path,label,split"]
    for i, (label, split, _) in enumerate(rows):
        Image.new("RGB", (8, 8), (i * 40 % 255, 0, 0)).save(folder / f"im{i}.jpg")
        lines.append(f"im{i}.jpg,{label},{split}")
    (folder / "list.csv").write_text("\n".join(lines))
    return folder / "list.csv"


def test_prep_refuses_a_split_that_is_not_a_plain_name(tmp_path, capsys):
    from data_prep.cli import main as prep

    csv = write_csv(tmp_path, [("a", "train", ""), ("a", "train", ""), ("b", "/../../escaped", "")])
    assert prep(["csv", "--src", str(csv), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "split '/../../escaped' is not a plain name" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_prep_refuses_a_training_split_with_nothing_to_train_on(tmp_path, capsys):
    from data_prep.cli import main as prep

    code = prep(["synthetic", "--classes", "5", "--test-classes", "2", "--per-class", "1", "--size", "8",
                 "--out", str(tmp_path / "out"), "--no-progress"])
    assert code == 2
    assert "split 'train' has no class with 2 or more images" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
