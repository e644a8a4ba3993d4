"""The checkpoint manager in one process, as torchtitan tests its checkpointer: an engine that writes its
client state to a file, parts that count, and checkpoint folders damaged by hand. Which checkpoint a run
continues from, what it reports passing over, what it restores into each registered part, what it keeps."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from dist_dml.train.checkpoints import CheckpointError, CheckpointManager, verify
from dist_dml.config import load_config
from dist_dml.infra.distributed import DistContext

from .conftest import ROOT, tiny_overrides

CONFIG = str(ROOT / "configs/cpu_synthetic.yaml")


class FakeEngine:
    """DeepSpeed's part of a checkpoint: its client state in one file of the tag's folder."""

    def save(self, directory: Path, tag: str, client_state: dict) -> list:
        (Path(directory) / tag).mkdir(parents=True, exist_ok=True)
        torch.save(client_state, Path(directory) / tag / "mp_rank_00_model_states.pt")
        return []

    def load(self, directory: Path, tag: str) -> dict:
        return torch.load(Path(directory) / tag / "mp_rank_00_model_states.pt", weights_only=True)


class Counter:
    """A stateful part: a value and a tensor."""

    def __init__(self, value: int = 0):
        self.value = value

    def state_dict(self) -> dict:
        return {"value": self.value, "tensor": torch.full((3,), float(self.value))}

    def load_state_dict(self, state: dict) -> None:
        assert torch.equal(state["tensor"], torch.full((3,), float(state["value"])))
        self.value = state["value"]


def manager(shards: Path, out: Path, **extra) -> tuple[CheckpointManager, dict[str, Counter]]:
    cfg = load_config(CONFIG, tiny_overrides(shards, out, **{"checkpoint.keep_last": 3, **extra}))
    checkpoints = CheckpointManager(cfg.checkpoint, cfg.train.output_dir, DistContext(), cfg.to_dict())
    parts = {"data": Counter(), "meter": Counter()}
    for name, part in parts.items():
        checkpoints.register(name, part)
    return checkpoints, parts


@pytest.fixture
def saved(tiny_shards, tmp_path) -> Path:
    """A run folder with whole checkpoints at steps 4, 8 and 12 (each part's value: the step)."""
    out = tmp_path / "run"
    checkpoints, parts = manager(tiny_shards, out)
    for step in (4, 8, 12):
        for part in parts.values():
            part.value = step
        checkpoints.save(FakeEngine(), step, "run-a")
    return out


def names(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("step*"))


def restored(shards: Path, out: Path, capsys=None, **extra) -> tuple[int, dict[str, Counter], str]:
    checkpoints, parts = manager(shards, out, **extra)
    step = checkpoints.restore(FakeEngine())
    return step, parts, capsys.readouterr().out if capsys else ""


def test_saved_parts_come_back_and_old_checkpoints_go(saved, tiny_shards):
    assert names(saved) == ["step00000004", "step00000008", "step00000012"]
    step, parts, _ = restored(tiny_shards, saved)
    assert step == 12 and {n: p.value for n, p in parts.items()} == {"data": 12, "meter": 12}
    meta = json.loads((saved / "checkpoints" / "step00000012" / "dist_dml.json").read_text())
    assert meta["run_id"] == "run-a" and meta["data"] == {"value": 12} and meta["world_size"] == 1
    checkpoints, parts = manager(tiny_shards, saved)
    checkpoints.restore(FakeEngine())
    checkpoints.save(FakeEngine(), 16, "run-a")
    assert names(saved) == ["step00000008", "step00000012", "step00000016"]  # keep_last 3
    checkpoints.save(FakeEngine(), 16, "run-a")  # saved already: nothing new
    assert names(saved) == ["step00000008", "step00000012", "step00000016"]


def test_a_new_part_is_one_registration_and_starts_afresh_from_an_older_checkpoint(saved, tiny_shards):
    checkpoints, parts = manager(tiny_shards, saved)
    memory = Counter(-1)
    checkpoints.register("memory", memory)
    assert checkpoints.restore(FakeEngine()) == 12 and memory.value == -1  # the checkpoint had no memory
    memory.value = 99
    checkpoints.save(FakeEngine(), 16, "run-a")
    again, fresh = manager(tiny_shards, saved)[0], Counter()
    again.register("memory", fresh)
    assert again.restore(FakeEngine()) == 16 and fresh.value == 99


@pytest.mark.parametrize("pointer", ["step00000099", ""], ids=["stale", "empty"])
def test_stale_or_empty_latest_continues_from_the_newest_whole_checkpoint(saved, tiny_shards, pointer, capsys):
    (saved / "checkpoints" / "latest").write_text(pointer)
    step, parts, out = restored(tiny_shards, saved, capsys)
    assert step == 12 and parts["data"].value == 12
    assert "`latest` names" in out and "the newest whole checkpoint is step00000012" in out


def test_a_truncated_newest_checkpoint_is_reported_passed_over_and_pruned_later(saved, tiny_shards, capsys):
    states = saved / "checkpoints" / "step00000012" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])
    assert "mp_rank_00_model_states.pt has" in verify(states.parent)
    checkpoints, parts = manager(tiny_shards, saved)
    assert checkpoints.restore(FakeEngine()) == 8 and parts["meter"].value == 8
    out = capsys.readouterr().out
    assert "passing over" in out and "step00000012: mp_rank_00_model_states.pt has" in out
    checkpoints.save(FakeEngine(), 12, "run-a")
    checkpoints.save(FakeEngine(), 16, "run-a")
    # The damaged one is gone only now that newer whole ones exist; the 3 newest whole ones stay.
    assert names(saved) == ["step00000008", "step00000012", "step00000016"]
    assert all(verify(p) is None for p in (saved / "checkpoints").glob("step*"))


