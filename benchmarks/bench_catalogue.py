"""The catalogue regime on one machine: retrieval of ~3,700 held-out classes after training on ~7,000, and how it
moves with the global batch, the sampler, class-level batches, the memory and class centres.

    python benchmarks/bench_catalogue.py [--arms dws-b128,dws-b512,...|curve|all] [--seeds 0,1,2]
                                         [--images-seen 3000000] [--nproc 2] [--out runs/catalogue]

The set: the 11,172 Hangul syllables in Debian's Korean fonts (data_prep/hangul.py, made first where missing:
about 7 minutes); the recipe: configs/catalogue_cnn.yaml (a small CNN from scratch at 32 px, P x K with K = 2,
Adam at 1e-3 for a global batch of 128 and the square-root rule above it, cosine schedule, the model chosen by
R@1 on the validation classes every 10 % of the run). Every arm sees the same number of images (--images-seen):
a larger global batch takes fewer steps. Arms (a name is ARM-bBATCH, the global batch in images):

    dws-bB        margin loss + distance-weighted sampling (the paper's recipe), B in 128, 512, 2048, 8192
    semihard-bB   triplet loss + semi-hard negatives (FaceNet's baseline)
    random-bB     contrastive loss + random negatives
    classS-bB     dws-bB + class-level batches at share S (0.25, 0.5), at 128 and at --best-batch
    memory-b128   dws-b128 + the cross-batch memory (the guide's recipe: 8,192 items, mode add, beta false, from
                  half the run): XBM's claim is that a memory recovers the large batch's gain at a small one
    proxy_anchor-bB, arcface-bB   dws-bB + Proxy-Anchor beside the pairs; ArcFace alone (loss.weight=0)

`--arms curve` runs the three samplers at every batch, `all` every arm. Each arm x budget x seed is a training under
the usual launcher into OUT/ARM-NNNk-seedS (dws-b128-3000k-seed0; a rerun resumes an unfinished one from its
checkpoints and reads a finished one), one MLflow run each (OUT/mlflow.db, experiment 'catalogue'); each result is
appended to OUT/results.jsonl.
At the end: a table of the test split's R@1 and MAP@R, mean ± standard deviation over the seeds, per arm
(OUT/table.md, OUT/table.csv), and R@1 against the global batch, a line per sampler (OUT/curve.png).
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "catalogue_cnn.yaml"
BATCHES = (128, 512, 2048, 8192)
K = 2  # data.images_per_class
# sampler arms: (loss, sampler) and the label of their line
SAMPLERS = {"dws": ("margin", "distance_weighted", "margin + distance-weighted"),
            "semihard": ("triplet", "semi_hard", "triplet + semi-hard"),
            "random": ("contrastive", "random", "contrastive + random")}


def arm_steps(arm: str, images_seen: int) -> int:
    """The steps an arm (NAME-bBATCH) takes to see ``images_seen`` images."""
    return max(1, images_seen // int(arm.rpartition("-b")[2]))


def arm_overrides(arm: str, images_seen: int, nproc: int) -> list[str]:
    """The config overrides of an arm (its global batch, steps and method; the seed and folders are added later)."""
    name, _, batch = arm.rpartition("-b")
    if not batch.isdigit() or int(batch) % (nproc * K):
        raise ValueError(f"arm {arm!r}: expected NAME-bBATCH with BATCH a multiple of {nproc * K}")
    batch = int(batch)
    steps = arm_steps(arm, images_seen)
    own = [f"data.classes_per_batch={batch // (nproc * K)}", f"data.images_per_class={K}", f"train.steps={steps}"]
    if name in SAMPLERS:
        loss, sampler, _ = SAMPLERS[name]
        return own + [f"loss.kind={loss}", f"sampler.kind={sampler}"]
    if name.startswith("class"):
        return own + [f"class_sampling.share={float(name[len('class'):])}", "class_sampling.refresh_steps=10"]
    if name == "memory":
        return own + ["memory.size=8192", "memory.mode=add", "memory.beta=false", f"memory.start_step={steps // 2}"]
    if name == "proxy_anchor":
        return own + ["proxy.kind=proxy_anchor"]
    if name == "arcface":
        return own + ["proxy.kind=arcface", "loss.weight=0"]
    raise ValueError(f"arm {arm!r}: unknown (see the module's docstring)")


def arms_named(spec: str, best_batch: int) -> list[str]:
    curve = [f"{s}-b{b}" for s in SAMPLERS for b in BATCHES]
    others = [f"class{share}-b{b}" for share in ("0.25", "0.5") for b in sorted({128, best_batch})]
    others += ["memory-b128", "proxy_anchor-b128", "arcface-b128"]
    named = {"curve": curve, "all": curve + others}
    return [a for part in spec.split(",") for a in named.get(part, [part])]


def run_name(arm: str, seed: int, images_seen: int) -> str:
    """An arm's run at one budget and seed (its folder, log and MLflow run): a run at another budget is another run."""
    return f"{arm}-{images_seen // 1000}k-seed{seed}" if images_seen % 1000 == 0 else f"{arm}-{images_seen}-seed{seed}"


