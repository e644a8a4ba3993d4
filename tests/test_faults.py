"""Faults an operator meets (issue 11): damaged checkpoints and shards, a dead tracking server, a full disk,
mistakes on the command line, a resume at another world size. Which checkpoint a run continues from (a
stale `latest`, a truncated newest, a save cut short, nothing whole) is tested in one process in
tests/test_checkpoint_manager.py."""
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from dist_dml.train.checkpoints import verify

from .conftest import ROOT, Ran, dist_dml_here, tiny_overrides

CONFIG = str(ROOT / "configs/cpu_synthetic.yaml")


def train(output: Path, shards: Path, steps: int) -> Ran:
    """One process (ZeRO-2, as the CPU config), checkpoints every 4 steps, the last 3 kept."""
    overrides = tiny_overrides(shards, output, **{"train.steps": steps, "checkpoint.every_steps": 4,
                                                  "checkpoint.keep_last": 3, "eval.at_start": False,
                                                  "tracking.enabled": False, "train.log_every": 4})
    return dist_dml_here("train", CONFIG, *overrides)


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
    from dist_dml.data import FaultCounter, read_records

    errors = FaultCounter()
    assert list(read_records([str(victim)], faults=errors)) == [] and errors.corrupt_shards == {str(victim)}


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
    from dist_dml.data import FaultCounter, read_records

    errors = FaultCounter()
    records = list(read_records([str(victim)], faults=errors))
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


# --- images and labels that cannot be used, in training and in evaluation -----------------------

def rewrite_members(shard: Path, change) -> None:
    """Rewrite a shard with each member's bytes passed through ``change(name, data)``."""
    import io
    import tarfile

    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            data = change(member.name, data)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))


def first_records(shard: Path, n: int) -> list[dict]:
    from dist_dml.data import FaultCounter, read_records

    return list(read_records([str(shard)]))[:n]


def damage(shards: Path, split: str) -> dict:
    """In the first shard of ``split``: every image but the first of record 0 made undecodable (it keeps one:
    dropped), one image of record 1 made undecodable (kept with its others), record 2's label put out of
    range. Returns their image ids and labels."""
    shard = sorted(shards.glob(f"{split}-*.tar"))[0]
    r0, r1, r2 = first_records(shard, 3)
    assert len(r1["image_ids"]) >= 3
    import tarfile

    with tarfile.open(shard) as tar:
        names = [m.name for m in tar.getmembers()]
    record_keys = list(dict.fromkeys(n.split(".", 1)[0] for n in names))[:3]
    keys = dict(zip(("dropped", "kept", "relabelled"), record_keys))

    def change(name: str, data: bytes) -> bytes:
        key, _, rest = name.partition(".")
        if key == keys["dropped"] and rest != "json" and not rest.startswith("0."):
            return b"this is not a jpeg"
        if key == keys["kept"] and rest.startswith("1."):
            return b""
        if key == keys["relabelled"] and rest == "json":
            meta = json.loads(data)
            return json.dumps({**meta, "label": 10**6}).encode()
        return data

    rewrite_members(shard, change)
    return {"dropped": r0, "kept": r1, "bad_image": r1["image_ids"][1], "relabelled": r2}


def test_undecodable_images_and_bad_labels_in_training_are_skipped_and_counted(shards_copy):
    from dist_dml.data import DataConfig, TrainStream

    hit = damage(shards_copy, "train")
    cfg = DataConfig(root=str(shards_copy), classes_per_batch=4, images_per_class=2, workers=2, image_size=16,
                     resize=20)
    stream, totals, labels, ids = TrainStream(cfg), {}, set(), set()
    for worker in range(2):
        for batch in stream.worker_batches(0, worker):
            assert batch["images"].shape[0] == len(batch["labels"]) == cfg.local_batch  # the batch keeps its size
            labels |= set(batch["labels"].tolist())
            ids |= set(batch["image_ids"].tolist())
            for key, value in batch["errors"].items():
                totals[key] = totals.get(key, 0) + value
    assert totals["dropped_records"] == 1 and totals["bad_labels"] == 1 and totals["bad_images"] >= 1
    assert hit["dropped"]["label"] not in labels  # one decodable image left: the record is dropped
    assert hit["kept"]["label"] in labels and hit["bad_image"] not in ids  # kept, without its bad image
    assert not set(hit["relabelled"]["image_ids"]) & ids  # a label out of range: the record is skipped
    assert totals["corrupt_shards"] == 0


