"""`dist-dml grid`: the paper's question on a user's data in one command — which loss, which sampler, with or
without memory — as a grid of trainings.

    dist-dml grid configs/sop_resnet50.yaml --losses margin,triplet,contrastive \\
        --samplers distance_weighted,semi_hard,random --seeds 0,1 --set memory.size=0,65536 [--nproc 8] [overrides]

Each cell is a training of the config with its loss, sampler, seed (train.seed, data.seed and sampler.seed)
and --set values, run one after another under the usual launcher (python -m dist_dml.launch with --nproc
processes; a one-process cell runs as itself), into OUTPUT/cells/NAME, as an MLflow child run of the grid's run. A cell already finished is
skipped when the grid runs again; a failed cell is reported, the grid goes on and exits 2 at its end. The grid
ends with a table over seeds (the cell's margin alpha and beta, mean ± standard deviation of R@K, MAP@R,
R-Precision per cell), printed, logged to the grid's run and written as OUTPUT/table.csv and table.md, with a
plot of R@1 per cell (OUTPUT/r_at_1.png).

A loss axis compares each loss at its own margin: a loss other than the config's takes its own default alpha
(margin and triplet 0.2, contrastive 1.0), not the alpha the config chose for its loss, unless the overrides
or a --set axis name loss.alpha; a loss without beta (triplet, contrastive) trains with the config's beta
settings off, and the table says so.

The losses against class centres are on the same axis, each at its paper's constants unless the overrides or a
--set axis name proxy.scale / proxy.margin: a centre loss alone (proxy_anchor, norm_softmax, cosface, arcface:
proxy.kind=K, loss.weight=0; the config's pair loss still samples and logs its pairs, which train nothing, so
one sampler stands for all), or beside a pair loss (margin+arcface: both, weight 1 each). A pair loss alone
is alone: proxy.kind=none where the config turns centres on. The table's centres column says which centres a
row trained, with their constants.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dist_dml.infra.errors import UserError
from dist_dml.infra.files import write_atomically

METRICS = ("recall_at_1", "map_at_r", "r_precision")
LABELS = ("cell", "alpha", "beta", "centres", "seeds")  # the table's columns besides the metrics


def loss_parts(loss: str) -> tuple[str, str]:
    """(pair loss, centre loss) of a loss axis value, "" for none: margin, arcface, margin+arcface."""
    from dist_dml.method.proxies import KINDS

    pair, _, centre = loss.partition("+")
    return ("", pair) if pair in KINDS and not centre else (pair, centre)


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
        paired = loss_parts(self.loss)[0]
        return f"{self.loss} / {self.sampler}{extra}" if paired else f"{self.loss} alone{extra}"

    @property
    def name(self) -> str:
        extra = "".join(f"-{key.split('.')[-1]}{value}" for key, value in self.settings)
        sampler = f"-{self.sampler}" if loss_parts(self.loss)[0] else ""
        # A plain name (a folder, train.name): a value that is a path or holds odd characters is kept readable.
        return re.sub(r"[^A-Za-z0-9.-]+", "-", f"{self.loss}{sampler}{extra}-seed{self.seed}").strip("-.")

    def overrides(self, base_loss=None, alpha_named: bool = False, base_proxy=None) -> list[str]:
        """The cell's overrides of the grid's config. With ``base_loss`` (the config's loss section): a loss other
        than the config's own takes its own default margin (DEFAULT_MARGINS), not the margin the config chose for
        its loss, unless the grid's overrides or a --set axis name loss.alpha (``alpha_named``); and a loss
        without beta leaves the config's beta settings off (they apply to the margin loss only). A centre loss sets
        proxy.kind (and loss.weight 0 where it trains alone); a pair loss alone turns ``base_proxy``'s centres off."""
        from dist_dml.method.losses import DEFAULT_MARGINS

        pair, centre = loss_parts(self.loss)
        own = [f"sampler.kind={self.sampler}", f"train.seed={self.seed}", f"data.seed={self.seed}",
               f"sampler.seed={self.seed}"]
        if centre:
            own += [f"proxy.kind={centre}", f"loss.weight={1.0 if pair else 0.0}"]
        elif base_proxy is not None and base_proxy.enabled:
            own.append("proxy.kind=none")
        if not pair:  # the config's pair loss samples and logs; its beta tables would learn nothing
            own += ["loss.beta_per_class=false", "loss.beta_per_image=false", "loss.nu=0.0"]
        elif base_loss is not None and pair != base_loss.kind:
            own.insert(0, f"loss.kind={pair}")
            if not alpha_named and pair in DEFAULT_MARGINS:
                own.append(f"loss.alpha={DEFAULT_MARGINS[pair]}")
            if pair != "margin":
                own += ["loss.beta_per_class=false", "loss.beta_per_image=false", "loss.nu=0.0"]
        else:
            own.insert(0, f"loss.kind={pair}")
        return own + [f"{k}={v}" for k, v in self.settings]  # last: an axis wins (beta on a triplet cell is refused)


def cells(losses: list[str], samplers: list[str], seeds: list[int], settings: dict[str, list[str]]) -> list[Cell]:
    axes = [[(key, value) for value in values] for key, values in settings.items()]
    # A centre loss alone trains no pairs: the first sampler stands for all (it only logs the pairs).
    return [Cell(loss, sampler, seed, tuple(extra)) for loss, sampler, *extra, seed in
            itertools.product(losses, samplers, *axes, seeds) if loss_parts(loss)[0] or sampler == samplers[0]]


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
    losses, samplers, seeds = _axes(args)
    grid = cells(losses, samplers, seeds, settings)
    if len({cell.name for cell in grid}) < len(grid):
        raise UserError("two cells would share a folder name (their --set values differ only in characters "
                        "a folder name cannot hold): " + ", ".join(sorted({c.name for c in grid if
                                                                          [d.name for d in grid].count(c.name) > 1})))
    try:  # every cell's config, checked before the first training starts
        base = load_config(args.config, args.overrides)
        alpha_named = "loss.alpha" in settings or any(o.startswith("loss.alpha=") for o in args.overrides)
        own = {cell: cell.overrides(base.loss, alpha_named, base.proxy) for cell in grid}
        configs = {cell: load_config(args.config, [*args.overrides, *own[cell]]) for cell in grid}
    except ConfigError as exc:
        raise UserError(f"{exc}") from None
    out = Path(args.output or f"runs/{base.train.name}-grid")
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    tracker = _parent_run(base, out)
    print(f"[grid] {len(grid)} cells ({len(losses)} losses x {len(samplers)} samplers"
          + "".join(f" x {len(v)} {k}" for k, v in settings.items()) + f" x {len(seeds)} seeds), one after "
          f"another on {args.nproc} process(es), into {out / 'cells'}; each takes as long as its training", flush=True)
    results, failed, status = {}, [], "FAILED"
    try:
        for i, cell in enumerate(grid, 1):
            results[cell], problem = _run_cell(args, base, cell, own[cell], out, tracker.run_id, i, len(grid))
            if problem:
                failed.append((cell, problem))
        for path in _write(table(results, base.eval.recall_ks, configs), out):
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


def _axes(args: argparse.Namespace) -> tuple[list[str], list[str], list[int]]:
    """(losses, samplers, seeds) of the command line, each non-empty; and --nproc checked."""
    losses, samplers, seeds = _names(args.losses), _names(args.samplers), _names(args.seeds)
    for flag, values in (("--losses", losses), ("--samplers", samplers), ("--seeds", seeds)):
        if not values:
            raise UserError(f"{flag} names no value: give a comma-separated list")
    if not all(s.isdigit() for s in seeds):
        raise UserError(f"--seeds {args.seeds!r}: expected comma-separated whole numbers, e.g. 0,1,2")
    if args.nproc < 1:
        raise UserError(f"--nproc must be >= 1 (processes per training), got {args.nproc}")
    return losses, samplers, [int(s) for s in seeds]


def _run_cell(args, base, cell: Cell, own: list[str], out: Path, parent: str | None, i: int,
              n: int) -> tuple[dict | None, str | None]:
    """(the cell's final metrics, why it failed): from its results.json if it finished before. ``own``: the
    cell's overrides (Cell.overrides)."""
    folder = out / "cells" / cell.name
    done = _finished(folder)
    if done is not None:
        print(f"[grid] {i}/{n} {cell.name}: finished before, skipped", flush=True)
        return done, None
    overrides = [*args.overrides, *own, f"train.output_dir={folder}", f"train.name={cell.name}",
                 f"tracking.experiment={base.tracking.experiment}", f"tracking.run_name={cell.name}",
                 *([f"tracking.parent_run_id={parent}"] if parent else [])]
    cmd = [sys.executable, *cell_launcher(args.nproc), "train", args.config, *overrides]
    print(f"[grid] {i}/{n} {cell.name}: training ({' '.join(own)})", flush=True)
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
    process is started as itself, what torchrun would start, without its seconds of start-up per cell."""
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
    from dist_dml.infra.distributed import DistContext
    from dist_dml.train.tracking import build_tracker

    saved = out / "grid.json"
    previous = json.loads(saved.read_text()).get("run_id") if saved.is_file() else None
    tracker = build_tracker(base.tracking, DistContext(), resume_run_id=previous)
    tracker.set_tag("dist_dml.grid", str(out))
    if tracker.run_id:
        write_atomically(saved, json.dumps({"run_id": tracker.run_id}))
    return tracker


def table(results: dict, ks, configs: dict) -> list[dict]:
    """One row per cell without its seed: the margin alpha and the beta it trained with (``configs``: each
    cell's config), each metric's mean and standard deviation over the seeds that finished, and how many did."""
    from dist_dml.train.tracking import flat_metrics

    names = [f"recall_at_{k}" for k in ks] + [m for m in METRICS if m != "recall_at_1"]
    groups: dict[str, list[dict]] = {}
    losses, centres = {}, {}
    for cell, metrics in results.items():
        groups.setdefault(cell.group, [])
        losses[cell.group], centres[cell.group] = configs[cell].loss, configs[cell].proxy
        if metrics:
            groups[cell.group].append(flat_metrics(metrics))
    if any("pp_recall_at_1" in run for runs in groups.values() for run in runs):  # eval.postprocess: after, beside
        names += [f"pp_{n}" for n in names]
    rows = []
    for group, runs in groups.items():
        trained = losses[group].weight > 0
        row = {"cell": group, "alpha": f"{losses[group].alpha:g}" if trained else "—",
               "beta": _beta(losses[group]) if trained else "—", "centres": _centres(centres[group]), "seeds": len(runs)}
        for name in names:
            values = [r[name] for r in runs if name in r]
            row[name] = statistics.fmean(values) if values else float("nan")
            row[f"{name}_std"] = statistics.pstdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def _beta(loss) -> str:
    """The beta a cell's loss learns: its parts (global, class, image), or none (a loss without beta)."""
    if loss.kind != "margin":
        return "none"
    parts = [name for name, on in (("global", loss.beta_global), ("class", loss.beta_per_class),
                                   ("image", loss.beta_per_image)) if on]
    return "+".join(parts) or f"fixed {loss.beta_init}"


def _centres(proxy) -> str:
    """The centres a cell trained: their loss and its two constants, their weight if not 1; or none."""
    if not proxy.enabled:
        return "none"
    scale, margin = proxy.loss_config().resolved()
    names = ("α", "δ") if proxy.kind == "proxy_anchor" else ("s", "m")
    weight = f" ×{proxy.weight:g}" if proxy.weight != 1 else ""
    rate = f" sampled {proxy.sample_rate:g}" if proxy.sample_rate < 1 else ""
    return f"{proxy.kind} {names[0]}={scale:g} {names[1]}={margin:g}{weight}{rate}"


def _write(rows: list[dict], out: Path) -> list[Path]:
    """The table as CSV and markdown (printed too) and the R@1 plot; their paths."""
    from dist_dml.retrieval import plots

    names = [k for k in rows[0] if k not in LABELS and not k.endswith("_std")] if rows else []
    with open(out / "table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["cell"])
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| cell | α | β | centres | seeds | " + " | ".join(n.replace("recall_at_", "R@") for n in names) + " |",
             "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in names) + " |"]
    lines += [f"| {r['cell']} | {r['alpha']} | {r['beta']} | {r['centres']} | {r['seeds']} | "
              + " | ".join(f"{r[n]:.4f} ± {r[n + '_std']:.4f}" for n in names) + " |" for r in rows]
    write_atomically(out / "table.md", "\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    plot = plots.grid_recall(rows, out / "r_at_1.png")
    print(f"[grid] table: {out / 'table.md'} and {out / 'table.csv'}; R@1 per cell: {plot}", flush=True)
    return [out / "table.csv", out / "table.md", plot]
