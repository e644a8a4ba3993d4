"""The commands of a training: train, check, demo, config, setup, fetch-weights, grid. Each reads its arguments,
calls the library and prints; a refusal is a UserError, which `dist-dml` prints in one line (exit 2)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from dist_dml.infra.errors import UserError

REPO = Path(__file__).resolve().parents[2]


def config_path(name: str) -> Path:
    """A config shipped in the repository (configs/...), looked for in the current folder first."""
    for base in (Path.cwd(), REPO):
        if (base / name).is_file():
            return base / name
    raise UserError(f"{name}: not found in {Path.cwd()} or {REPO}")


def train_command(args: argparse.Namespace) -> int:
    """One process of a run (torchrun, srun or alone): validate the config and the resume, then train in the
    process group this command owns."""
    from dist_dml.config import load_config
    from dist_dml.infra.accelerator import configure
    from dist_dml.infra.distributed import DistContext, process_group
    from dist_dml.train.preflight import resume_refusal

    cfg = load_config(args.config, args.overrides)
    configure(cfg.train.device)
    ctx = DistContext.from_env(device=cfg.train.device)
    say = (lambda note: print(f"[train] warning: {note}", file=sys.stderr, flush=True)) if ctx.is_main else None
    resume_refusal(cfg, ctx.world_size, say)  # every rank refuses alike; rank 0 alone says the note
    from dist_dml.train.trainer import train

    with process_group(ctx, cfg.deepspeed.timeout_minutes):
        results = train(cfg, ctx)
    if ctx.is_main:
        _train_summary(cfg, results)
    from dist_dml.retrieval.evaluation import EvaluationIncomplete, evaluation_problem

    problem = evaluation_problem(results["trained"], cfg.eval)
    if problem:  # the model, checkpoints and results are written
        raise EvaluationIncomplete(f"the final evaluation {problem}")
    return 0


def _train_summary(cfg, results: dict) -> None:
    from dist_dml.retrieval.evaluation import format_metrics as shown

    out = Path(cfg.train.output_dir).resolve()
    print(f"\n[train] done: run {cfg.train.name!r}, {results['steps']} steps"
          f" ({results['skipped_steps']} skipped) on {results['world_size']} processes")
    if "untrained" in results:
        print(f"[train] untrained: {shown(results['untrained'])}")
    print(f"[train] trained:   {shown(results['trained'])}")
    faults = " ".join(f"{k}={v}" for k, v in results.get("data_faults", {}).items() if v)
    print(f"[train] data faults met in training: {faults or 'none'}")
    print(f"[train] model: {out / 'final_model.pt'}   checkpoints: {out / 'checkpoints'}   results: {out / 'results.json'}")
    print(f"[train] MLflow: {results['mlflow'] or 'tracking disabled'}", flush=True)


def check_command(args: argparse.Namespace) -> int:
    """The launch scripts' check before torchrun starts: config, data, resume, folder, weights, tracking."""
    from dist_dml.config import load_config
    from dist_dml.train.preflight import check_launch

    cfg = load_config(args.config, args.overrides)
    check_launch(cfg, args.world_size, args.ranks_per_node)
    print(f"[check] run {cfg.train.name!r}: output {cfg.train.output_dir}, MLflow experiment "
          f"{cfg.tracking.experiment!r}, {args.world_size} processes", flush=True)
    return 0


def fetch_weights_command(args: argparse.Namespace) -> int:
    """Download a config's backbone weights into the local cache (TORCH_HOME / HF_HOME), on a machine with
    internet, for compute nodes without it that share the cache."""
    from dist_dml.config import load_config
    from dist_dml.models.embedding import build_model
    from dist_dml.models.weights import fetch_weights

    cfg = load_config(args.config, args.overrides, check_data=False)
    path = fetch_weights(cfg.model)
    if path is None:
        print(f"[weights] model.weights=none: {cfg.model.backbone} starts from random weights, nothing to fetch")
        return 0
    # Read what the file holds, as a training will (a file of another model, NaN or Python objects is refused now).
    report = build_model(cfg.model, image_size=cfg.data.image_size, weights=str(path)).weights_report
    print(f"[weights] ready: {cfg.model.backbone} ({cfg.model.weights}) in {path}: {report}", flush=True)
    return 0


def setup_command(args: argparse.Namespace) -> int:
    """Prepare this environment once: DeepSpeed's CPU communication op (built here, with a message); with
    --check-internals, first the internals of torch and DeepSpeed that dist_dml's patches rely on."""
    from dist_dml.infra.accelerator import configure

    configure("auto")
    if args.check_internals:
        from dist_dml.infra.patches import internals_changed

        changed = internals_changed()
        if changed:
            raise UserError("the installed torch or DeepSpeed lacks what dist_dml's patches rely on ("
                            + "; ".join(changed) + "): install the versions pyproject.toml names")
    from dist_dml.train.engine import prepare_comm_op

    prepare_comm_op(announce=True)
    if not args.quiet:
        print("[setup] ready", flush=True)
    return 0


def config_command(args: argparse.Namespace) -> int:
    """`dist-dml config --reference` (docs/config.md), or a config resolved (YAML, checked without its data)."""
    from dist_dml.infra.files import output_problem, write_atomically

    problem = output_problem(args.out) if args.out else None
    if problem:
        raise UserError(f"--out: {problem}")
    if args.reference:
        from dist_dml.config.reference import reference

        if args.config or args.overrides:
            raise UserError("--reference prints every key of every section, for no config in particular: give it "
                            "no config file (or drop --reference to print that config resolved)")
        text = reference()
    elif args.config:
        from dist_dml.config import load_config

        text = load_config(args.config, args.overrides, check_data=False).to_yaml()
    else:
        raise UserError("give a config file to resolve, or --reference")
    if args.out:
        write_atomically(Path(args.out), text)
        print(f"[config] wrote {args.out}", flush=True)
    else:
        print(text, end="" if text.endswith("\n") else "\n")
    return 0