def test_a_training_run_over_damaged_data_finishes_counts_and_fails_its_incomplete_evaluation(shards_copy, tmp_path):
    """Bad images and labels in the training and the test split: the run trains to the end, counts them in its
    log line and results.json, evaluates what it can read, writes everything, and exits 2 because the
    evaluation missed images (eval.max_missing_share defaults to 0); `dist-dml eval` says the same."""
    damage(shards_copy, "train")
    test_hit = damage(shards_copy, "test")
    out = tmp_path / "run"
    overrides = tiny_overrides(shards_copy, out, **{"train.steps": 8, "eval.at_start": False, "train.log_every": 4,
                                                    "tracking.enabled": False, "checkpoint.every_steps": 0})
    proc = dist_dml_here("train", CONFIG, *overrides)
    assert proc.returncode == 2, proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert (out / "final_model.pt").is_file() and results["steps"] == 8
    faults = results["data_faults"]
    assert faults["dropped_records"] >= 1 and faults["bad_labels"] >= 1 and faults["bad_images"] >= 1, faults
    assert "data faults met in training: " in proc.stdout and "dropped_records=" in proc.stdout
    trained = results["trained"]
    expected = json.loads((shards_copy / "manifest.json").read_text())["splits"]["test"]["images"]
    lost = (len(test_hit["dropped"]["image_ids"]) - 1) + 1 + len(test_hit["relabelled"]["image_ids"])
    assert trained["images_expected"] == expected and trained["images_evaluated"] == expected - lost
    assert trained["bad_labels"] == 1 and trained["bad_images"] == lost - len(test_hit["relabelled"]["image_ids"])
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("dist-dml train: error: the final evaluation evaluated") and "max_missing_share" in last

    from dist_dml.cli import main as cli

    allowed = cli(["eval", str(out / "final_model.pt"), f"eval.max_missing_share={lost / expected + 0.01}"])
    assert allowed == 0
    assert cli(["eval", str(out / "final_model.pt")]) == 2


# --- tracking: a server that does not answer, a resume with other overrides ---------------------

def test_a_server_that_never_answers_is_found_in_bounded_time():
    """A port that accepts connections and never replies (a hung server, a firewall): the start-up check
    gives up after 2 tries of tracking.timeout_s, well inside 30 s (it took MLflow 265 s to fail)."""
    import socket
    import time

    from dist_dml.train.tracking import unreachable

    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(8)
        uri = f"http://127.0.0.1:{hole.getsockname()[1]}"
        start = time.time()
        problem = unreachable(uri, timeout_s=3)
        elapsed = time.time() - start
    assert problem and "timed out" in problem
    assert elapsed < 30


def dead_uri() -> str:
    from dist_dml.infra.distributed import free_port

    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


def test_a_dead_tracking_server_stops_the_run_at_start_in_one_line(tiny_shards, tmp_path):
    uri = dead_uri()
    overrides = tiny_overrides(tiny_shards, tmp_path / "run", **{"train.steps": 4, "eval.at_start": False})
    proc = dist_dml_here("train", CONFIG, *overrides, env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("dist-dml")]
    assert len(lines) == 1 and uri in lines[0] and "tracking.required=false" in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "checkpoints").exists()
    check = dist_dml_here("check", CONFIG, *overrides, "--world-size", "2", env={"MLFLOW_TRACKING_URI": uri})
    assert check.returncode == 2 and uri in check.stderr  # what the launch scripts run before torchrun


def test_tracking_not_required_trains_without_the_server(tiny_shards, tmp_path):
    overrides = tiny_overrides(tiny_shards, tmp_path / "run", **{"train.steps": 4, "eval.at_start": False,
                                                                 "tracking.required": False})
    proc = dist_dml_here("train", CONFIG, *overrides, env={"MLFLOW_TRACKING_URI": dead_uri()})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training without tracking" in proc.stderr
    assert json.loads((tmp_path / "run" / "results.json").read_text())["steps"] == 4