def test_a_checkpoint_file_replaced_by_python_objects_is_passed_over_not_unpickled(saved, tiny_shards, capsys):
    """The newest checkpoint's file replaced by a pickle of Python objects, its index's size made to match: the
    resume passes it over to the last checkpoint it can load, in one line (it died in DeepSpeed's load with an
    UnpicklingError traceback), and nothing of it is unpickled."""
    import argparse

    folder = saved / "checkpoints" / "step00000012"
    states = folder / "mp_rank_00_model_states.pt"
    torch.save({"step": 12, "parts": {}, "hook": argparse.Namespace(run="anything")}, states)
    index = json.loads((folder / "dist_dml.json").read_text())
    index["files"]["mp_rank_00_model_states.pt"] = states.stat().st_size
    (folder / "dist_dml.json").write_text(json.dumps(index))
    assert verify(folder) is None  # whole by its index
    step, parts, out = restored(tiny_shards, saved, capsys)
    assert step == 8 and parts["meter"].value == 8
    assert "passing over" in out and "mp_rank_00_model_states.pt holds Python objects (argparse.Namespace)" in out


def test_a_save_cut_short_leaves_the_previous_checkpoint(saved, tiny_shards, capsys):
    """A save cut short leaves a .partial folder (or a folder without its index, written last)."""
    checkpoints_dir = saved / "checkpoints"
    shutil.copytree(checkpoints_dir / "step00000012", checkpoints_dir / "step00000016.partial")
    shutil.copytree(checkpoints_dir / "step00000012", checkpoints_dir / "step00000020")
    (checkpoints_dir / "step00000020" / "dist_dml.json").unlink()
    checkpoints, _ = manager(tiny_shards, saved)
    assert checkpoints.restore(FakeEngine()) == 12
    assert "step00000020: no dist_dml.json index" in capsys.readouterr().out
    checkpoints.save(FakeEngine(), 16, "run-a")
    assert not list(checkpoints_dir.glob("*.partial"))
    assert (checkpoints_dir / "step00000020").is_dir()  # newer than any whole checkpoint: kept for the operator


def test_nothing_whole_is_refused_and_nothing_deleted(saved, tiny_shards):
    checkpoints_dir = saved / "checkpoints"
    for folder in checkpoints_dir.glob("step*"):
        (folder / "dist_dml.json").unlink()
    before = sorted(p.name for p in checkpoints_dir.iterdir())
    with pytest.raises(CheckpointError, match="none of the checkpoints .* checkpoint.resume=none starts afresh"):
        manager(tiny_shards, saved)
    assert sorted(p.name for p in checkpoints_dir.iterdir()) == before


def test_a_part_that_cannot_take_its_state_stops_the_resume_in_one_line(saved, tiny_shards):
    class Picky(Counter):
        def load_state_dict(self, state):
            raise ValueError("the saved data position covers 48 records, the split has 50")

    checkpoints, _ = manager(tiny_shards, saved)
    checkpoints.register("data", Picky())
    with pytest.raises(CheckpointError, match="cannot continue the data of .*step00000012: the saved data position"):
        checkpoints.restore(FakeEngine())


def test_the_rng_part_saves_and_restores_every_generator_that_exists(tmp_path, monkeypatch):
    """On a GPU, dropout and drop-path draw from each device's generator: the RNG part keeps the CPU's and every
    local device's. Here two devices are stood in for (the CPU machine has none), as torch.cuda exposes them."""
    from dist_dml.train.parts import RngState

    devices = [torch.arange(8, dtype=torch.uint8), torch.arange(8, 16, dtype=torch.uint8)]
    restored_devices = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [d.clone() for d in devices])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored_devices.extend(states))
    torch.manual_seed(3)
    torch.save(RngState().state_dict(), tmp_path / "rng.pt")
    expected = torch.rand(4)
    state = torch.load(tmp_path / "rng.pt", weights_only=True)  # as a checkpoint is read
    RngState().load_state_dict(state)
    assert torch.equal(torch.rand(4), expected)
    assert [d.tolist() for d in restored_devices] == [d.tolist() for d in devices]


def test_a_file_written_atomically_is_the_old_or_the_new_never_a_part(tmp_path):
    from dist_dml.infra.files import replacing, write_atomically

    target = write_atomically(tmp_path / "results.json", '{"old": 1}')
    with pytest.raises(RuntimeError, match="cut short"):
        with replacing(target) as tmp:
            tmp.write_text('{"ne')
            raise RuntimeError("cut short")
    assert target.read_text() == '{"old": 1}' and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    write_atomically(target, b'{"new": 2}')
    assert json.loads(target.read_text()) == {"new": 2}


def test_pruning_removes_only_this_runs_checkpoints(saved, tiny_shards):
    """Run a's checkpoints at steps 4, 8 and 12 stay whatever run b saves into the same folder: pruning ranked
    every checkpoint by step and deleted b's new ones as soon as they were written (a longer earlier run's looked
    newer). b keeps its own 3 newest."""
    checkpoints, _ = manager(tiny_shards, saved, **{"checkpoint.resume": "none"})
    for step in (1, 2, 3, 5):
        checkpoints.save(FakeEngine(), step, "run-b")
    assert names(saved) == ["step00000002", "step00000003", "step00000004", "step00000005", "step00000008",
                            "step00000012"]
