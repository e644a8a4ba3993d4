"""Nothing silently wrong (issue 17): records of a single image, evaluation splits whose queries cannot be
answered, embeddings that are not finite. Each is counted and said, and refused where nothing sound is left."""
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dist_dml.cli import main as cli
from dist_dml.config import load_config
from dist_dml.data import FORMAT, VERSION, DataConfig, EvalStream, TrainStream
from dist_dml.data import SplitError
from dist_dml.infra.distributed import DistContext
from dist_dml.retrieval.evaluation import evaluate, evaluation_problem
from dist_dml.models.embedding import build_model

from .conftest import ROOT

CONFIG = str(ROOT / "configs/cpu_synthetic.yaml")


def jpeg(label: int, i: int) -> bytes:
    rng = np.random.default_rng(1000 * label + i)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(out, "JPEG")
    return out.getvalue()


def hand_built(root: Path, splits: dict[str, list[int]]) -> Path:
    """A shard folder written by hand (dist-dml prep refuses single-image training classes): per split, one
    record per class with the given numbers of images, in one shard."""
    root.mkdir(parents=True)
    manifest = {"format": FORMAT, "version": VERSION, "splits": {}}
    for split, counts in splits.items():
        name, image_id = f"{split}-000000.tar", 0
        with tarfile.open(root / name, "w") as tar:
            for label, n in enumerate(counts):
                ids = list(range(image_id, image_id + n))
                image_id += n
                meta = {"label": label, "class": f"c{label}", "image_ids": ids,
                        "items": [f"{split}/c{label}/{i}.jpg" for i in range(n)]}
                members = [(f"{label:06d}.json", json.dumps(meta).encode())]
                members += [(f"{label:06d}.{i}.jpg", jpeg(label, i)) for i in range(n)]
                for member, data in members:
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        manifest["splits"][split] = {"records": len(counts), "images": image_id, "classes": len(counts), "shards": [
            {"name": name, "records": len(counts), "images": image_id, "bytes": (root / name).stat().st_size}]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def data_config(root: Path, **kw) -> DataConfig:
    return DataConfig(root=str(root), classes_per_batch=4, images_per_class=2, workers=0, image_size=16, resize=20,
                      **kw)


def one_epoch(cfg: DataConfig) -> tuple[list[dict], dict]:
    stream = TrainStream(cfg)
    batches, faults = list(stream.worker_batches(0, 0)), {}
    for batch in batches:
        for key, value in batch["errors"].items():
            faults[key] = faults.get(key, 0) + value
    return batches, faults


def test_single_image_records_are_counted_and_skipped_or_trained_as_self_pairs(tmp_path, caplog):
    root = hand_built(tmp_path / "shards", {"train": [1, 2] * 6, "test": [2] * 4})
    note = TrainStream(data_config(root)).single_image_note()
    assert "at least 6 of the 12 records" in note and "skipped" in note
    batches, faults = one_epoch(data_config(root))
    assert faults["single_image_records"] == 6
    singles = set(range(0, 12, 2))  # the labels of the single-image records
    assert not singles & {int(label) for batch in batches for label in batch["labels"]}
    assert "holds a single image" in caplog.text
    batches, faults = one_epoch(data_config(root, self_pairs=True))
    assert faults["single_image_records"] == 0
    pairs = [batch["image_ids"].view(4, 2) for batch in batches]
    drawn = {int(row[0]) for ids, batch in zip(pairs, batches) for row, label in zip(ids, batch["labels"].view(4, 2)[:, 0])
             if int(label) in singles}
    assert drawn  # trained, as two crops of their one image
    assert all(row[0] == row[1] for ids in pairs for row in ids if int(row[0]) in drawn)


def test_a_training_split_of_single_image_records_stops_before_training(tmp_path, capsys):
    root = hand_built(tmp_path / "shards", {"train": [1] * 8, "test": [2] * 4})
    with pytest.raises(SplitError, match="every one of the 8 records .* holds a single image"):
        TrainStream(data_config(root))
    code = cli(["check", CONFIG, f"data.root={root}", f"train.output_dir={tmp_path / 'run'}", "tracking.enabled=false",
                "--world-size", "1"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "data.self_pairs=true" in err
    assert TrainStream(data_config(root, self_pairs=True)).num_records == 8


def model_of(root: Path, out: Path, **overrides) -> Path:
    cfg = load_config(CONFIG, [f"data.root={root}", "data.image_size=16", "data.resize=20", "data.workers=0",
                               "model.embedding_dim=16", f"train.output_dir={out}"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    state = model.state_dict()
    for key, value in overrides.items():
        state[key] = torch.full_like(state[key], value)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "config": cfg.to_dict()}, out / "final_model.pt")
    return out / "final_model.pt"


def test_an_evaluation_whose_queries_cannot_be_answered_says_so_after_writing_its_results(tmp_path, capsys):
    root = hand_built(tmp_path / "shards", {"train": [2] * 8, "test": [1] * 6})
    checkpoint = model_of(root, tmp_path / "run")
    code = cli(["eval", str(checkpoint), "--out", str(tmp_path / "metrics.json")])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]  # the rest is the progress bar
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert "6 of its 6 queries (100.0%) have no other item of their class" in errors[0]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["unanswerable"] == metrics["queries"] == 6
    # Below the limit, the same evaluation passes.
    root = hand_built(tmp_path / "shards2", {"train": [2] * 8, "test": [1] + [3] * 9})
    assert cli(["eval", str(model_of(root, tmp_path / "run2")), "eval.max_unanswerable_share=0.1"]) == 0


class NaNRows(torch.nn.Module):
    """A model whose every third embedding of a batch is NaN."""

    def __init__(self, model):
        super().__init__()
        self.model, self.head = model, model.head

    def forward(self, x):
        out = self.model(x).clone()
        out[::3] = float("nan")
        return out


def test_nan_embeddings_are_left_out_of_an_evaluation_and_named(tiny_shards, capsys):
    cfg = load_config(CONFIG, [f"data.root={tiny_shards}", "data.image_size=16", "data.resize=20", "data.workers=0",
                               "model.embedding_dim=16", "eval.batch_size=10"])
    torch.manual_seed(0)
    model = NaNRows(build_model(cfg.model).eval())
    metrics, _ = evaluate(model, cfg.data, cfg.eval, DistContext())
    expected = EvalStream(cfg.data, "test").num_images
    nan = sum(len(range(0, min(10, expected - b), 3)) for b in range(0, expected, 10))
    assert metrics["nonfinite_embeddings"] == nan
    assert metrics["images_evaluated"] == expected - nan
    assert "nonfinite_embeddings=" in evaluation_problem(metrics, cfg.eval)
    err = capsys.readouterr().err
    assert f"{nan} embeddings are not finite (NaN or inf), left out of the evaluation" in err and "(id 0)" in err


def test_embed_of_a_nan_model_writes_nothing(tiny_shards, tmp_path, capsys):
    checkpoint = model_of(tiny_shards, tmp_path / "run", **{"head.bias": float("nan")})
    code = cli(["embed", str(checkpoint), "--out", str(tmp_path / "emb")])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2 and len(errors) == 1, errors
    assert "embeddings are not finite" in errors[0] and "so nothing is written" in errors[0]
    assert not list((tmp_path / "emb").glob("*"))


def test_the_served_model_refuses_a_batch_with_a_nan_embedding(tiny_shards, tmp_path):
    """What the logged MLflow Model runs (export.embed_array): a batch whose embedding is not finite for
    some image is refused, naming the rows."""
    from dist_dml.serve.trained_model import embed_array, load_checkpoint

    model, config = load_checkpoint(model_of(tiny_shards, tmp_path / "run", **{"head.bias": float("nan")}))
    images = np.random.default_rng(0).integers(0, 256, (3, 40, 50, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"the embeddings of 3 of 3 images are not finite .* rows \[0, 1, 2\]"):
        embed_array(model, config, images)