def test_a_tracking_failure_during_training_warns_and_never_raises(tmp_path, capsys):
    from dist_dml.config import TrackingConfig
    from dist_dml.infra.distributed import DistContext
    from dist_dml.train.tracking import build_tracker

    config = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="faults", system_metrics=False)
    tracker = build_tracker(config, DistContext())
    tracker.log_metrics({"loss": 1.0}, 1)

    def broken(*args, **kwargs):
        raise ConnectionError("the server went away")

    real = tracker.mlflow.log_metrics
    tracker.mlflow.log_metrics = broken
    try:
        tracker.log_metrics({"loss": 0.5}, 2)  # warns
        tracker.log_metrics({"loss": 0.4}, 3)  # paused: not even tried
        tracker.close()
    finally:
        tracker.mlflow.log_metrics = real
        tracker.mlflow.set_tracking_uri(None)  # MLflow exported it to os.environ, for every later subprocess
    err = capsys.readouterr().err
    assert err.count("the server went away") == 1 and "training goes on" in err
    # Ending the run is tried while logging rests: the run is not left running, in MLflow or in this process.
    from mlflow.tracking import MlflowClient

    assert tracker.mlflow.active_run() is None
    assert MlflowClient(tracking_uri=config.uri).get_run(tracker.run_id).info.status == "FINISHED"


def test_tracking_timeout_s_is_what_mlflow_waits_whatever_the_environment_held(tmp_path, monkeypatch, capsys):
    """MLflow reads its request timeout from MLFLOW_HTTP_REQUEST_TIMEOUT only: a value an earlier run, a grid's
    parent or the shell left there must not win over the config's (it did: setdefault kept 300 s)."""
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_TIMEOUT

    from dist_dml.config import TrackingConfig
    from dist_dml.infra.distributed import DistContext
    from dist_dml.train.tracking import build_tracker

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "300")
    config = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="timeout", system_metrics=False,
                            timeout_s=2.5)
    tracker = build_tracker(config, DistContext())
    try:
        assert MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 3  # whole seconds, rounded up: 2.5 s never becomes "no limit"
    finally:
        tracker.close()
        tracker.mlflow.set_tracking_uri(None)
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT=300 in the environment is replaced" in capsys.readouterr().err


def test_a_resume_with_changed_overrides_keeps_its_mlflow_run_and_records_the_change(tiny_shards, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"

    def run(steps: int, *extra: str) -> Ran:
        overrides = tiny_overrides(tiny_shards, tmp_path / "run", **{"train.steps": steps, "eval.at_start": False,
                                                                     "checkpoint.every_steps": 4})
        return dist_dml_here("train", CONFIG, *overrides, *extra, env={"MLFLOW_TRACKING_URI": uri})

    first = run(4)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run(8, "optimizer.lr=0.001", "train.log_every=2")
    assert second.returncode == 0, second.stderr[-3000:]
    assert resumed_step(second.stdout) == 4 and "optimizer.lr: 0.003 -> 0.001" in second.stdout
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("cpu_synthetic").experiment_id])
    assert len(runs) == 1  # the resume continued the run
    data = runs[0].data
    assert data.params["optimizer.lr"] == "0.003"  # params stay those of the fresh run
    assert "optimizer.lr: 0.003 -> 0.001" in data.tags["resumed_at_step_4"]
    assert "train.log_every" in data.tags["resumed_at_step_4"]
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")][-1] == 8


# --- a user's mistakes on the command line: one line, exit 2 ------------------------------------

@pytest.fixture(scope="module")
def exported(twelve_steps, tiny_shards, tmp_path_factory):
    """An index of the twelve-step model's test embeddings, and files that are not images."""
    from dist_dml.cli import main as cli

    folder = tmp_path_factory.mktemp("exported")
    model = twelve_steps / "final_model.pt"
    assert cli(["embed", str(model), "--out", str(folder / "emb")]) == 0
    assert cli(["index", str(folder / "emb"), "--out", str(folder / "index")]) == 0
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("hello")
    (folder / "junk.pt").write_text("junk")
    return folder