def run_overrides(arm: str, seed: int, args) -> list[str]:
    name = run_name(arm, seed, args.images_seen)
    out = args.out / name
    return [f"data.root={args.data / 'shards'}", *arm_overrides(arm, args.images_seen, args.nproc),
            f"train.seed={seed}", f"data.seed={seed}", f"sampler.seed={seed}", f"train.output_dir={out}",
            f"train.name=catalogue-{name}", f"tracking.uri=sqlite:///{args.out.resolve() / 'mlflow.db'}",
            "tracking.experiment=catalogue", f"tracking.run_name={name}", "tracking.log_model=false",
            *args.set]


def train(arm: str, seed: int, args) -> dict:
    out = args.out / run_name(arm, seed, args.images_seen)
    steps = arm_steps(arm, args.images_seen)
    if (out / "results.json").is_file():
        results = json.loads((out / "results.json").read_text())
        if results.get("steps") != steps:
            raise SystemExit(f"[catalogue] {out}: a finished run of {results.get('steps')} steps, where this arm "
                             f"takes {steps}; move it away to train it again")
        print(f"[catalogue] {out.name}: finished before, read", flush=True)
        return results
    overrides = run_overrides(arm, seed, args)
    cmd = [sys.executable, "-m", "dist_dml.launch", f"--nproc_per_node={args.nproc}", "-m", "dist_dml.cli", "train",
           str(CONFIG), *overrides]
    print(f"[catalogue] {out.name}: training ({' '.join(arm_overrides(arm, args.images_seen, args.nproc))}); "
          f"{args.images_seen:,} images, about {max(1, round(args.images_seen / 60_000))} min on 2 CPU cores "
          f"(~1,000 images/s with its validations); log {out}.log", flush=True)
    started = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{out}.log", "a") as f:
        code = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"[catalogue] {out.name} failed (exit {code}); its log: {out}.log")
    results = json.loads((out / "results.json").read_text())
    row = {"arm": arm, "seed": seed, "recall_at_1": results["trained"]["recall_at_1"],
           "map_at_r": results["trained"]["map_at_r"], "best_step": results.get("best_step"),
           "steps": results["steps"], "images_seen": args.images_seen, "wall_s": round(time.time() - started)}
    with open(args.out / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"[catalogue] {out.name}: R@1={row['recall_at_1']:.4f} MAP@R={row['map_at_r']:.4f} in {row['wall_s']} s",
          flush=True)
    return results


