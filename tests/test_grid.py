"""dist-dml grid: its cells (each loss at its own margin), its table against the cells' own results, its child
runs under one parent, a rerun that skips what finished, a failing cell, and cells of two processes."""
import csv
import json
import subprocess
import sys

import yaml

from .conftest import HANG_GUARD_S, ROOT, cpu_env, dist_dml_here, tiny_overrides

GRID_OVERRIDES = {"train.steps": 6, "train.log_every": 6, "eval.at_start": False, "checkpoint.every_steps": 0,
                  "tracking.experiment": "grid-test", "tracking.log_model": False}


def run_grid(tmp_path, config, *args, **extra):
    overrides = tiny_overrides(extra.pop("shards"), tmp_path / "unused", **{**GRID_OVERRIDES, **extra})
    cmd = ["grid", str(config), *overrides, *args, "--output", str(tmp_path / "grid")]
    env = cpu_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    proc = subprocess.run([sys.executable, "-m", "dist_dml.cli", *cmd], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=HANG_GUARD_S)  # its cells: trainings it launches, under a hang guard
    return proc, cmd, env


def table_rows(grid) -> dict[str, dict]:
    with open(grid / "table.csv") as f:
        return {row["cell"]: row for row in csv.DictReader(f)}


def test_a_loss_axis_trains_each_loss_at_its_margin_and_the_table_is_the_cells_mean_and_spread(tiny_shards, tmp_path):
    """A config that chose alpha 0.25 and a per-class beta for its margin loss: the contrastive cells train at
    contrastive's own 1.0 without beta (they took 0.2 and dropped beta without a word), and the table's mean ±
    spread over two seeds is what the cells' results.json give, worked by hand."""
    from mlflow.tracking import MlflowClient

    raw = yaml.safe_load((ROOT / "configs/cpu_synthetic.yaml").read_text())
    raw["loss"].update(alpha=0.25, beta_per_class=True)
    config = tmp_path / "chosen.yaml"
    config.write_text(yaml.safe_dump(raw))
    proc, cmd, env = run_grid(tmp_path, config, "--losses", "margin,contrastive", "--seeds", "0,1", shards=tiny_shards,
                              **{"eval.postprocess": "dba+qe"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    grid = tmp_path / "grid"
    rows = table_rows(grid)
    assert sorted(rows) == ["contrastive / distance_weighted", "margin / distance_weighted"]
    for loss, alpha, beta in (("margin", 0.25, "global+class"), ("contrastive", 1.0, "none")):
        row = rows[f"{loss} / distance_weighted"]
        assert (float(row["alpha"]), row["beta"], row["seeds"]) == (alpha, beta, "2")
        saved = [yaml.safe_load((grid / "cells" / f"{loss}-distance-weighted-seed{s}" / "config.yaml").read_text())
                 for s in (0, 1)]
        assert all(c["loss"]["alpha"] == alpha and c["loss"]["beta_per_class"] == (loss == "margin") for c in saved)
        results = [json.loads((grid / "cells" / f"{loss}-distance-weighted-seed{s}" / "results.json").read_text())
                   ["trained"] for s in (0, 1)]
        for metric in ("recall_at_1", "recall_at_2", "map_at_r", "r_precision"):
            a, b = (r[metric] for r in results)
            assert abs(float(row[metric]) - (a + b) / 2) < 1e-12, (metric, row, a, b)
            assert abs(float(row[f"{metric}_std"]) - abs(a - b) / 2) < 1e-12, (metric, row, a, b)
            # eval.postprocess: the metrics after DBA + QE have their own columns, from the cells' "postprocessed"
            a, b = (r["postprocessed"][metric] for r in results)
            assert abs(float(row[f"pp_{metric}"]) - (a + b) / 2) < 1e-12, (metric, row, a, b)
    assert "| margin / distance_weighted | 0.25 | global+class | none | 2 |" in (grid / "table.md").read_text()

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("grid-test")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "dist_dml.grid" in r.data.tags]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == 4 and {r.data.params["loss.kind"] for r in children} == {"margin", "contrastive"}
    assert all("pp_recall_at_1" in r.data.metrics and "recall_at_1" in r.data.metrics for r in children)
    assert {r.data.params["loss.alpha"] for r in children} == {"0.25", "1.0"}
    assert {a.path for a in client.list_artifacts(parents[0].info.run_id, "grid")} == {
        "grid/table.csv", "grid/table.md", "grid/r_at_1.png"}

    again = dist_dml_here(*cmd, cwd=tmp_path, env=env)  # trains nothing: run in this process
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished before, skipped") == 4 and "training (" not in again.stdout
    assert len(client.search_runs([experiment.experiment_id])) == 5  # the same parent, no new child


def test_a_set_axis_on_two_processes_goes_on_past_a_failing_cell_and_exits_2(tiny_shards, tmp_path):
    """--set model.weights=none,FILE with FILE not a weights file: that cell fails, the other trains on 2
    processes, the table holds both, and the grid ends with exit 2 naming the failed cell."""
    bad = tmp_path / "bad weights.pt"
    bad.write_bytes(b"not a weights file")
    proc, _, _ = run_grid(tmp_path, ROOT / "configs/cpu_synthetic.yaml", "--set", f"model.weights=none,{bad}",
                          "--nproc", "2", shards=tiny_shards)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    grid = tmp_path / "grid"
    good, failed = "margin-distance-weighted-weightsnone-seed0", [p.name for p in (grid / "cells").iterdir()]
    failed.remove(good)
    assert len(failed) == 1 and "bad-weights.pt" in failed[0]
    assert f"1 of 2 cells failed: {failed[0]}: exit code" in proc.stderr
    assert json.loads((grid / "cells" / good / "results.json").read_text())["world_size"] == 2
    rows = table_rows(grid)
    assert rows["margin / distance_weighted model.weights=none"]["seeds"] == "1"
    assert rows[f"margin / distance_weighted model.weights={bad}"]["seeds"] == "0"


def test_grid_arguments_that_cannot_run_are_one_line(tiny_shards, tmp_path):
    config = str(ROOT / "configs/cpu_synthetic.yaml")
    base = ["grid", config, f"data.root={tiny_shards}", "--output", str(tmp_path / "grid")]
    (tmp_path / "file").write_text("")
    for args, says in ((["--seeds", "a"], "--seeds 'a': expected comma-separated whole numbers"),
                       (["--nproc", "0"], "--nproc must be >= 1"), (["--losses", ""], "--losses names no value"),
                       (["--losses", "triplet", "--set", "loss.beta_per_class=true,false"],
                        "apply to the margin loss only")):
        ran = dist_dml_here(*base, *args)
        assert ran.returncode == 2 and says in ran.stderr, (args, ran.stderr)
    ran = dist_dml_here("grid", config, f"data.root={tiny_shards}", "--output", str(tmp_path / "file"))
    assert ran.returncode == 2 and "is a file, not a folder" in ran.stderr


def test_postprocessing_is_an_axis_like_any_other(tiny_shards):
    """--set eval.postprocess=none,dba+qe: two cells with plain names, each config valid; a step that does not
    exist is refused before any training, naming the choices."""
    from dist_dml.config import load_config
    from dist_dml.train.grid import cells, parse_settings

    config = ROOT / "configs/cpu_synthetic.yaml"
    grid = cells(["margin"], ["distance_weighted"], [0], parse_settings(["eval.postprocess=none,dba+qe"]))
    assert [c.name for c in grid] == ["margin-distance-weighted-postprocessnone-seed0",
                                      "margin-distance-weighted-postprocessdba-qe-seed0"]
    assert [load_config(config, [f"data.root={tiny_shards}", *c.overrides()]).eval.postprocess for c in grid] == [
        "none", "dba+qe"]
    ran = dist_dml_here("grid", str(config), f"data.root={tiny_shards}", "--set", "eval.postprocess=none,rerank")
    assert ran.returncode == 2 and "dba, qe, k_reciprocal" in ran.stderr, ran.stderr


def test_class_sampling_is_an_axis_like_any_other(tiny_shards):
    """--set class_sampling.share=0,0.5: a cell of random batches and one of class-level batches, each config
    valid; a share beyond 1 is refused before any training."""
    from dist_dml.config import load_config
    from dist_dml.train.grid import cells, parse_settings

    config = ROOT / "configs/cpu_synthetic.yaml"
    grid = cells(["margin"], ["distance_weighted"], [0], parse_settings(["class_sampling.share=0,0.5"]))
    assert [load_config(config, [f"data.root={tiny_shards}", *c.overrides()]).class_sampling.share
            for c in grid] == [0.0, 0.5]
    assert len({c.name for c in grid}) == 2
    ran = dist_dml_here("grid", str(config), f"data.root={tiny_shards}", "--set", "class_sampling.share=0,1.5")
    assert ran.returncode == 2 and "class_sampling.share must be in [0, 1]" in ran.stderr, ran.stderr


def test_losses_against_class_centres_are_on_the_loss_axis(tiny_shards):
    """--losses margin,arcface,margin+cosface over two samplers: a centre loss alone is one cell (its pairs train
    nothing, so one sampler stands for all) with the pair loss's weight 0 and no beta tables; a hybrid is both at
    weight 1; a pair loss alone turns off the centres the config turned on; the table names each row's centres
    with the paper's constants."""
    from dist_dml.config import load_config
    from dist_dml.train.grid import _centres, cells

    config = ROOT / "configs/cpu_synthetic.yaml"
    base = [f"data.root={tiny_shards}", "proxy.kind=proxy_anchor", "loss.beta_per_class=true"]
    grid = cells(["margin", "arcface", "margin+cosface"], ["distance_weighted", "random"], [0], {})
    assert [c.group for c in grid] == ["margin / distance_weighted", "margin / random", "arcface alone",
                                       "margin+cosface / distance_weighted", "margin+cosface / random"]
    assert [c.name for c in grid][2:4] == ["arcface-seed0", "margin-cosface-distance-weighted-seed0"]
    loaded = {c.group: load_config(config, [*base, *c.overrides(load_config(config, base).loss, False,
                                                                  load_config(config, base).proxy)]) for c in grid}
    margin, alone, hybrid = (loaded[g] for g in ("margin / random", "arcface alone", "margin+cosface / random"))
    assert (margin.proxy.kind, margin.loss.weight, margin.sampler.kind) == ("none", 1.0, "random")
    assert (alone.proxy.kind, alone.loss.weight, alone.loss.beta_per_class) == ("arcface", 0.0, False)
    assert (hybrid.proxy.kind, hybrid.loss.kind, hybrid.loss.weight, hybrid.loss.beta_per_class) == (
        "cosface", "margin", 1.0, True)
    assert [_centres(c.proxy) for c in (margin, alone, hybrid)] == ["none", "arcface s=64 m=0.5", "cosface s=64 m=0.35"]