def mistakes(model: Path, folder: Path, config: str) -> dict[str, tuple[list[str], str]]:
    """name: (argv, what the line must say)."""
    bad_index, bad_meta, bad_manifest = folder / "bad_index", folder / "bad_meta", folder / "bad_manifest"
    if not bad_index.exists():
        shutil.copytree(folder / "index", bad_index)
        version = json.loads((bad_index / "meta.json").read_text())["version"]
        (bad_index / version / "index.faiss").write_bytes(b"garbage")
        shutil.copytree(folder / "index", bad_meta)
        (bad_meta / "meta.json").write_text("{")
        bad_manifest.mkdir()
        (bad_manifest / "manifest.json").write_text(json.dumps({"format": "dist-dml/class-shards", "version": 1,
                                                                "splits": {"train": {"shards": [{"nam": "x"}]}}}))
    index = str(folder / "index")
    return {
        "yaml": (["check", config, "data.classes_per_batch=[1,", "--world-size", "1"], "is not valid YAML"),
        "manifest": (["check", config, f"data.root={bad_manifest}", "--world-size", "1"], "splits.train.classes"),
        "not an image": (["search", index, str(folder / "text.jpg")], "text.jpg: not a readable image"),
        "empty image": (["search", index, str(folder / "empty.jpg")], "empty.jpg: not a readable image"),
        "missing image": (["search", index, str(folder / "nosuch.jpg")], "no such image file"),
        "k 0": (["search", index, str(folder / "text.jpg"), "--k", "0"], "--k 0"),
        "corrupt index": (["search", str(bad_index), str(folder / "text.jpg")], "the index is damaged"),
        "corrupt meta": (["search", str(bad_meta), str(folder / "text.jpg")], "meta.json: damaged"),
        "no such split": (["embed", str(model), "--split", "nosuch", "--out", str(folder / "x")], "no split 'nosuch'"),
        "other dim": (["eval", str(model), "model.embedding_dim=64"], "head.weight is (32, 128) there, (64, 128) here"),
        "other backbone": (["eval", str(model), "model.backbone=resnet18"], "holds another model"),
        "not a checkpoint": (["eval", str(folder / "junk.pt")], "junk.pt: not a readable checkpoint"),
        "missing resume": (["check", config, "checkpoint.resume=/nonexistent", "--world-size", "1"],
                           "checkpoint.resume=/nonexistent is not a whole checkpoint"),
        # Outputs that cannot be written, found before the work (issue 28, item 9), and arguments out of range.
        "onnx onto a folder": (["export", str(model), "--onnx", str(folder)], f"--onnx: {folder} is a folder"),
        "onnx under a file": (["export", str(model), "--onnx", str(folder / "text.jpg" / "m.onnx")],
                              "text.jpg, a file, not a folder"),
        "eval --out folder": (["eval", str(model), "--out", str(folder)], f"--out: {folder} is a folder, not a file"),
        "eval --plots file": (["eval", str(model), "--plots", str(folder / "text.jpg")], "is a file, not a folder"),
        "opset 1": (["export", str(model), "--onnx", str(folder / "m.onnx"), "--opset", "1"],
                    "--opset 1: torch's ONNX exporter writes opset 18 or later"),
        "nlist -3": (["index", str(folder / "emb"), "--out", str(folder / "ix"), "--type", "ivfpq", "--nlist",
                      "-3"], "--nlist must be >= 0"),
        "reference onto a folder": (["config", "--reference", "--out", str(folder)], f"--out: {folder} is a folder"),
        "reference under a file": (["config", "--reference", "--out", str(folder / "text.jpg" / "c.md")],
                                   "text.jpg, a file, not a folder"),
        "reference of a config": (["config", config, "--reference"], "--reference prints every key"),
        "config of nothing": (["config"], "give a config file to resolve"),
        "demo nproc 0": (["demo", "--nproc", "0", "--output", str(folder / "demo")], "--nproc must be >= 1"),
        "demo nproc -1": (["demo", "--nproc", "-1", "--output", str(folder / "demo")], "--nproc must be >= 1"),
        "demo onto a file": (["demo", "--output", str(folder / "text.jpg")], "text.jpg is a file, not a folder"),
        "a billion ranks": (["check", config, "--world-size", "1000000000"], "a rank would have no record of its own"),
        "more ranks than records": (["check", config, "--world-size", "64"], "use at most"),
        "class sampling never": (["check", config, "class_sampling.share=0.5", "class_sampling.start_step=100",
                                  "train.steps=50", "--world-size", "1"], "no batch would be class-level"),
    }


