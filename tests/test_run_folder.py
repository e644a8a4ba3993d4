"""One training per output folder, and a run that ends is not run again (issue 17): the folder's lock, the
run that owns it, another run's checkpoint, mistakes about the folder, and restarts under the launcher."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_dml.train.checkpoints import CheckpointError, resume_target, verify
from dist_dml.cli import main as cli
from dist_dml.config import load_config
from dist_dml.train.run_folder import LOCK, FolderError, RunFolder, folder_problem

from .conftest import HANG_GUARD_S, ROOT, cpu_env, dist_dml_here, tiny_overrides

CONFIG = str(ROOT / "configs/cpu_synthetic.yaml")


def overrides(shards: Path, output: Path, **extra) -> list[str]:
    values = {"eval.at_start": False, "tracking.enabled": False, "checkpoint.every_steps": 4, **extra}
    return tiny_overrides(shards, output, **values)


def train(shards: Path, output: Path, *, launcher: list[str] = (), wait: bool = True, **extra):
    """A one-process training: in this process, or launched (under ``launcher``, or in the background)."""
    args = ["train", CONFIG, *overrides(shards, output, **extra)]
    if wait and not launcher:
        return dist_dml_here(*args)
    cmd = [sys.executable, *(launcher or ["-m", "dist_dml.cli"]), *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=HANG_GUARD_S)


def one_line(err: str) -> str:
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


# --- the lock ---------------------------------------------------------------------------------------

def hold_in_another_process(folder: Path) -> subprocess.Popen:
    """A process that holds ``folder`` (as a training's rank 0 would) until it is killed."""
    code = ("import sys, time; from dist_dml.train.run_folder import RunFolder; folder = RunFolder(sys.argv[1]); "
            "folder.acquire(); print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd=ROOT, env=cpu_env(), stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_folder_held_by_a_live_training_is_refused(tmp_path, tiny_shards, capsys):
    holder = hold_in_another_process(tmp_path / "run")
    try:
        with pytest.raises(FolderError, match=f"in use by another training .*pid {holder.pid}"):
            RunFolder(tmp_path / "run").acquire()
        assert f"pid {holder.pid}" in folder_problem(tmp_path / "run")
        # The launch scripts' check says so before torchrun starts any process.
        assert cli(["check", CONFIG, *overrides(tiny_shards, tmp_path / "run"), "--world-size", "2"]) == 2
        assert "in use by another training" in one_line(capsys.readouterr().err)
    finally:
        holder.kill()
        holder.wait()
    # The kernel let go of the killed holder's lock: the next training takes it over and says whose it was.
    assert folder_problem(tmp_path / "run") is None
    folder = RunFolder(tmp_path / "run")
    note = folder.acquire()
    assert note and f"pid {holder.pid}" in note and "is gone" in note
    assert json.loads((tmp_path / "run" / LOCK).read_text())["pid"] == os.getpid()
    folder.release()
    assert (tmp_path / "run" / LOCK).read_text() == ""  # released: nothing to take over next time
    assert RunFolder(tmp_path / "run").acquire() is None


def test_two_trainings_on_one_folder(tiny_shards, tmp_path):
    """The second refuses in one line while the first trains; the first's checkpoints are whole and its own.
    The first trains at optimizer.lr=1e4, where the embeddings collapse: it says so."""
    out = tmp_path / "run"
    first = train(tiny_shards, out, wait=False, **{"train.steps": 40, "optimizer.lr": 1e4})
    try:
        deadline = time.time() + HANG_GUARD_S
        while not ((out / LOCK).is_file() and (out / LOCK).read_text()) and time.time() < deadline:
            assert first.poll() is None, first.communicate()
            time.sleep(0.2)
        second = train(tiny_shards, out, **{"train.steps": 8})
        stdout, stderr = first.communicate(timeout=HANG_GUARD_S)
    finally:
        first.kill()
    assert second.returncode == 2, second.stderr
    assert f"in use by another training (host {os.uname().nodename}, pid {first.pid}" in one_line(second.stderr)
    assert "[train]" not in second.stdout
    assert first.returncode == 0, stderr[-3000:]
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    checkpoints = sorted((out / "checkpoints").glob("step*"))
    assert [p.name for p in checkpoints] == ["step00000036", "step00000040"]  # checkpoint.keep_last 2
    for checkpoint in checkpoints:
        assert verify(checkpoint) is None
        assert json.loads((checkpoint / "dist_dml.json").read_text())["run_id"] == run_id
    assert json.loads((out / "results.json").read_text())["steps"] == 40
    assert "warning: step 10: the embeddings have collapsed" in stderr and "optimizer.lr" in stderr


# --- the run that owns a folder -------------------------------------------------------------------

def fake_checkpoint(out: Path, step: int, run_id: str | None) -> Path:
    folder = out / "checkpoints" / f"step{step:08d}"
    folder.mkdir(parents=True)
    meta = {"step": step, "files": {}, **({"run_id": run_id} if run_id else {})}
    (folder / "dist_dml.json").write_text(json.dumps(meta))
    return folder


def test_a_resume_refuses_another_runs_checkpoint_unless_told(tiny_shards, tmp_path):
    out = tmp_path / "run"
    fake_checkpoint(out, 70, "aaaa")
    fake_checkpoint(out, 75, "aaaa")
    other = fake_checkpoint(out, 80, "bbbb")  # a second training wrote into the folder
    RunFolder(out).claim("aaaa")
    cfg = load_config(CONFIG, overrides(tiny_shards, out))
    with pytest.raises(CheckpointError, match="written by run bbbb, but .* belongs to run aaaa"):
        resume_target(cfg.checkpoint, cfg.train.output_dir)
    told = load_config(CONFIG, overrides(tiny_shards, out, **{"checkpoint.allow_other_run": True}))
    assert resume_target(told.checkpoint, told.train.output_dir) == other
    chosen = load_config(CONFIG, overrides(tiny_shards, out, **{"checkpoint.resume": str(out / "checkpoints/step00000075")}))
    assert resume_target(chosen.checkpoint, chosen.train.output_dir).name == "step00000075"
    shutil.rmtree(other)
    assert resume_target(cfg.checkpoint, cfg.train.output_dir).name == "step00000075"
    fake_checkpoint(out, 90, None)  # written before checkpoints named their run: taken as the folder's
    assert resume_target(cfg.checkpoint, cfg.train.output_dir).name == "step00000090"


# --- mistakes about the folder are one line ----------------------------------------------------------

@pytest.mark.parametrize("where", ["file", "unwritable"])
def test_an_output_dir_that_cannot_hold_a_run_is_one_line(tiny_shards, tmp_path, capsys, where):
    if where == "file":
        out = tmp_path / "run"
        out.write_text("not a folder")
        expected = "a file is there"
    else:
        out = Path("/proc/self/dist-dml-run")  # even root cannot make a folder there
        expected = "cannot be made"
    code = cli(["train", CONFIG, *overrides(tiny_shards, out)])
    assert code == 2
    assert expected in one_line(capsys.readouterr().err)
    if where == "file":
        assert out.read_text() == "not a folder"
        assert cli(["check", CONFIG, *overrides(tiny_shards, out), "--world-size", "1"]) == 2
        assert expected in one_line(capsys.readouterr().err)


def test_a_training_split_of_nul_shards_is_one_line(tiny_shards, tmp_path):
    shards = Path(shutil.copytree(tiny_shards, tmp_path / "shards"))
    for shard in shards.glob("train-*.tar"):
        shard.write_bytes(b"\0" * shard.stat().st_size)
    proc = train(shards, tmp_path / "run")
    assert proc.returncode == 2
    err = [line for line in proc.stderr.splitlines() if line.startswith("dist-dml")]
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "no record of the training split to draw from" in err[0] and "unreadable or corrupt" in err[0]


# --- restarts --------------------------------------------------------------------------------------

def test_a_designed_exit_is_not_restarted_and_a_finished_run_not_run_again(tiny_shards, tmp_path):
    """The final evaluation misses a corrupt test shard (exit 2 by design): under the launcher with
    --max_restarts 3 it is not restarted; launched again, the finished run trains and evaluates nothing."""
    shards = Path(shutil.copytree(tiny_shards, tmp_path / "shards"))
    victim = sorted(shards.glob("test-*.tar"))[0]
    victim.write_bytes(b"\0" * victim.stat().st_size)
    launcher = ["-m", "dist_dml.launch", "--nproc_per_node", "1", "--max_restarts", "3", "--monitor_interval", "0.5",
                "-m", "dist_dml.cli"]
    out = tmp_path / "run"
    first = train(shards, out, launcher=launcher, **{"train.steps": 8})
    assert first.returncode == 2, first.stderr[-3000:]
    assert "not restarting" in first.stderr and "Traceback" not in first.stderr, first.stderr[-3000:]
    assert first.stdout.count("[eval] step 8:") == 1 and first.stdout.count("[train] step 8/8") == 1
    assert "the final evaluation evaluated" in first.stderr
    saved = (out / "results.json").read_text()

    again = train(shards, out, launcher=launcher, **{"train.steps": 8})
    assert again.returncode == 2
    assert "finished at step 8 already" in again.stdout, again.stdout[-3000:]
    assert "[eval] step" not in again.stdout and "[train] step" not in again.stdout
    assert "the final evaluation evaluated" in again.stderr and "Traceback" not in again.stderr
    assert (out / "results.json").read_text() == saved


def test_the_launch_exits_2_when_a_rank_exited_2_and_the_agent_stopped_the_others():
    """A rank that exits 2 makes torchrun's agent stop the others with SIGTERM: the launch ended for the user's
    reason (2, not restarted), where it returned 1 because the stopped ranks' codes are not 2."""
    import signal

    from dist_dml.launch import exit_code

    assert exit_code([2, -signal.SIGTERM]) == 2 and exit_code([2, 2]) == 2
    assert exit_code([2, 1]) == 1 and exit_code([-signal.SIGKILL]) == 1 and exit_code([-signal.SIGTERM]) == 1


def test_a_fresh_run_never_overwrites_nor_prunes_an_earlier_runs_files(tiny_shards, tmp_path):
    """checkpoint.resume=none into a folder that holds a longer earlier run: refused in one line with nothing
    touched (it deleted the new run's checkpoints as soon as they were written, and `latest` named a deleted
    one); with train.move_aside=true the earlier run goes into OUTPUT/previous/RUN whole and the new run keeps its
    own checkpoints."""
    out = tmp_path / "run"
    base = tiny_overrides(tiny_shards, out, **{"eval.at_start": False, "tracking.enabled": False,
                                               "checkpoint.keep_last": 2})
    assert dist_dml_here("train", CONFIG, *base, "train.steps=30", "checkpoint.every_steps=10").returncode == 0
    earlier_run = json.loads((out / "run.json").read_text())["run_id"]
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    again = [*base, "train.steps=10", "checkpoint.every_steps=5", "checkpoint.resume=none"]
    refused = dist_dml_here("train", CONFIG, *again)
    assert refused.returncode == 2, refused.stderr[-3000:]
    lines = [line for line in refused.stderr.splitlines() if line.startswith("dist-dml train: error")]
    assert len(lines) == 1 and f"holds run {earlier_run}'s 2 checkpoints (the newest step00000030)" in lines[0]
    assert "train.move_aside=true" in lines[0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    assert json.loads((out / "results.json").read_text())["steps"] == 30
    check = dist_dml_here("check", CONFIG, *again, "--world-size", "1")  # the launch scripts' check says it first
    assert check.returncode == 2 and "holds run" in check.stderr

    moved = dist_dml_here("train", CONFIG, *again, "train.move_aside=true")
    assert moved.returncode == 0, moved.stderr[-3000:]
    previous = out / "previous" / earlier_run
    assert sorted(p.name for p in (previous / "checkpoints").iterdir()) == before
    assert json.loads((previous / "results.json").read_text())["steps"] == 30
    assert sorted(p.name for p in (out / "checkpoints").glob("step*")) == ["step00000005", "step00000010"]
    assert (out / "checkpoints" / "latest").read_text() == "step00000010"
    assert json.loads((out / "results.json").read_text())["steps"] == 10


def test_the_demo_never_overwrites_a_run(tmp_path, capsys):
    """dist-dml demo --output onto a folder that holds a run that is not a demo: refused, nothing replaced."""
    from dist_dml.cli import main as cli

    (tmp_path / "results.json").write_text('{"steps": 500}')
    (tmp_path / "config.yaml").write_text("train: {name: products}\n")
    assert cli(["demo", "--output", str(tmp_path)]) == 2
    assert "holds an earlier run's results.json, not a demo's" in capsys.readouterr().err
    assert (tmp_path / "results.json").read_text() == '{"steps": 500}' and not (tmp_path / "data").exists()


def an_earlier_run(folder: Path, run_id: str = "cafe") -> dict[str, str]:
    """A finished run's files in ``folder`` (RUN_FILES), each with distinct contents: {relative path: contents}."""
    files = {"checkpoints/step00000010/model.pt": "weights", "final_model.pt": "final", "results.json": '{"steps": 10}',
             "config.yaml": "train: {name: x}\n", "run.json": json.dumps({"run_id": run_id}), "plots/recall.png": "png"}
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return files


@pytest.mark.parametrize("killed_after", range(7))
def test_a_move_aside_cut_by_a_kill_is_completed_not_split_nor_overwritten(tmp_path, monkeypatch, killed_after):
    """train.move_aside killed after any of its renames: the folder still counts as holding an earlier run (a plain
    start is refused: it found 'no earlier run' after the 4th rename and wrote over run.json and plots), and the
    next move aside completes the cut one into a single previous/RUN (a second move split the run over two)."""
    from dist_dml.train import run_folder

    files = an_earlier_run(tmp_path)
    real, done = os.replace, []

    def replace_then_die(src, dst):
        if len(done) == killed_after:
            raise KeyboardInterrupt("killed")
        real(src, dst)
        done.append(dst)

    monkeypatch.setattr(run_folder.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_folder.move_aside(tmp_path)
    monkeypatch.setattr(run_folder.os, "replace", real)
    assert run_folder.earlier_run_problem(tmp_path, move_aside=False) is not None
    moved = run_folder.move_aside(tmp_path)
    assert moved == tmp_path / "previous" / "cafe"
    assert [p.name for p in (tmp_path / "previous").iterdir()] == ["cafe"]
    assert {str(p.relative_to(moved)): p.read_text() for p in moved.rglob("*") if p.is_file()} == files
    assert not any((tmp_path / name).exists() for name in run_folder.RUN_FILES)
    assert run_folder.earlier_run(tmp_path) is None


def test_a_move_aside_takes_a_free_name(tmp_path):
    """previous/RUN and previous/RUN-2 taken (two earlier moves of runs with one id): the next goes to RUN-3 (a
    FileExistsError traceback, before)."""
    from dist_dml.train.run_folder import move_aside

    (tmp_path / "previous" / "cafe").mkdir(parents=True)
    (tmp_path / "previous" / "cafe-2").mkdir()
    files = an_earlier_run(tmp_path)
    moved = move_aside(tmp_path)
    assert moved == tmp_path / "previous" / "cafe-3"
    assert {str(p.relative_to(moved)): p.read_text() for p in moved.rglob("*") if p.is_file()} == files
