"""`dist-dml grid`: the paper's question on a user's data in one command — which loss, which sampler, with or
without memory — as a grid of trainings.

    dist-dml grid configs/sop_resnet50.yaml --losses margin,triplet,contrastive \\
        --samplers distance_weighted,semi_hard,random --seeds 0,1 --set memory.size=0,65536 [--nproc 8] [overrides]

Each cell is a training of the config with its loss, sampler, seed (train.seed, data.seed and sampler.seed)
and --set values, run one after another under the usual launcher (python -m dist_dml.launch with --nproc
processes; a one-process cell runs as itself), into OUTPUT/cells/NAME, as an MLflow child run of the grid's run. A cell already finished is
skipped when the grid runs again; a failed cell is reported and the grid goes on. The grid ends with a
table over seeds (mean ± standard deviation of R@K, MAP@R, R-Precision per cell), printed, logged to the
grid's run and written as OUTPUT/table.csv and table.md, with a plot of R@1 per cell (OUTPUT/r_at_1.png).
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dist_dml.errors import UserError

METRICS = ("recall_at_1", "map_at_r", "r_precision")


@dataclass(frozen=True)
class Cell:
    loss: str
    sampler: str
    seed: int
    settings: tuple[tuple[str, str], ...]  # (section.key, value) of the --set axes

    @property
    def group(self) -> str:
        """The cell without its seed: what the table's rows are."""
        extra = "".join(f" {key}={value}" for key, value in self.settings)
        return f"{self.loss} / {self.sampler}{extra}"

    @property
    def name(self) -> str:
        extra = "".join(f"-{key.split('.')[-1]}{value}" for key, value in self.settings)
        return f"{self.loss}-{self.sampler}{extra}-seed{self.seed}".replace("_", "-")

    def overrides(self) -> list[str]:
        return [f"loss.kind={self.loss}", f"sampler.kind={self.sampler}", f"train.seed={self.seed}",
                f"data.seed={self.seed}", f"sampler.seed={self.seed}", *(f"{k}={v}" for k, v in self.settings)]


def cells(losses: list[str], samplers: list[str], seeds: list[int], settings: dict[str, list[str]]) -> list[Cell]:
    axes = [[(key, value) for value in values] for key, values in settings.items()]
    return [Cell(loss, sampler, seed, tuple(extra)) for loss, sampler, *extra, seed in
            itertools.product(losses, samplers, *axes, seeds)]


def parse_settings(items: list[str]) -> dict[str, list[str]]:
    """--set section.key=v1,v2 (repeatable) -> {section.key: [v1, v2]}."""
    out = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or "." not in key or not values:
            raise UserError(f"--set {item!r}: expected section.key=value1,value2")
        out[key] = values.split(",")
    return out


def run_grid(args: argparse.Namespace) -> int:
    from dist_dml.config import ConfigError, load_config

    settings = parse_settings(args.set or [])
    grid = cells(_names(args.losses), _names(args.samplers), [int(s) for s in _names(args.seeds)], settings)
    try:  # every cell's config, checked before the first training starts
        base = load_config(args.config, args.overrides)
        for cell in grid:
            load_config(args.config, [*args.overrides, *cell.overrides()])
    except ConfigError as exc:
        raise UserError(f"grid: {exc}") from None
    out = Path(args.output or f"runs/{base.train.name}-grid")
    out.mkdir(parents=True, exist_ok=True)
    tracker = _parent_run(base, out)
    print(f"[grid] {len(grid)} cells ({len(_names(args.losses))} losses x {len(_names(args.samplers))} samplers"
          + "".join(f" x {len(v)} {k}" for k, v in settings.items()) + f" x {len(_names(args.seeds))} seeds), one after "
          f"another on {args.nproc} process(es), into {out / 'cells'}; each takes as long as its training", flush=True)
    results, failed, status = {}, [], "FAILED"
    try:
        for i, cell in enumerate(grid, 1):
            results[cell], problem = _run_cell(args, base, cell, out, tracker.run_id, i, len(grid))
            if problem:
                failed.append((cell, problem))
        for path in _write(table(results, base.eval.recall_ks), out):
            tracker.log_artifact(path, "grid")
        status = "FINISHED"
    finally:
        tracker.close(status)
    if failed:
        print(f"[grid] {len(failed)} of {len(grid)} cells failed: " + "; ".join(f"{c.name}: {p}" for c, p in failed),
              file=sys.stderr, flush=True)
    return 2 if failed else 0