@pytest.mark.parametrize("case", ["yaml", "manifest", "not an image", "empty image", "missing image", "k 0",
                                  "corrupt index", "corrupt meta", "no such split", "other dim", "other backbone",
                                  "not a checkpoint", "missing resume", "onnx onto a folder", "onnx under a file",
                                  "eval --out folder", "eval --plots file", "opset 1", "nlist -3",
                                  "reference onto a folder", "reference under a file", "reference of a config",
                                  "config of nothing", "demo nproc 0", "demo nproc -1", "demo onto a file",
                                  "a billion ranks", "more ranks than records", "class sampling never"])
def test_a_command_line_mistake_is_one_line_and_exit_2(case, exported, twelve_steps, tiny_shards, capsys):
    from dist_dml.cli import main as cli

    config = str(twelve_steps / "config.yaml")
    argv, says = mistakes(twelve_steps / "final_model.pt", exported, config)[case]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in err, err
    assert lines[0].startswith(f"dist-dml {argv[0]}: error: ") and lines[0].count(f"dist-dml {argv[0]}:") == 1, lines[0]


def test_debug_shows_the_traceback(exported, capsys):
    from dist_dml.cli import main as cli
    from dist_dml.infra.errors import UserError

    with pytest.raises(UserError, match="not a readable checkpoint"):
        cli(["eval", str(exported / "junk.pt"), "--debug"])


# --- a full disk -----------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB tmpfs (needs root and a kernel that lets this container mount; skipped otherwise)."""
    import os

    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_says_so_removes_the_partial_checkpoint_and_keeps_the_previous(small_disk, tiny_shards):
    out = small_disk / "run"
    first = train(out, tiny_shards, 4)
    assert first.returncode == 0, first.stderr[-3000:]
    (out / "final_model.pt").unlink()
    filler = small_disk / "filler"
    with open(filler, "wb") as f:  # fill the disk up to 256 KiB: room for config.yaml, not for a checkpoint
        import os

        free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
        f.write(b"\0" * (free - (256 << 10)))
    second = train(out, tiny_shards, 8)
    assert second.returncode == 2, second.stderr[-3000:]
    line = [line for line in second.stderr.splitlines() if line.startswith("dist-dml")]
    assert len(line) == 1 and "no space left on the device writing" in line[0] and str(out) in line[0], second.stderr
    assert "the previous one, step00000004, is kept" in line[0] and "Traceback" not in second.stderr
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("step")) == ["step00000004"]
    assert verify(checkpoints / "step00000004") is None
    filler.unlink()
    third = train(out, tiny_shards, 8)  # space again: it resumes from the kept checkpoint
    assert third.returncode == 0 and resumed_step(third.stdout) == 4, third.stderr[-3000:]


# --- resuming at another world size ----------------------------------------------------------------

def saved_state(checkpoint: Path) -> dict:
    """Every parameter's fp32 value and Adam moments as the ZeRO-1/2 checkpoint holds them, put together from
    its per-rank partitions by hand (the reference for what any world size must load): per param group, the
    ranks' flat partitions in rank order, cut by the saved parameter shapes, padding at the end dropped."""
    import math

    from dist_dml.train.engine import weights_only_loads

    with weights_only_loads():
        model = torch.load(checkpoint / "mp_rank_00_model_states.pt")
        parts = [torch.load(p)["optimizer_state_dict"]
                 for p in sorted(checkpoint.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"),
                                 key=lambda p: int(p.name.split("_")[3]))]
    out, steps = {}, set()
    for g, shapes in enumerate(model["param_shapes"]):
        assert not any(any(p) for p in (parts[0].get("param_alignment_paddings") or [[0]])), "layout with gaps"
        flat = {"fp32": torch.cat([p["single_partition_of_fp32_groups"][g] for p in parts])}
        for key in ("exp_avg", "exp_avg_sq"):
            flat[key] = torch.cat([p["base_optimizer_state"]["state"][g][key] for p in parts])
        steps |= {float(p["base_optimizer_state"]["state"][g]["step"]) for p in parts}
        at = 0
        for name, shape in shapes.items():
            n = math.prod(shape)
            out[name] = {k: v[at:at + n].reshape(shape).float() for k, v in flat.items()}
            at += n
    return {"params": out, "step": model["global_steps"], "optimizer_steps": sorted(steps)}


