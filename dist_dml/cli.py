"""The `dist-dml` entry point: prep, train, demo."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _config_path(name: str) -> Path:
    for base in (Path.cwd(), REPO):
        if (base / name).is_file():
            return base / name
    raise FileNotFoundError(f"{name}: not found in {Path.cwd()} or {REPO}")


def train_command(args: argparse.Namespace) -> int:
    """One process of a run (torchrun, srun or alone): validate the config, then train."""
    from dist_dml.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"dist-dml train: error: {exc}", file=sys.stderr)
        return 2
    from dist_dml.distributed import DistContext
    from dist_dml.trainer import train

    ctx = DistContext.from_env(device=cfg.train.device)
    try:
        train(cfg, ctx)
    finally:
        ctx.shutdown()
    return 0


def _on_checkpoint(args: argparse.Namespace, work) -> int:
    """Run ``work(model, config, context)`` for eval/embed: the checkpoint with its overrides, and a
    process group if launched, shut down afterwards. 2 (with the reason) on a bad checkpoint or config."""
    from dist_dml.config import ConfigError
    from dist_dml.distributed import DistContext
    from dist_dml.export import load_checkpoint

    try:
        model, cfg = load_checkpoint(args.checkpoint, args.overrides)
    except (ConfigError, FileNotFoundError, KeyError) as exc:
        print(f"dist-dml {args.command}: error: {exc}", file=sys.stderr)
        return 2
    ctx = DistContext.from_env(device=cfg.train.device)
    if ctx.world_size > 1:
        ctx.init_process_group(timeout_minutes=cfg.deepspeed.timeout_minutes)
    try:
        return work(model.to(ctx.device), cfg, ctx)
    finally:
        ctx.shutdown()


def eval_command(args: argparse.Namespace) -> int:
    """Retrieval metrics of a checkpoint on the configured evaluation split(s)."""
    from dist_dml.evaluation import evaluate

    def work(model, cfg, ctx) -> int:
        metrics, paths = evaluate(model, cfg.data, cfg.eval, ctx, progress=True, plots_dir=args.plots)
        if ctx.is_main:
            print(json.dumps(metrics, indent=1))
            if args.out:
                Path(args.out).write_text(json.dumps(metrics, indent=1))
            for path in paths:
                print(f"[eval] plot: {path}")
        return 0

    return _on_checkpoint(args, work)


def embed_command(args: argparse.Namespace) -> int:
    """Each rank writes the embeddings of its share of a split as one part."""
    from dist_dml.data import EvalStream
    from dist_dml.evaluation import embed_local
    from dist_dml.export import write_embeddings

    def work(model, cfg, ctx) -> int:
        stream = EvalStream(cfg.data, args.split, ctx.rank, ctx.world_size, cfg.eval.batch_size)
        paths = write_embeddings(*embed_local(model, stream, ctx, progress=True), Path(args.out), ctx.rank, args.format)
        ctx.barrier()
        print(f"[embed] rank {ctx.rank}: {', '.join(str(p) for p in paths)}")
        return 0

    return _on_checkpoint(args, work)


def index_command(args: argparse.Namespace) -> int:
    """A faiss index over exported embeddings, with the ids and labels beside it."""
    import numpy as np

    from dist_dml.export import read_embeddings
    from dist_dml.search import build_index, save_index

    emb, labels, ids = read_embeddings(Path(args.embeddings))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_index(build_index(emb, args.type, nlist=args.nlist, m=args.m), out / "index.faiss")
    np.save(out / "ids.npy", ids)
    np.save(out / "labels.npy", labels)
    meta = {"type": args.type, "count": int(len(ids)), "dim": int(emb.shape[1]),
            "checkpoint": str(Path(args.checkpoint).resolve()) if args.checkpoint else None}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    print(f"[index] {args.type} index of {len(ids)} embeddings in {out}")
    return 0


def search_command(args: argparse.Namespace) -> int:
    """The nearest indexed items of image files."""
    import numpy as np

    from dist_dml.export import embed_images, load_checkpoint
    from dist_dml.search import load_index

    folder = Path(args.index)
    meta = json.loads((folder / "meta.json").read_text())
    checkpoint = args.checkpoint or meta.get("checkpoint")
    if not checkpoint:
        print("dist-dml search: error: give --checkpoint (the index does not name one)", file=sys.stderr)
        return 2
    model, cfg = load_checkpoint(checkpoint)
    index = load_index(folder / "index.faiss")
    ids, labels = np.load(folder / "ids.npy"), np.load(folder / "labels.npy")
    scores, rows = index.search(embed_images(model, cfg, args.images).numpy(), args.k)
    for image, score_row, index_row in zip(args.images, scores, rows):
        print(f"{image}:")
        for rank, (score, row) in enumerate(zip(score_row, index_row), start=1):
            if row >= 0:
                print(f"  {rank:3d}. id={ids[row]} label={labels[row]} score={score:.4f}")
    return 0


def demo_command(args: argparse.Namespace) -> int:
    """Synthetic shards, a short training on CPU processes, Recall@1 before and after."""
    from dist_dml.distributed import free_port

    out = Path(args.output).resolve()
    data = out / "data"
    if not (data / "manifest.json").is_file():
        from data_prep.cli import main as prep

        print(f"[demo] writing synthetic products to {data}", flush=True)
        code = prep(["synthetic", "--classes", "500", "--test-classes", "150", "--per-class", "4:8",
                     "--size", "64", "--out", str(data)])
        if code:
            return code
    config = _config_path("configs/cpu_synthetic.yaml")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
           f"--master_port={free_port()}", "-m", "dist_dml.cli", "train", str(config),
           f"data.root={data}", f"train.output_dir={out}", "checkpoint.resume=none", *args.overrides]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    print(f"[demo] training with {args.nproc} CPU processes: {' '.join(cmd[2:])}", flush=True)
    code = subprocess.call(cmd, env=env)
    if code:
        return code
    results = json.loads((out / "results.json").read_text())
    before, after = results["untrained"]["recall_at_1"], results["trained"]["recall_at_1"]
    print(f"\nRecall@1 on held-out products: untrained {before:.3f}  ->  trained {after:.3f}")
    print(f"MLflow run: {results['mlflow']}")
    print(f"Model: {out / 'final_model.pt'}   checkpoints: {out / 'checkpoints'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dist-dml", description="Distributed deep metric learning")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (run under torchrun, srun, or alone)")
    p.add_argument("config", help="a YAML file under configs/")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.set_defaults(func=train_command)

    p = sub.add_parser("demo", help="synthetic data, 2 CPU processes, Recall@1 before and after training")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--output", default="runs/demo")
    p.add_argument("overrides", nargs="*", help="section.key=value for the training")
    p.set_defaults(func=demo_command)

    p = sub.add_parser("eval", help="retrieval metrics of a checkpoint (under torchrun: distributed extraction)")
    p.add_argument("checkpoint", help="OUTPUT/final_model.pt or OUTPUT/checkpoints/stepN")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.root=... eval.split=query,gallery")
    p.add_argument("--out", help="also write the metrics to this JSON file")
    p.add_argument("--plots", help="draw Recall@K and a retrieval grid into this folder")
    p.set_defaults(func=eval_command)

    p = sub.add_parser("embed", help="export the embeddings of a split (one part per rank)")
    p.add_argument("checkpoint")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--split", default="test")
    p.add_argument("--out", required=True)
    p.add_argument("--format", choices=["npy", "parquet"], default="npy")
    p.set_defaults(func=embed_command)

    p = sub.add_parser("index", help="build a faiss index over exported embeddings")
    p.add_argument("embeddings", help="a folder written by dist-dml embed")
    p.add_argument("--out", required=True)
    p.add_argument("--type", choices=["flat", "ivfpq"], default="flat")
    p.add_argument("--nlist", type=int, default=0, help="ivfpq lists (0: 4 sqrt(N))")
    p.add_argument("--m", type=int, default=16, help="ivfpq sub-quantizers")
    p.add_argument("--checkpoint", help="the model that made the embeddings (for dist-dml search)")
    p.set_defaults(func=index_command)

    p = sub.add_parser("search", help="the nearest indexed items of image files")
    p.add_argument("index", help="a folder written by dist-dml index")
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--checkpoint", help="default: the one the index names")
    p.set_defaults(func=search_command)

    from data_prep.cli import build_parser as prep_parser, run as prep_run

    p = sub.add_parser("prep", help="convert a dataset (or synthesise one) to class-grouped shards")
    prep_parser(p)
    p.set_defaults(func=prep_run)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
