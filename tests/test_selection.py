"""A fine-tune a user can trust: a validation split of training classes, the checkpoint chosen by it (never pruned,
resumed with the run), early stopping, the test split evaluated once on the chosen model; the weights' average."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from dist_dml.config import ConfigError, load_config
from dist_dml.data import Manifest

from .conftest import ROOT, dist_dml_here, tiny_overrides

CONFIG = str(ROOT / "configs/cpu_synthetic.yaml")


def prep(out: Path, seed: int = 0) -> Path:
    from data_prep.cli import main as prep_main

    assert prep_main(["synthetic", "--classes", "64", "--test-classes", "24", "--per-class", "3:6", "--size", "32",
                      "--val-fraction", "0.25", "--seed", str(seed), "--shard-mb", "0.03", "--out", str(out),
                      "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def with_val(tmp_path_factory) -> Path:
    return prep(tmp_path_factory.mktemp("with_val"))


def classes_of(root: Path, split: str) -> set[str]:
    return {name for name, _ in Manifest(root).split(split)["class_table"]}


def test_validation_classes_are_disjoint_seeded_training_classes(with_val, tmp_path):
    """prep --val-fraction 0.25: a quarter of the 64 training classes become the split 'val', disjoint from the
    training and test classes; the same seed holds out the same classes, another seed others."""
    train, val, test = (classes_of(with_val, s) for s in ("train", "val", "test"))
    assert len(val) == 16 and len(train) == 48 and len(test) == 24
    assert not (val & train) and not (val & test) and not (train & test)
    assert classes_of(prep(tmp_path / "again"), "val") == val
    assert classes_of(prep(tmp_path / "other", seed=1), "val") != val


def run(root: Path, out: Path, **extra):
    values = {"eval.at_start": False, "tracking.enabled": False, "data.val_split": "val", "eval.every_steps": 4,
              "checkpoint.every_steps": 0, "checkpoint.keep_last": 1, "checkpoint.best_by": "map_at_r",
              "train.steps": 24, "eval.recall_ks": "[1,2]"}
    values.update(extra)
    return dist_dml_here("train", CONFIG, *tiny_overrides(root, out, **values))


def validations(log: str) -> dict[int, float]:
    """{step: MAP@R} of the validation lines of a training's log."""
    return {int(step): float(value) for step, value in
            re.findall(r"\[eval\] step (\d+) on 'val': .*?map_at_r=([0-9.]+)", log)}


def test_the_best_validation_is_the_final_model_and_the_test_is_evaluated_once(with_val, tmp_path):
    """best_by map_at_r with a validation every 4 steps (and at the start) and keep_last 1: results.json names the
    step of the highest logged validation MAP@R, its checkpoint is kept, final_model.pt holds its weights, and the test split is
    evaluated once, at the end, on them."""
    out = tmp_path / "run"
    ran = run(with_val, out)
    assert ran.returncode == 0, ran.stderr[-3000:]
    logged = validations(ran.stdout)
    assert sorted(logged) == [0, 4, 8, 12, 16, 20, 24]  # the start is a candidate, the last step too
    best = max(logged, key=lambda s: (logged[s], -s))  # the first of the highest
    results = json.loads((out / "results.json").read_text())
    assert results["best_step"] == best and results["best_by"] == "map_at_r"
    assert results["best_value"] == pytest.approx(logged[best], abs=1e-4)
    assert (out / "checkpoints" / f"step{best:08d}").is_dir()
    assert (out / "checkpoints" / "best").read_text() == f"step{best:08d}"
    final = torch.load(out / "final_model.pt", weights_only=True)["state_dict"]
    from dist_dml.train.engine import WeightsOnlyCheckpointEngine

    with torch.serialization.safe_globals(WeightsOnlyCheckpointEngine.SAFE_GLOBALS):
        saved = torch.load(out / "checkpoints" / f"step{best:08d}" / "mp_rank_00_model_states.pt", weights_only=True)
    for name, value in saved["module"].items():
        if name.startswith("model."):
            assert torch.equal(final[name[len("model."):]], value.float()), name
    tests = re.findall(r"\[eval\] step \d+: ", ran.stdout)  # lines of the test split (no 'on')
    assert len(tests) == 1 and f"final model is step {best}'s" in ran.stdout


def test_a_resume_keeps_the_best_and_the_patience_count(with_val, tmp_path):
    """patience 2: a run stopped at step 12 and resumed to 40 stops where an unbroken run stops, with the same best
    step and value (the selection's state travels in the checkpoint); a run that stopped early is finished when
    started again."""
    extra = {"train.patience": 2, "checkpoint.every_steps": 4, "checkpoint.keep_last": 2, "train.steps": 40,
             "optimizer.schedule": "constant"}  # the same rate whatever train.steps: the cut run trains alike
    whole = run(with_val, tmp_path / "whole", **extra)
    assert whole.returncode == 0, whole.stderr[-3000:]
    first = run(with_val, tmp_path / "cut", **{**extra, "train.steps": 12})
    assert first.returncode == 0, first.stderr[-3000:]
    second = run(with_val, tmp_path / "cut", **extra)
    assert second.returncode == 0, second.stderr[-3000:]
    a = json.loads((tmp_path / "whole" / "results.json").read_text())
    b = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert a.get("stopped_early") and b.get("stopped_early") and a["steps"] == b["steps"] < 40
    assert (a["best_step"], a["best_value"]) == (b["best_step"], b["best_value"])
    again = run(with_val, tmp_path / "whole", **extra)
    assert again.returncode == 0 and "finished at step" in again.stdout


