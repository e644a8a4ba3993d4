"""dist-dml grid: a 2 x 2 x 1 grid of tiny trainings, its child runs under one parent, its table, and a
rerun that skips what finished."""
import csv
import subprocess
import sys

from .conftest import HANG_GUARD_S, ROOT, cpu_env, dist_dml_here, tiny_overrides


def test_a_grid_of_four_cells_is_four_child_runs_a_table_and_a_rerun_skips_them(tiny_shards, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = tiny_overrides(tiny_shards, tmp_path / "unused", **{
        "train.steps": 6, "train.log_every": 6, "eval.at_start": False, "checkpoint.every_steps": 0,
        "tracking.experiment": "grid-test", "tracking.log_model": False})
    cmd = ["grid", str(ROOT / "configs/cpu_synthetic.yaml"), *overrides, "--losses", "margin,triplet", "--samplers",
           "distance_weighted,random", "--seeds", "0", "--output", str(tmp_path / "grid")]
    env = cpu_env(MLFLOW_TRACKING_URI=uri)
    first = subprocess.run([sys.executable, "-m", "dist_dml.cli", *cmd], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=HANG_GUARD_S)  # its cells: trainings it launches, under a hang guard
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    with open(tmp_path / "grid" / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["cell"] for r in rows) == ["margin / distance_weighted", "margin / random",
                                               "triplet / distance_weighted", "triplet / random"]
    assert all(r["seeds"] == "1" and 0.0 <= float(r["recall_at_1"]) <= 1.0 for r in rows)
    assert (tmp_path / "grid" / "table.md").read_text().count("\n") == 6 and (tmp_path / "grid" / "r_at_1.png").is_file()

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("grid-test")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "dist_dml.grid" in r.data.tags]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == 4 and {r.data.params["loss.kind"] for r in children} == {"margin", "triplet"}
    assert {r.data.params["sampler.kind"] for r in children} == {"distance_weighted", "random"}
    assert {a.path for a in client.list_artifacts(parents[0].info.run_id, "grid")} == {
        "grid/table.csv", "grid/table.md", "grid/r_at_1.png"}

    again = dist_dml_here(*cmd, cwd=tmp_path, env=env)  # trains nothing: run in this process
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished before, skipped") == 4 and "training (" not in again.stdout
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 5  # the same parent, no new child
