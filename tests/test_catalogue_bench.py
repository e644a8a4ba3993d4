"""benchmarks/bench_catalogue.py without training: every arm's config is one `dist-dml check` accepts (on a small
Hangul set built here from fonts made here), an unknown arm is refused, and the table and the curve come from a
small fake results file, the means and deviations worked by hand."""
import importlib.util
import json

import pytest

from data_prep import hangul

from .conftest import ROOT, dist_dml_here
from .test_hangul import SOME, make_font

spec = importlib.util.spec_from_file_location("bench_catalogue", ROOT / "benchmarks" / "bench_catalogue.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


@pytest.fixture
def small_set(tmp_path, monkeypatch):
    """12 syllables in 4 faces, 3 images each: 8 training classes (2 of them 'val'), 4 held out."""
    monkeypatch.setattr(hangul, "SYLLABLES", "".join(chr(c) for c in SOME))
    monkeypatch.setattr(hangul, "LAST", SOME[-1])
    fonts = tmp_path / "fonts"
    fonts.mkdir()
    files = [make_font(fonts / f"{n}.ttf", n, "Regular", SOME) for n in ("Alpha", "Beta", "Gamma", "Delta")]
    drawn = hangul.survey(files, tmp_path)
    hangul.build(tmp_path / "hangul", hangul.faces_of(drawn), drawn, per_class=3, val_fraction=0.25)
    return tmp_path / "hangul"


def test_every_arm_is_a_config_the_launch_check_accepts(small_set, tmp_path):
    arms = bench.arms_named("all", 2048)
    assert len(arms) == 12 + 4 + 3 and len(set(arms)) == len(arms)

    class Args:
        data, out, images_seen, nproc, set = small_set, tmp_path / "runs", 3_000_000, 2, []

    for arm in arms:
        overrides = bench.run_overrides(arm, 1, Args)
        ran = dist_dml_here("check", str(bench.CONFIG), *overrides, "--world-size", "2")
        assert ran.returncode == 0, (arm, ran.stderr[-2000:])
        assert "[check] schedule:" in ran.stdout
    # The batch and the images seen: 8,192 images a step (2 ranks x 2,048 classes x 2 images), 366 steps.
    assert bench.arm_overrides("dws-b8192", 3_000_000, 2)[:3] == [
        "data.classes_per_batch=2048", "data.images_per_class=2", "train.steps=366"]
    for bad in ("dws-b130", "nosuch-b128", "dws"):
        with pytest.raises(ValueError, match="arm"):
            bench.arm_overrides(bad, 1000, 2)


def test_the_table_and_the_curve_come_from_the_results(tmp_path):
    rows = [{"arm": "dws-b128", "seed": 0, "recall_at_1": 0.5, "map_at_r": 0.2},
            {"arm": "dws-b128", "seed": 1, "recall_at_1": 0.7, "map_at_r": 0.4},
            {"arm": "dws-b512", "seed": 0, "recall_at_1": 0.6, "map_at_r": 0.3},
            {"arm": "dws-b512", "seed": 0, "recall_at_1": 0.65, "map_at_r": 0.35},  # the seed again: the last counts
            {"arm": "random-b128", "seed": 0, "recall_at_1": 0.3, "map_at_r": 0.1},
            {"arm": "memory-b128", "seed": 0, "recall_at_1": 0.4, "map_at_r": 0.15}]
    table = {t["arm"]: t for t in bench.summarise(rows)}
    assert table["dws-b128"]["recall_at_1"] == pytest.approx(0.6)
    assert table["dws-b128"]["recall_at_1_std"] == pytest.approx(0.1414213562)  # sample deviation of 0.5, 0.7
    assert table["dws-b512"]["seeds"] == 1 and table["dws-b512"]["recall_at_1"] == pytest.approx(0.65)
    assert table["dws-b512"]["r1_vs_baseline"] == pytest.approx(0.65 / 0.6 - 1)  # relative to dws-b128's mean
    assert bench.summarise(rows[4:])[0]["r1_vs_baseline"] is None  # no baseline among the results
    bench.write_table(list(table.values()), tmp_path)
    text = (tmp_path / "table.md").read_text()
    assert "| dws-b128 | 2 | 0.6000 ± 0.1414 | 0.3000 ± 0.1414 | +0.0 % |" in text
    assert "| dws-b512 | 1 | 0.6500 | 0.3500 | +8.3 % |" in text  # one seed: no deviation shown
    # the curves first, each by batch, then the other arms
    assert [t["arm"] for t in bench.summarise(rows[::-1])] == ["dws-b128", "dws-b512", "random-b128", "memory-b128"]
    plot = bench.plot_curve(list(table.values()), tmp_path / "curve.png")
    assert plot is not None and plot.stat().st_size > 1000
    assert bench.plot_curve([table["memory-b128"]], tmp_path / "none.png") is None  # no curve arm: no plot
    json.dumps(list(table.values()))  # plain values


def test_the_report_reads_only_the_runs_at_its_budget(tmp_path, capsys):
    """--report trains nothing and tables the finished arms at --images-seen only: a shorter trial's results in the
    same folder do not mix with the study's."""
    rows = [{"arm": "dws-b128", "seed": 0, "recall_at_1": 0.5, "map_at_r": 0.2, "images_seen": 1000},
            {"arm": "dws-b128", "seed": 0, "recall_at_1": 0.9, "map_at_r": 0.6, "images_seen": 64},
            {"arm": "dws-b512", "seed": 0, "recall_at_1": 0.55, "map_at_r": 0.25, "images_seen": 1000}]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench.main(["--report", "--images-seen", "1000", "--out", str(tmp_path)])
    text = (tmp_path / "table.md").read_text()
    assert "| dws-b128 | 1 | 0.5000 | 0.2000 | +0.0 % |" in text
    assert "| dws-b512 | 1 | 0.5500" in text and (tmp_path / "curve.png").is_file()
    with pytest.raises(SystemExit, match="no results at 5 images"):
        bench.main(["--report", "--images-seen", "5", "--out", str(tmp_path)])


def test_the_throughput_mode_reads_an_epoch_and_evaluates_the_whole_test_split(small_set, capsys):
    bench.main(["--throughput", "--data", str(small_set), "--set", "data.classes_per_batch=2", "eval.batch_size=8"])
    out = capsys.readouterr().out
    for workers in (1, 2):
        assert f"reader workers={workers} images_s=" in out
    # the test split: 4 held-out syllables x 3 images, every one embedded and searched
    assert "evaluation split=test images=12 " in out


def test_a_finished_run_is_read_only_at_its_own_budget(tmp_path, monkeypatch):
    """An arm's run at 240,000 images is not the result of the same arm at 960,000 (another folder, trained); a
    finished run whose steps are not the arm's is refused, not read."""
    class Args:
        data, out, images_seen, nproc, set = tmp_path / "data", tmp_path, 240_000, 2, []

    assert bench.run_name("dws-b128", 0, 240_000) == "dws-b128-240k-seed0"
    assert bench.run_name("dws-b128", 1, 960_000) == "dws-b128-960k-seed1" != bench.run_name("dws-b128", 1, 240_000)
    assert f"train.output_dir={tmp_path / 'dws-b512-240k-seed2'}" in bench.run_overrides("dws-b512", 2, Args)
    finished = tmp_path / "dws-b512-240k-seed0"
    finished.mkdir()
    (finished / "results.json").write_text(json.dumps({"steps": 468, "trained": {}}))
    assert bench.train("dws-b512", 0, Args)["steps"] == 468  # 240,000 // 512: read, not trained
    launched = []
    monkeypatch.setattr(bench.subprocess, "call", lambda cmd, **kw: launched.append(cmd) or 1)
    Args.images_seen = 960_000
    with pytest.raises(SystemExit, match="failed"):  # another budget: a training of its own (here a failing one)
        bench.train("dws-b512", 0, Args)
    assert f"train.output_dir={tmp_path / 'dws-b512-960k-seed0'}" in launched[0]
    (finished / "results.json").write_text(json.dumps({"steps": 117, "trained": {}}))
    Args.images_seen = 240_000
    with pytest.raises(SystemExit, match="a finished run of 117 steps, where this arm takes 468"):
        bench.train("dws-b512", 0, Args)