def _names(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def _run_cell(args, base, cell: Cell, out: Path, parent: str | None, i: int, n: int) -> tuple[dict | None, str | None]:
    """(the cell's final metrics, why it failed): from its results.json if it finished before."""
    folder = out / "cells" / cell.name
    done = _finished(folder)
    if done is not None:
        print(f"[grid] {i}/{n} {cell.name}: finished before, skipped", flush=True)
        return done, None
    overrides = [*args.overrides, *cell.overrides(), f"train.output_dir={folder}", f"train.name={cell.name}",
                 f"tracking.experiment={base.tracking.experiment}", f"tracking.run_name={cell.name}",
                 *([f"tracking.parent_run_id={parent}"] if parent else [])]
    cmd = [sys.executable, *cell_launcher(args.nproc), "train", args.config, *overrides]
    print(f"[grid] {i}/{n} {cell.name}: training ({' '.join(cell.overrides())})", flush=True)
    started = time.time()
    code = subprocess.call(cmd)
    done = _finished(folder)
    if code != 0 or done is None:
        return done, f"exit code {code}" + ("" if done is None else " (its results are kept)")
    print(f"[grid] {i}/{n} {cell.name}: R@1={done.get('recall_at_1', float('nan')):.4f} in "
          f"{time.time() - started:.0f} s", flush=True)
    return done, None


def cell_launcher(nproc: int) -> list[str]:
    """How a cell starts: under the launcher (torchrun, restarting only on a crash) for several processes; one
    process is started as itself, what torchrun would start without its ~4 s of start-up per cell."""
    if nproc == 1:
        return ["-m", "dist_dml.cli"]
    return ["-m", "dist_dml.launch", f"--nproc_per_node={nproc}", "-m", "dist_dml.cli"]


def _finished(folder: Path) -> dict | None:
    try:
        results = json.loads((folder / "results.json").read_text())
    except (OSError, ValueError):
        return None
    return results.get("trained") if isinstance(results, dict) else None


def _parent_run(base, out: Path):
    """The grid's tracker: its MLflow run, the same one when the grid runs again (a do-nothing tracker without
    tracking); the cells' runs are its children."""
    from dist_dml.distributed import DistContext
    from dist_dml.tracking import build_tracker

    saved = out / "grid.json"
    previous = json.loads(saved.read_text()).get("run_id") if saved.is_file() else None
    tracker = build_tracker(base.tracking, DistContext(), resume_run_id=previous)
    tracker.set_tag("dist_dml.grid", str(out))
    if tracker.run_id:
        saved.write_text(json.dumps({"run_id": tracker.run_id}))
    return tracker


def table(results: dict, ks) -> list[dict]:
    """One row per cell without its seed: each metric's mean and standard deviation over the seeds that
    finished, and how many did."""
    names = [f"recall_at_{k}" for k in ks] + [m for m in METRICS if m != "recall_at_1"]
    groups: dict[str, list[dict]] = {}
    for cell, metrics in results.items():
        groups.setdefault(cell.group, [])
        if metrics:
            groups[cell.group].append(metrics)
    rows = []
    for group, runs in groups.items():
        row = {"cell": group, "seeds": len(runs)}
        for name in names:
            values = [r[name] for r in runs if name in r]
            row[name] = statistics.fmean(values) if values else float("nan")
            row[f"{name}_std"] = statistics.pstdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def _write(rows: list[dict], out: Path) -> list[Path]:
    """The table as CSV and markdown (printed too) and the R@1 plot; their paths."""
    from dist_dml import plots

    names = [k for k in rows[0] if k not in ("cell", "seeds") and not k.endswith("_std")] if rows else []
    with open(out / "table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["cell"])
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| cell | seeds | " + " | ".join(n.replace("recall_at_", "R@") for n in names) + " |",
             "| --- | --- | " + " | ".join("---" for _ in names) + " |"]
    lines += [f"| {r['cell']} | {r['seeds']} | " + " | ".join(f"{r[n]:.4f} ± {r[n + '_std']:.4f}" for n in names)
              + " |" for r in rows]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    plot = plots.grid_recall(rows, out / "r_at_1.png")
    print(f"[grid] table: {out / 'table.md'} and {out / 'table.csv'}; R@1 per cell: {plot}", flush=True)
    return [out / "table.csv", out / "table.md", plot]


def add_parser(sub) -> None:
    p = sub.add_parser("grid", help="the paper's grid: losses x samplers x seeds (x --set axes) as child runs")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="section.key=value for every cell")
    p.add_argument("--losses", default="margin", help="comma-separated loss.kind values")
    p.add_argument("--samplers", default="distance_weighted", help="comma-separated sampler.kind values")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (train, data and sampler)")
    p.add_argument("--set", action="append", help="section.key=v1,v2: one more axis (repeatable)")
    p.add_argument("--nproc", type=int, default=1, help="processes per training (torchrun's --nproc_per_node)")
    p.add_argument("--output", help="the grid's folder (default runs/NAME-grid)")
    p.set_defaults(func=run_grid)