def loaded_state(output: Path, shards: Path, nproc: int, dump: Path) -> dict:
    overrides = tiny_overrides(shards, output, **{"train.steps": 0, "eval.at_start": False, "tracking.enabled": False})
    if nproc == 1:  # as torchrun would run it, without the launch
        from . import resume_worker
        from .conftest import as_own_process

        with as_own_process():
            resume_worker.main(CONFIG, str(dump), *overrides)
    else:
        from .conftest import torchrun

        torchrun(nproc, "tests.resume_worker", CONFIG, str(dump), *overrides)
    return torch.load(dump, weights_only=True)


def assert_same_state(loaded: dict, saved: dict) -> None:
    assert loaded["step"] == saved["step"] and loaded["optimizer_steps"] == saved["optimizer_steps"]
    assert loaded["params"].keys() == saved["params"].keys()
    for name, values in saved["params"].items():
        for key, value in values.items():
            assert torch.equal(loaded["params"][name][key].reshape(value.shape), value), (name, key)


def test_resume_at_another_world_size_carries_model_beta_optimizer_and_data_position(tiny_shards, tmp_path):
    """ZeRO-2, fp32. 2 processes save at step 4 (mid-epoch); 1 process loads it: every parameter (the
    network's and beta), both Adam moments and the optimizer step equal the saved partitions put together,
    and the epoch ends without replaying or skipping a record. Then 1 -> 2 the same way, from step 10."""
    out = tmp_path / "run"
    overrides = lambda steps: tiny_overrides(tiny_shards, out, **{  # noqa: E731
        "train.steps": steps, "checkpoint.every_steps": 4, "eval.at_start": False, "tracking.enabled": False,
        "train.log_every": 2, "checkpoint.keep_last": 5})
    from .conftest import torchrun

    torchrun(2, "dist_dml.cli", "train", CONFIG, *overrides(4))
    step4 = out / "checkpoints" / "step00000004"
    assert json.loads((step4 / "dist_dml.json").read_text())["world_size"] == 2
    assert_same_state(loaded_state(out, tiny_shards, 1, tmp_path / "at1.pt"), saved_state(step4))

    one = dist_dml_here("train", CONFIG, *overrides(10))
    assert one.returncode == 0, one.stderr[-4000:]
    assert "saved at 2 processes, now 1" in one.stdout  # converted already, by loaded_state
    assert "epoch 1 done at step 8: each of its 48 records drawn once" in one.stdout, one.stdout[-3000:]
    step10 = out / "checkpoints" / "step00000010"
    assert json.loads((step10 / "dist_dml.json").read_text())["world_size"] == 1
    assert_same_state(loaded_state(out, tiny_shards, 2, tmp_path / "at2.pt"), saved_state(step10))

    two = torchrun(2, "dist_dml.cli", "train", CONFIG, *overrides(12))
    assert "saved at 1 processes, now 2" in two.stdout
    assert "epoch 2 done at step 12: each of its 48 records drawn once" in two.stdout, two.stdout[-3000:]
    assert not list((out / "checkpoints").glob("*.universal*"))  # conversions go once newer checkpoints exist


@pytest.mark.parametrize("damage_kind", ["nul", "huge member"])
def test_a_corrupt_test_shard_is_counted_in_evaluation(shards_copy, damage_kind):
    """The evaluation stream meets the shard faults the training stream meets: counted, the rest read."""
    import io
    import tarfile

    from dist_dml.data import DataConfig, EvalStream

    victim = sorted(shards_copy.glob("test-*.tar"))[0]
    if damage_kind == "nul":
        victim.write_bytes(b"\0" * victim.stat().st_size)
    else:
        with tarfile.open(victim) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        with tarfile.open(victim, "w", format=tarfile.PAX_FORMAT) as tar:
            for i, (member, data) in enumerate(members):
                if i == 1:
                    member.pax_headers = {"size": str(10**15)}
                tar.addfile(member, io.BytesIO(data))
    stream = EvalStream(DataConfig(root=str(shards_copy), workers=2), "test", decode_images=False)
    faults, images = {}, 0
    for batch in stream.loader():
        images += len(batch.image_ids)
        for key, value in batch.errors.items():
            faults[key] = faults.get(key, 0) + value
    assert faults["corrupt_shards"] == 1
    assert 0 < images < stream.num_images
