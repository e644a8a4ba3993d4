"""data.val_share: a seeded share of the training classes held out at run time, never trained on, validated on as a
split of its own; found from the manifest alone and checked here against the records as the shards hold them."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from dist_dml.config import ConfigError, load_config
from dist_dml.data import DataConfig, EvalStream, Manifest, ManifestError, read_records
from dist_dml.data.held_out import held_out, held_out_name

from .conftest import dist_dml_here, tiny_overrides
from .test_coverage import draw_epoch, run_ranks
from .test_selection import CONFIG, prep as prep_with_val


def prep(out: Path, classes: int = 60, per_class: str = "2:9", max_per_record: int = 3, min_shards: int = 5) -> Path:
    """Classes of 2 to 9 images in records of at most 3: most classes span several records, some several shards."""
    from data_prep.cli import main

    assert main(["synthetic", "--classes", str(classes), "--test-classes", "8", "--per-class", per_class,
                 "--size", "12", "--shard-mb", "1000", "--min-shards", str(min_shards), "--max-per-record",
                 str(max_per_record), "--out", str(out), "--no-progress", "--workers", "1"]) == 0
    return out


@pytest.fixture(scope="module")
def chunked(tmp_path_factory) -> Path:
    return prep(tmp_path_factory.mktemp("chunked"))


@pytest.fixture(scope="module")
def with_val(tmp_path_factory) -> Path:
    return prep_with_val(tmp_path_factory.mktemp("with_val"))


def shard_records(root: Path) -> list[dict]:
    """Every training record as the shards hold it (the independent reference), in the manifest's order."""
    return list(read_records(Manifest(root).shard_paths("train")))


def test_the_manifest_says_which_record_holds_which_class(chunked):
    """The labels and image counts the manifest's class table gives each record, shard by shard, are those of the
    records read from the shards."""
    held = held_out(Manifest(chunked), DataConfig(root=str(chunked), val_share=0.2))
    records = shard_records(chunked)
    assert len(records) > Manifest(chunked).split("train")["classes"]  # classes span several records
    for shard in Manifest(chunked).shard_paths("train"):
        mine = [r for r in records if r["shard"] == shard]
        assert held.record_labels[shard].tolist() == [r["label"] for r in mine]
        assert held.record_images[shard].tolist() == [len(r["image_ids"]) for r in mine]


def test_the_share_is_seeded_and_sized(chunked):
    manifest, classes = Manifest(chunked), Manifest(chunked).split("train")["classes"]
    chosen = held_out(manifest, DataConfig(root=str(chunked), val_share=0.2)).labels
    assert len(chosen) == round(0.2 * classes) and len(set(chosen.tolist())) == len(chosen)
    assert held_out(manifest, DataConfig(root=str(chunked), val_share=0.2)).labels.tolist() == chosen.tolist()
    assert held_out(manifest, DataConfig(root=str(chunked), val_share=0.2, val_seed=1)).labels.tolist() \
        != chosen.tolist()
    assert len(held_out(manifest, DataConfig(root=str(chunked), val_share=0.001)).labels) == 1  # one at least
    assert held_out(manifest, DataConfig(root=str(chunked))) is None