def summarise(rows: list[dict], baseline: str = "dws-b128") -> list[dict]:
    """Per arm: R@1 and MAP@R mean and standard deviation over its seeds (the last result of each seed), and its
    R@1 relative to the baseline arm's mean (the issue's question: a gain of 10 %, larger than twice the two arms'
    deviations, both over 3 seeds)."""
    by_arm: dict[str, dict[int, dict]] = {}
    for row in rows:
        by_arm.setdefault(row["arm"], {})[row["seed"]] = row
    table = []
    for arm, seeds in by_arm.items():
        entry = {"arm": arm, "seeds": len(seeds)}
        for metric in ("recall_at_1", "map_at_r"):
            values = [r[metric] for r in seeds.values()]
            entry[metric] = statistics.fmean(values)
            entry[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        table.append(entry)
    families = [*SAMPLERS, "class", "memory", "proxy_anchor", "arcface"]

    def order(entry):
        name, _, batch = entry["arm"].rpartition("-b")
        family = next((i for i, f in enumerate(families) if name.startswith(f)), len(families))
        return family, name, int(batch) if batch.isdigit() else 0

    table.sort(key=order)  # the samplers' curves first, each by batch, then the other arms
    base = next((t for t in table if t["arm"] == baseline), None)
    for entry in table:
        entry["r1_vs_baseline"] = entry["recall_at_1"] / base["recall_at_1"] - 1 if base else None
    return table


def plot_curve(table: list[dict], path: Path) -> Path | None:
    """R@1 against the global batch (log scale), a line per sampler with the seeds' standard deviation as bars;
    None where no curve arm has a result."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = {}
    for entry in table:
        name, _, batch = entry["arm"].rpartition("-b")
        if name in SAMPLERS:
            lines.setdefault(name, []).append((int(batch), entry["recall_at_1"], entry["recall_at_1_std"]))
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in lines.items():
        points.sort()
        ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o",
                    capsize=3, label=SAMPLERS[name][2])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("global batch (images)")
    ax.set_ylabel("R@1, held-out classes")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_table(table: list[dict], out: Path) -> None:
    with open(out / "table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    def versus(t):
        return "" if t["r1_vs_baseline"] is None else f"{100 * t['r1_vs_baseline']:+.1f} %"

    def value(t, metric):  # the deviation where there is one (more than one seed)
        return f"{t[metric]:.4f}" + (f" ± {t[metric + '_std']:.4f}" if t["seeds"] > 1 else "")

    lines = ["| arm | seeds | R@1 | MAP@R | R@1 vs dws-b128 |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {t['arm']} | {t['seeds']} | {value(t, 'recall_at_1')} | {value(t, 'map_at_r')} | {versus(t)} |"
              for t in table]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def ensure_data(data: Path) -> None:
    if not (data / "shards" / "manifest.json").is_file():
        print(f"[catalogue] no Hangul set in {data}: making it (python -m data_prep.hangul; fonts fetched once, then "
              "about 7 min)", flush=True)
        subprocess.run([sys.executable, "-m", "data_prep.hangul", "--out", str(data)], cwd=ROOT, check=True)


def throughput(args) -> None:
    """The set's reader and evaluation at this size, one process with one thread as a rank runs here:
    the training reader's images/s (the recipe's P x K at 32 px, 1 and 2 workers, steady state over an epoch after a
    first one) and a whole evaluation of the test split (embedding, the exact search, R@K, MAP@R and NMI) by the
    recipe's model, untrained (the cost does not depend on the weights)."""
    import dataclasses

    import torch

    from dist_dml.config import load_config
    from dist_dml.data import TrainStream
    from dist_dml.infra.distributed import DistContext
    from dist_dml.models.embedding import build_model
    from dist_dml.retrieval.evaluation import evaluate

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_data import best_rate, steady_epoch

    torch.set_num_threads(1)
    cfg = load_config(CONFIG, [f"data.root={args.data / 'shards'}", *args.set])
    for workers in (1, 2):
        stream = TrainStream(dataclasses.replace(cfg.data, workers=workers))
        steady_epoch(stream)  # the first epoch pays the workers' start-up
        rate = best_rate(2, lambda: steady_epoch(stream))
        print(f"reader workers={workers} images_s={rate:.0f} (P x K = {cfg.data.classes_per_batch} x "
              f"{cfg.data.images_per_class} at {cfg.data.image_size} px, the best of 2 epochs after a first)",
              flush=True)
    torch.manual_seed(0)
    model = build_model(cfg.model, image_size=cfg.data.image_size).eval()
    start = time.perf_counter()
    metrics, _ = evaluate(model, cfg.data, cfg.eval, DistContext())
    seconds = time.perf_counter() - start
    images = int(metrics["images_evaluated"])
    print(f"evaluation split={cfg.eval.split} images={images:,} eval_s={seconds:.1f} images_s={images / seconds:.0f} "
          f"(embedding, search and metrics, one process)", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default="curve")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--images-seen", type=int, default=3_000_000)
    parser.add_argument("--best-batch", type=int, default=2048, help="the batch the class arms also run at")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "hangul")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "catalogue")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every arm")
    parser.add_argument("--report", action="store_true",
                        help="train nothing: the table and the plot of every arm finished at --images-seen")
    parser.add_argument("--throughput", action="store_true",
                        help="train nothing: the set's reader and evaluation rates at this size (about 2 min)")
    args = parser.parse_args(argv)
    if args.throughput:
        ensure_data(args.data)
        print("[catalogue] the reader over 3 epochs at 1 and 2 workers, then an evaluation of the test split: "
              "about 2 min", flush=True)
        throughput(args)
        return
    if args.report:
        report(args, None)
        return
    arms = arms_named(args.arms, args.best_batch)
    for arm in arms:
        arm_overrides(arm, args.images_seen, args.nproc)  # an unknown arm stops before any training
    ensure_data(args.data)
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"[catalogue] {len(arms)} arms x {len(seeds)} seeds into {args.out}", flush=True)
    for arm in arms:
        for seed in seeds:
            train(arm, seed, args)
    report(args, arms)


def report(args, arms: list[str] | None) -> None:
    """The table and the plot of the arms' results at --images-seen (of every arm where arms is None)."""
    results = args.out / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()] if results.is_file() else []
    rows = [r for r in rows if r.get("images_seen", args.images_seen) == args.images_seen
            and (arms is None or r["arm"] in arms)]
    if not rows:
        raise SystemExit(f"[catalogue] no results at {args.images_seen:,} images seen in {results}")
    table = summarise(rows)
    write_table(table, args.out)
    plot = plot_curve(table, args.out / "curve.png")
    print(f"[catalogue] table: {args.out / 'table.md'}" + (f"; curve: {plot}" if plot else ""), flush=True)


if __name__ == "__main__":
    main()