def demo_command(args: argparse.Namespace) -> int:
    """Synthetic shards, a short training on CPU processes, Recall@1 before and after. An earlier demo in the
    folder is moved into OUTPUT/previous/ (train.move_aside); a folder that holds another run is refused."""
    from dist_dml.infra.distributed import free_port
    from dist_dml.infra.files import output_problem
    from dist_dml.train.run_folder import earlier_run

    if args.nproc < 1:
        raise UserError(f"--nproc must be >= 1 (CPU processes to train with), got {args.nproc}")
    problem = output_problem(args.output, folder=True)
    if problem:
        raise UserError(f"--output: {problem}")
    out = Path(args.output).resolve()
    earlier = earlier_run(out)
    if earlier is not None and not _a_demo(out):
        raise UserError(f"--output {out} holds {earlier}, not a demo's: the demo never overwrites a run; give another "
                        "--output")
    data = out / "data"
    if not (data / "manifest.json").is_file():
        from data_prep.cli import main as prep

        print(f"[demo] writing synthetic products to {data}", flush=True)
        code = prep(["synthetic", "--classes", "500", "--test-classes", "150", "--per-class", "4:8",
                     "--size", "64", "--min-shards", "8", "--out", str(data)])
        if code:
            return code
    config = config_path("configs/cpu_synthetic.yaml")
    cmd = [sys.executable, "-m", "dist_dml.launch", f"--nproc_per_node={args.nproc}",
           f"--master_port={free_port()}", "-m", "dist_dml.cli", "train", str(config),
           f"data.root={data}", "train.name=demo", f"train.output_dir={out}", "checkpoint.resume=none",
           "train.move_aside=true", *args.overrides]  # an earlier demo's files go into OUTPUT/previous/, said so
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    print(f"[demo] training with {args.nproc} CPU processes: {' '.join(cmd[2:])}", flush=True)
    code = subprocess.call(cmd, env=env)
    if code:
        return code
    results = json.loads((out / "results.json").read_text())
    before, after = results["untrained"]["recall_at_1"], results["trained"]["recall_at_1"]
    print(f"\n[demo] Recall@1 on held-out products: untrained {before:.3f}  ->  trained {after:.3f}")
    return 0


def _a_demo(folder: Path) -> bool:
    """Whether the run in ``folder`` is a demo's (its config.yaml names the run demo; where a move aside was cut
    short, the config.yaml it moved)."""
    import yaml

    from dist_dml.infra.files import read_regular
    from dist_dml.train.run_folder import PREVIOUS, STAGING

    for config in (folder / "config.yaml", *sorted((folder / PREVIOUS).glob(f"{STAGING}*/config.yaml"))):
        try:
            saved = yaml.safe_load(read_regular(config))
            return saved["train"]["name"] == "demo"
        except (OSError, yaml.YAMLError, KeyError, TypeError):
            continue
    return False


def grid_command(args: argparse.Namespace) -> int:
    from dist_dml.train.grid import run_grid

    return run_grid(args)


def add_commands(sub) -> None:
    """train, check, fetch-weights, setup, config, demo and grid."""
    p = sub.add_parser("train", help="train (run under torchrun, srun, or alone)")
    p.add_argument("config", help="a YAML file under configs/")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.set_defaults(func=train_command)

    p = sub.add_parser("check", help="check a training's config, data and resume before starting processes")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--world-size", type=int, required=True, help="the number of processes the run will have")
    p.add_argument("--ranks-per-node", type=int, help="how many of them run on this machine (default: all)")
    p.set_defaults(func=check_command)

    p = sub.add_parser("fetch-weights", help="download a config's backbone weights into the cache (on a machine "
                       "with internet, for compute nodes without it)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=fetch_weights_command)

    p = sub.add_parser("setup", help="build what this environment needs once (DeepSpeed's CPU op)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--check-internals", action="store_true",
                   help="first check the internals of torch and DeepSpeed that dist_dml's patches rely on")
    p.set_defaults(func=setup_command)

    p = sub.add_parser("config", help="the config reference (every key's type, default and meaning), or a config "
                       "resolved with its overrides")
    p.add_argument("config", nargs="?", help="a YAML file: print it resolved (defaults filled in, overrides applied)")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.add_argument("--reference", action="store_true", help="the reference of every key (Markdown: docs/config.md)")
    p.add_argument("--out", help="write to this file instead of printing")
    p.set_defaults(func=config_command)

    p = sub.add_parser("demo", help="synthetic data, 2 CPU processes, Recall@1 before and after training")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--output", default="runs/demo")
    p.add_argument("overrides", nargs="*", help="section.key=value for the training")
    p.set_defaults(func=demo_command)

    p = sub.add_parser("grid", help="the paper's grid: losses x samplers x seeds (x --set axes) as child runs")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="section.key=value for every cell")
    p.add_argument("--losses", default="margin", help="comma-separated loss.kind values")
    p.add_argument("--samplers", default="distance_weighted", help="comma-separated sampler.kind values")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (train, data and sampler)")
    p.add_argument("--set", action="append", help="section.key=v1,v2: one more axis (repeatable)")
    p.add_argument("--nproc", type=int, default=1, help="processes per training (torchrun's --nproc_per_node)")
    p.add_argument("--output", help="the grid's folder (default runs/NAME-grid)")
    p.set_defaults(func=grid_command)
