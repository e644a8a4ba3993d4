"""The `dist-dml` entry point: prep, train, demo."""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


def demo_command(args: argparse.Namespace) -> int:
    """Synthetic shards, a short training on CPU processes, Recall@1 before and after."""
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
           f"--master_port={_free_port()}", "-m", "dist_dml.cli", "train", str(config),
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

    from data_prep.cli import build_parser as prep_parser, run as prep_run

    p = sub.add_parser("prep", help="convert a dataset (or synthesise one) to class-grouped shards")
    prep_parser(p)
    p.set_defaults(func=prep_run)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
