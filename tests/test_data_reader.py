"""The P x K training stream and the evaluation stream over synthetic shards."""
import json
import io
import pickle
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from dist_dml.data import DataConfig, EvalStream, TrainStream

from .conftest import synthetic_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return synthetic_shards(tmp_path_factory.mktemp("shards"), 96, 30, 0.02)


def config(root, **kw):
    base = dict(root=str(root), classes_per_batch=4, images_per_class=3, workers=0, image_size=24, resize=28,
                shuffle_buffer=20, seed=1)
    return DataConfig(**{**base, **kw})


def epoch_batches(cfg, rank=0, world=1, epoch=0, decode=False, step=0):
    """The batches of ``epoch`` from ``step`` on, and the stream."""
    stream = TrainStream(cfg, rank, world, decode_images=decode)
    stream.position.set_epoch(epoch)
    stream.position.step = step
    return list(stream.loader()), stream


def test_every_batch_is_p_by_k(shards):
    cfg = config(shards, workers=2)
    batches, stream = epoch_batches(cfg, decode=True)
    assert len(batches) == stream.steps_in_epoch(0) > 3
    for b in batches:
        assert b["images"].shape == (12, 3, 24, 24)
        labels = b["labels"].view(4, 3)
        assert torch.all(labels == labels[:, :1])  # K images of each of P records
        assert all(len(set(row.tolist())) == 3 for row in b["image_ids"].view(4, 3))  # records have >= 3: no repeats


def test_same_seed_and_epoch_give_same_batches_other_epoch_differs(shards):
    cfg = config(shards, workers=2)
    a, _ = epoch_batches(cfg, epoch=3, decode=True)
    b, _ = epoch_batches(cfg, epoch=3, decode=True)
    c, _ = epoch_batches(cfg, epoch=4, decode=True)
    for x, y in zip(a, b):
        assert torch.equal(x["image_ids"], y["image_ids"]) and torch.equal(x["images"], y["images"])
    assert [x["image_ids"].tolist() for x in a] != [x["image_ids"].tolist() for x in c]


def test_two_ranks_two_workers_disjoint_records_same_steps(shards):
    cfg = config(shards, workers=2)
    seen, steps = [], []
    for rank in range(2):
        batches, stream = epoch_batches(cfg, rank=rank, world=2, epoch=1)
        steps.append(len(batches))
        for b in batches:
            seen += [tuple(row) for row in b["image_ids"].view(4, 3).tolist()]
    assert steps[0] == steps[1] == TrainStream(cfg, 1, 2).steps_in_epoch(1)
    # Every image id belongs to one record, so no id may show up in two picks of the epoch.
    flat = [i for row in seen for i in set(row)]
    assert len(flat) == len(set(flat))


def test_resume_yields_the_remaining_batches_exactly(shards):
    cfg = config(shards, workers=2)
    full, stream = epoch_batches(cfg, epoch=2, decode=True)
    for consumed in (1, 2, 5):
        rest, _ = epoch_batches(cfg, epoch=2, decode=True, step=consumed)
        assert len(rest) == len(full) - consumed
        for x, y in zip(rest, full[consumed:]):
            assert torch.equal(x["image_ids"], y["image_ids"])
            assert torch.equal(x["images"], y["images"])


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 2])
def test_eval_stream_covers_every_image_once(shards, world, workers):
    """Every image once, with its class and source item as the shard's json says; each rank's count
    (what its progress bar counts to) is its share from the manifest."""
    cfg = config(shards, workers=workers)
    ids, labels, names = [], {}, {}
    for rank in range(world):
        stream = EvalStream(cfg, "test", rank, world, batch_size=16)
        seen = 0
        for batch in stream.loader():
            assert batch.images.shape[1:] == (3, 24, 24)
            ids += batch.image_ids.tolist()
            labels.update(zip(batch.image_ids.tolist(), batch.labels.tolist()))
            names.update(zip(batch.image_ids.tolist(), zip(batch.classes, batch.items)))
            seen += len(batch.image_ids)
        assert seen == stream.local_images
    assert sorted(ids) == list(range(stream.num_images))
    assert set(labels.values()) == set(range(30))
    assert names == json_names(shards, "test")


def json_names(shards: Path, split: str) -> dict[int, tuple[str, str]]:
    """image id -> (class, item) read with tarfile from the records' json members."""
    import tarfile

    out = {}
    for shard in sorted(shards.glob(f"{split}-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    out.update({i: (str(meta["class"]), item) for i, item in zip(meta["image_ids"], meta["items"])})
    return out


def corrupt_copy(shards: Path, tmp: Path) -> Path:
    out = tmp / "corrupt"
    shutil.copytree(shards, out)
    return out


def test_truncated_shard_is_logged_skipped_counted(shards, tmp_path, caplog):
    root = corrupt_copy(shards, tmp_path)
    victim = sorted(root.glob("train-*.tar"))[1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2 + 100])
    cfg = config(root, workers=0)
    with caplog.at_level("WARNING", logger="dist_dml.data"):
        batches, stream = epoch_batches(cfg, epoch=0)
    assert len(batches) == stream.steps_in_epoch(0)  # training goes on
    assert sum(b["errors"]["corrupt_shards"] for b in batches) == 1
    assert sum(b["errors"]["bad_records"] for b in batches) <= 1  # the record cut in half
    assert victim.name in caplog.text


def test_pickle_member_is_never_unpickled(shards, tmp_path):
    root = corrupt_copy(shards, tmp_path)
    victim = sorted(root.glob("train-*.tar"))[0]
    with tarfile.open(victim) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    key = members[0][0].name.split(".")[0]

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    payload = pickle.dumps(Boom())
    with tarfile.open(victim, "w") as tar:
        for m, data in members:
            tar.addfile(m, io.BytesIO(data))
            if m.name == f"{key}.json":
                for ext in ("pyd", "pickle"):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    batches, _ = epoch_batches(config(root, workers=0), epoch=0, decode=True)
    assert sum(b["errors"]["unknown_members"] for b in batches) == 2
    assert sum(b["errors"]["bad_records"] for b in batches) == 0


def test_too_few_shards_for_slots_resamples_with_equal_steps(shards):
    cfg = config(shards, workers=4)
    steps = [len(epoch_batches(cfg, rank=r, world=8)[0]) for r in range(8)]
    assert len(set(steps)) == 1 and steps[0] >= 1


def test_bad_batch_geometry_is_rejected(shards):
    with pytest.raises(ValueError, match="images_per_class"):
        TrainStream(config(shards, images_per_class=1))


def test_workers_die_with_their_process(shards):
    """A rank killed with SIGKILL must not leave DataLoader workers behind (they would hold the
    launcher's stdout pipe and shared memory): they go at once, not at torch's 5-second watchdog."""
    import subprocess
    import sys

    import psutil

    code = f"""
import os, time
from dist_dml.data import DataConfig, TrainStream
cfg = DataConfig(root={str(shards)!r}, classes_per_batch=4, images_per_class=3, workers=2, image_size=24, resize=28)
batches = iter(TrainStream(cfg).loader())
next(batches)
print("ready", flush=True)
time.sleep(600)
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        workers = psutil.Process(proc.pid).children()
        assert len(workers) == 2
    finally:
        proc.kill()
        proc.wait()
    _, alive = psutil.wait_procs(workers, timeout=30)  # returns as soon as they are gone
    for worker in alive:
        worker.kill()
    assert not alive
