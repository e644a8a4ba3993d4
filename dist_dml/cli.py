"""The `dist-dml` entry point."""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def demo(args: argparse.Namespace) -> int:
    """Start the core demo under torchrun with CPU processes (gloo)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
           f"--master_port={_free_port()}", "-m", "dist_dml.demo", "--steps", str(args.steps)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    print(f"[dist-dml] {' '.join(cmd[2:])}", flush=True)
    return subprocess.call(cmd, env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dist-dml", description="Distributed deep metric learning")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="train the core on synthetic data with CPU processes and show Recall@1")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=300)
    p.set_defaults(func=demo)
    from data_prep.cli import build_parser as prep_parser, run as prep_run

    p = sub.add_parser("prep", help="convert a dataset (or synthesise one) to class-grouped shards")
    prep_parser(p)
    p.set_defaults(func=prep_run)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