@pytest.mark.parametrize("keys, says", [({"checkpoint.best_by": "recall_at_16"}, "not a metric this run's evaluation"),
                                        ({"checkpoint.best_by": "ema_map_at_r"}, "not a metric"),
                                        ({"data.val_split": "''"}, "give data.val_split"),
                                        ({"checkpoint.best_by": "none", "train.patience": 3}, "train.patience=3"),
                                        ({"data.val_split": "nosuch"}, "no split 'nosuch'")])
def test_a_selection_that_cannot_be_made_is_refused_before_training(with_val, tmp_path, keys, says):
    values = {"data.val_split": "val", "checkpoint.best_by": "map_at_r", "eval.recall_ks": "[1,2]", **keys}
    with pytest.raises(ConfigError, match=says):
        load_config(CONFIG, tiny_overrides(with_val, tmp_path, **values))


def test_the_weights_average_is_a_hand_written_loop_and_its_evaluation_leaves_the_model(tiny_shards):
    """train.ema 0.9: after each taken step avg = 0.9 avg + 0.1 w (a skipped step leaves it), in float32; evaluating
    the average puts its weights in the model for the evaluation only."""
    from types import SimpleNamespace

    from dist_dml.train.features import WeightAverage

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    engine = SimpleNamespace(module=SimpleNamespace(model=model))
    cfg = SimpleNamespace(train=SimpleNamespace(ema=0.9))
    ema = WeightAverage(cfg, None, None, engine)
    expected = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    for step, taken in enumerate([True, True, False, True]):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.after_step(None, {}, step, taken)
        if taken:
            for n, p in model.named_parameters():
                expected[n] = 0.9 * expected[n] + 0.1 * p.detach().double()
    for n, t in ema.average.items():
        torch.testing.assert_close(t.double(), expected[n], rtol=1e-6, atol=1e-6)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = ema.extra_evaluations(lambda: {n: p.detach().clone() for n, p in model.named_parameters()})["ema"]
    assert all(torch.equal(seen[n], ema.average[n]) for n in seen)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def numpy_pca(features, dim):
    """The reference: numpy's eigendecomposition of the features' covariance in float64, the largest first, each
    direction's largest component positive and divided by the square root of its eigenvalue (plus 1e-6 of the
    largest); the head's bias centres the features."""
    import numpy as np

    x = np.asarray(features, np.float64)
    mean = x.mean(axis=0)
    values, vectors = np.linalg.eigh(np.cov(x, rowvar=False, bias=True))
    order = np.argsort(values)[::-1][:dim]
    directions = vectors[:, order].T
    directions *= np.sign(directions[np.arange(len(directions)), np.abs(directions).argmax(axis=1)])[:, None]
    directions /= np.sqrt(np.maximum(values[order], 0) + 1e-6 * values.max())[:, None]
    return directions, -directions @ mean


def test_the_pca_head_is_numpys_pca_of_the_same_features():
    from dist_dml.models.embedding import pca_head

    torch.manual_seed(0)
    features = (torch.randn(300, 12) @ torch.randn(12, 12) + torch.randn(12)).double()
    weight, bias = pca_head(features.sum(0), features.T @ features, 300, 5)
    want_w, want_b = numpy_pca(features.numpy(), 5)
    torch.testing.assert_close(weight, torch.from_numpy(want_w), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(bias, torch.from_numpy(want_b), rtol=1e-7, atol=1e-9)
    wide, _ = pca_head(features.sum(0), features.T @ features, 300, 16)
    assert torch.equal(wide[12:], torch.zeros(4, 12)) and torch.allclose(wide[:5], weight)
    projected = (features - features.mean(0)) @ weight.T  # whitened: unit variance, uncorrelated
    torch.testing.assert_close(projected.T @ projected / 300, torch.eye(5, dtype=torch.float64), atol=1e-5, rtol=0)


def test_a_run_that_starts_from_pca_sets_its_head_from_its_training_images(tiny_shards, tmp_path):
    """model.head_init=pca on 40 training images: the head is the PCA of the backbone's features of the split's
    first 40 images (what the evaluation stream reads first), in float32; and a training with it prints so."""
    from dist_dml.data import EvalStream
    from dist_dml.infra.distributed import DistContext
    from dist_dml.models.embedding import build_model
    from dist_dml.train.head_init import init_head_by_pca

    cfg = load_config(CONFIG, tiny_overrides(tiny_shards, tmp_path, **{"model.head_init": "pca",
                                                                      "model.head_init_images": 40}))
    torch.manual_seed(0)
    model = build_model(cfg.model, image_size=cfg.data.image_size)
    images = torch.cat([b.images for b in EvalStream(cfg.data, "train", batch_size=16).loader()])[:40]
    with torch.no_grad():
        model.eval()
        features = model.features(images).double().numpy()
    line = init_head_by_pca(model, cfg, DistContext())
    assert "on 40 training images" in line
    want_w, want_b = numpy_pca(features, cfg.model.embedding_dim)
    torch.testing.assert_close(model.head.weight.double(), torch.from_numpy(want_w).to(torch.float64), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model.head.bias.double(), torch.from_numpy(want_b).to(torch.float64), atol=1e-4, rtol=1e-4)
    ran = dist_dml_here("train", CONFIG, *tiny_overrides(tiny_shards, tmp_path / "run", **{
        "model.head_init": "pca", "model.head_init_images": 40, "train.steps": 2, "eval.at_start": False,
        "tracking.enabled": False}))
    assert ran.returncode == 0 and "principal directions of the backbone's" in ran.stdout, ran.stderr[-2000:]