@pytest.mark.parametrize("ranks,workers", [(1, 1), (2, 2), (3, 1)])
def test_an_epoch_draws_every_trained_record_once_and_no_held_out_one(chunked, ranks, workers):
    """Over all (rank, worker) slots, an epoch draws each record of a trained class once and no record of a
    held-out class; every trained class is drawn, and the steps are those of the trained records alone."""
    held = set(held_out(Manifest(chunked), DataConfig(root=str(chunked), val_share=0.25)).labels.tolist())
    records = shard_records(chunked)
    trained = {r["image_ids"][0] for r in records if r["label"] not in held}
    drawn, steps, labels, stream = draw_epoch(chunked, ranks, workers, 0, p=2, val_share=0.25)
    firsts = [i for ids in drawn.values() for i in ids]
    assert trained <= set(firsts) and not set(firsts) - trained
    assert len(set(steps.values())) == 1
    assert labels == set(range(stream.num_classes)) - held
    longest = -(-len(trained) // (ranks * workers))
    assert steps[0] == workers * -(-longest // 2)


def test_a_resume_at_another_world_size_keeps_the_held_out_records_out(chunked):
    """An epoch cut at step 3 on 2 ranks x 2 workers and finished on 1 rank: each trained record's first draw once
    over both stretches, no held-out record's."""
    held = held_out(Manifest(chunked), DataConfig(root=str(chunked), val_share=0.25))
    state, first, _ = run_ranks(chunked, 2, 2, None, 3, p=2, val_share=0.25)
    _, rest, _ = run_ranks(chunked, 1, 1, state, None, p=2, val_share=0.25)
    from dist_dml.data import TrainStream

    kept = TrainStream(DataConfig(root=str(chunked), val_share=0.25, seed=5), decode_images=False).plan.kept(0)
    total = first + rest
    assert (total[kept] == 1).all() and (total[~kept] == 0).all()
    assert (~kept).sum() == sum(int(held.label_map[labels].__ge__(0).sum()) for labels in held.record_labels.values())


def test_the_held_out_split_reads_as_a_split_of_its_own(chunked, monkeypatch):
    """Read over 2 ranks x 2 workers, the held-out split yields each image of the held-out classes once, labels and
    image ids renumbered from 0 (in the training split's order); the training split read for evaluation yields the
    others under their own numbers."""
    cfg = DataConfig(root=str(chunked), val_share=0.25, workers=2, image_size=8, resize=12)
    held = held_out(Manifest(chunked), cfg)
    records = shard_records(chunked)
    theirs = sorted((r for r in records if r["label"] in set(held.labels.tolist())), key=lambda r: r["image_ids"][0])
    expect = {}  # image -> (label, id), numbered independently: classes and images in training order
    for image, (label, items) in enumerate((held.labels.tolist().index(r["label"]), item)
                                           for r in theirs for item in r["items"]):
        expect[items] = (label, image)
    got = {}
    for rank in range(2):
        stream = EvalStream(cfg, held_out_name("train"), rank, 2, batch_size=5, decode_images=False)
        assert stream.num_images == len(expect) and stream.num_classes == len(held.labels)
        for worker in range(2):
            for batch in _worker(stream, worker, 2, monkeypatch):
                for item, label, image in zip(batch.items, batch.labels.tolist(), batch.image_ids.tolist()):
                    assert item not in got
                    got[item] = (label, image)
    assert got == expect
    trained = EvalStream(cfg, "train", decode_images=False)
    items = {item for b in _worker(trained, 0, 1, monkeypatch) for item in b.items}
    assert items == {item for r in records if r["label"] not in set(held.labels.tolist()) for item in r["items"]}
    assert trained.num_images == len(items)


def _worker(stream: EvalStream, worker: int, workers: int, monkeypatch) -> list:
    """The batches DataLoader worker ``worker`` of ``workers`` would yield."""
    import dist_dml.data.eval_stream as module

    class Info:
        num_workers, id = workers, worker

    monkeypatch.setattr(module, "get_worker_info", lambda: Info)
    return list(iter(stream))


def test_a_manifest_whose_class_table_disagrees_is_refused(chunked, tmp_path):
    manifest = json.loads((chunked / "manifest.json").read_text())
    manifest["splits"]["train"]["class_table"][0][1] += 3  # one record more for that class
    for shard in Path(chunked).iterdir():
        (tmp_path / shard.name).write_bytes(shard.read_bytes())
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="class_table"):
        held_out(Manifest(tmp_path), DataConfig(root=str(tmp_path), val_share=0.2))


@pytest.mark.parametrize("keys, says", [
    ({"data.val_share": 0.2, "data.val_split": "val"}, "both name validation classes"),
    ({"data.val_share": 1.0}, "data.val_share must be in [0, 1)"),
    ({"data.val_share": 0.2}, "has a prepared validation split 'val'"),
])
def test_validation_classes_are_named_once(keys, says, with_val):
    """Validation classes from a prepared split or a share held out at run time, never both silently."""
    root = with_val
    with pytest.raises(ConfigError, match=re.escape(says)):
        load_config(CONFIG, [f"data.root={root}", *(f"{k}={v}" for k, v in keys.items())])


def test_a_run_validates_on_the_held_out_classes_and_a_resume_keeps_them(chunked, tmp_path):
    """A run with data.val_share and checkpoint.best_by validates on '<train>[val_share]' at the start, every 4 steps
    and the end, and takes the best as its final model; resuming it with another share is refused before start."""
    out = tmp_path / "run"
    keys = {"eval.at_start": False, "tracking.enabled": False, "data.val_share": 0.25, "eval.every_steps": 4,
            "checkpoint.every_steps": 4, "checkpoint.best_by": "map_at_r", "train.steps": 8, "eval.recall_ks": "[1,2]",
            "data.image_size": 8, "data.resize": 12, "data.classes_per_batch": 4, "data.images_per_class": 2}
    checked = dist_dml_here("check", CONFIG, "--world-size", "2", *tiny_overrides(chunked, out, **keys))
    assert checked.returncode == 0 and "[check] data.val_share=0.25 (data.val_seed=0) holds 15 of the 60 training " \
        "classes out" in checked.stdout, checked.stderr[-2000:]
    ran = dist_dml_here("train", CONFIG, *tiny_overrides(chunked, out, **keys))
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "holds 15 of the 60 training classes out" in ran.stdout
    logged = {int(s): float(v) for s, v in
              re.findall(r"\[eval\] step (\d+) on 'train\[val_share\]': .*?map_at_r=([0-9.]+)", ran.stdout)}
    assert sorted(logged) == [0, 4, 8]
    results = json.loads((out / "results.json").read_text())
    assert results["best_step"] == max(logged, key=lambda s: (logged[s], -s))
    again = dist_dml_here("train", CONFIG, *tiny_overrides(chunked, out, **{**keys, "data.val_share": 0.3,
                                                                              "train.steps": 12}))
    assert again.returncode != 0 and "saved with data.val_share=0.25" in again.stderr
