"""The `dist-dml` entry point: prep, train, demo."""
from __future__ import annotations

import argparse
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

from dist_dml.errors import UserError, one_line
from dist_dml.files import new_version, open_regular, publish, published, read_regular, write_atomically

REPO = Path(__file__).resolve().parents[1]


def _config_path(name: str) -> Path:
    for base in (Path.cwd(), REPO):
        if (base / name).is_file():
            return base / name
    raise FileNotFoundError(f"{name}: not found in {Path.cwd()} or {REPO}")


def _config(command: str, config: str, overrides: list[str]):
    """The run's config if it is valid, else the reason on stderr and None."""
    from dist_dml.config import ConfigError, load_config

    try:
        return load_config(config, overrides)
    except ConfigError as exc:
        print(f"dist-dml {command}: error: {exc}", file=sys.stderr)
        return None


def _resume_refused(cfg, world_size: int) -> bool:
    """Whether the run cannot resume where it would at ``world_size`` processes (said on stderr)."""
    from dist_dml.checkpoint import resume_problem

    problem = resume_problem(cfg, world_size)
    if problem:
        print(f"dist-dml train: error: cannot resume: {problem}", file=sys.stderr)
    return problem is not None


def train_command(args: argparse.Namespace) -> int:
    """One process of a run (torchrun, srun or alone): validate the config and the resume, then train in the
    process group this command owns."""
    from dist_dml.accelerator import configure
    from dist_dml.distributed import DistContext, process_group

    cfg = _config("train", args.config, args.overrides)
    if cfg is None:
        return 2
    configure(cfg.train.device)
    ctx = DistContext.from_env(device=cfg.train.device)
    if _resume_refused(cfg, ctx.world_size):
        return 2
    from dist_dml.trainer import train

    with process_group(ctx, cfg.deepspeed.timeout_minutes):
        results = train(cfg, ctx)
    if ctx.is_main:
        _train_summary(cfg, results)
    from dist_dml.evaluation import EvaluationIncomplete, evaluation_problem

    problem = evaluation_problem(results["trained"], cfg.eval)
    if problem:  # the model, checkpoints and results are written
        raise EvaluationIncomplete(f"the final evaluation {problem}")
    return 0


def _train_summary(cfg, results: dict) -> None:
    from dist_dml.evaluation import format_metrics as shown

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
    """The launch scripts' check before torchrun starts: config, data, and whether the resume applies."""
    cfg = _config("train", args.config, args.overrides)
    if args.world_size < 1:
        print(f"dist-dml check: error: --world-size must be >= 1, got {args.world_size}", file=sys.stderr)
        return 2
    if cfg is None or _resume_refused(cfg, args.world_size):
        return 2
    from dist_dml.run_folder import folder_problem

    from dist_dml.weights import weights_problem

    from dist_dml.checkpoint import resume_target
    from dist_dml.run_folder import earlier_run_problem

    out = Path(cfg.train.output_dir)
    fresh = resume_target(cfg.checkpoint, out) is None  # whole and of this run: checked just above
    problem = folder_problem(out) or (earlier_run_problem(out, cfg.train.move_aside) if fresh else None) \
        or weights_problem(cfg.model)
    if problem:
        print(f"dist-dml train: error: {problem}", file=sys.stderr)
        return 2
    if cfg.tracking.enabled:
        from dist_dml.tracking import failure_message, tracking_uri, unreachable

        uri = tracking_uri(cfg.tracking)
        problem = unreachable(uri, cfg.tracking.timeout_s)
        if problem and cfg.tracking.required:
            print(f"dist-dml train: error: {failure_message(uri, problem)}", file=sys.stderr)
            return 2
        if problem:
            print(f"[check] warning: {failure_message(uri, problem)}; the run will train without tracking",
                  file=sys.stderr, flush=True)
    print(f"[check] run {cfg.train.name!r}: output {cfg.train.output_dir}, MLflow experiment "
          f"{cfg.tracking.experiment!r}, {args.world_size} processes", flush=True)
    return 0


def fetch_weights_command(args: argparse.Namespace) -> int:
    """Download a config's backbone weights into the local cache (TORCH_HOME / HF_HOME), on a machine with
    internet, for compute nodes without it that share the cache."""
    from dist_dml.config import ConfigError, load_config
    from dist_dml.weights import fetch_weights

    try:
        cfg = load_config(args.config, args.overrides, check_data=False)
    except ConfigError as exc:
        print(f"dist-dml fetch-weights: error: {exc}", file=sys.stderr)
        return 2
    path = fetch_weights(cfg.model)
    if path is None:
        print(f"[weights] model.weights=none: {cfg.model.backbone} starts from random weights, nothing to fetch")
        return 0
    # Read what the file holds, as a training will (a file of another model, NaN or Python objects is refused now).
    from dist_dml.models import build_model

    report = build_model(cfg.model, image_size=cfg.data.image_size, weights=str(path)).weights_report
    print(f"[weights] ready: {cfg.model.backbone} ({cfg.model.weights}) in {path}: {report}", flush=True)
    return 0


def setup_command(args: argparse.Namespace) -> int:
    """Prepare this environment once: DeepSpeed's CPU communication op (built here, with a message)."""
    from dist_dml.accelerator import configure

    configure("auto")
    from dist_dml.engine import prepare_comm_op

    prepare_comm_op(announce=True)
    if not args.quiet:
        print("[setup] ready", flush=True)
    return 0


def _outputs_writable(args: argparse.Namespace) -> None:
    """Every output path of the command (--out, --plots, --onnx) checked before its work starts
    (files.output_problem): a UserError. --plots, and the --out of embed and index, are folders."""
    from dist_dml.files import output_problem

    for option in ("out", "plots", "onnx"):
        value = getattr(args, option, None)
        folder = option == "plots" or (option == "out" and args.command in ("embed", "index"))
        problem = output_problem(value, folder=folder) if value else None
        if problem:
            raise UserError(f"--{option}: {problem}")


def _on_checkpoint(args: argparse.Namespace, work) -> int:
    """Run ``work(model, config, context)`` for eval/embed: the checkpoint with its overrides, and a
    process group if launched, shut down afterwards. 2 (with the reason) on a bad checkpoint or config."""
    from dist_dml.accelerator import configure
    from dist_dml.config import ConfigError
    from dist_dml.distributed import DistContext, process_group
    from dist_dml.export import load_checkpoint

    _outputs_writable(args)
    try:
        model, cfg = load_checkpoint(args.checkpoint, args.overrides)
    except (ConfigError, FileNotFoundError, KeyError) as exc:
        print(f"dist-dml {args.command}: error: {exc}", file=sys.stderr)
        return 2
    configure(cfg.train.device)
    ctx = DistContext.from_env(device=cfg.train.device)
    with process_group(ctx, cfg.deepspeed.timeout_minutes):
        return work(model.to(ctx.device), cfg, ctx)


def eval_command(args: argparse.Namespace) -> int:
    """Retrieval metrics of a checkpoint on the configured evaluation split(s)."""
    from dist_dml.evaluation import EvaluationIncomplete, evaluate, evaluation_problem

    def work(model, cfg, ctx) -> int:
        metrics, paths = evaluate(model, cfg.data, cfg.eval, ctx, progress=True, plots_dir=args.plots)
        if ctx.is_main:
            print(json.dumps(metrics, indent=1))
            if args.out:
                write_atomically(args.out, json.dumps(metrics, indent=1))
            for path in paths:
                print(f"[eval] plot: {path}")
        problem = evaluation_problem(metrics, cfg.eval)
        if problem:  # after writing what it has
            raise EvaluationIncomplete(problem)
        return 0

    return _on_checkpoint(args, work)


def embed_command(args: argparse.Namespace) -> int:
    """Each rank writes the embeddings of its share of a split as one part, with each item's class and
    source; rank 0 writes which model made them (MODEL_FILE)."""
    import torch

    from dist_dml.data import EvalStream, verify
    from dist_dml.evaluation import embed_local, report_nonfinite
    from dist_dml.export import EXPORT_PARTS, MODEL_FILE, model_fingerprint, write_embeddings

    def work(model, cfg, ctx) -> int:
        out = Path(args.out)
        stream = EvalStream(cfg.data, args.split, ctx.rank, ctx.world_size, cfg.eval.batch_size)
        verify(stream, ctx, repr(args.split))
        embedded = embed_local(model, stream, ctx, progress=True, names=True)
        bad = int(ctx.all_reduce_sum(torch.tensor([embedded.faults["nonfinite_embeddings"]], device=ctx.device)))
        if bad:  # such an item could never be found again: nothing is written
            line = report_nonfinite([embedded], ctx, bad, "so nothing is written")
            raise NonFinite(f"{line} (check the checkpoint {args.checkpoint})")
        # Written beside the export that is there (a new version folder), then made current in one rename: a reader
        # (dist-dml index) sees the old export or the new, and no part of another export is ever read with it.
        version = Path(ctx.broadcast_object(str(new_version(out)) if ctx.is_main else None))
        paths = write_embeddings(embedded, version, ctx.rank, args.format)
        count = int(ctx.all_reduce_sum(torch.tensor([len(embedded.image_ids)], device=ctx.device)))
        ctx.barrier()
        if ctx.is_main:
            meta = {"checkpoint": str(Path(args.checkpoint).resolve()), "fingerprint": model_fingerprint(model),
                    "split": args.split, "images": stream.num_images, "count": count, "parts": ctx.world_size,
                    "format": args.format, "dim": model.head.out_features}
            publish(out, MODEL_FILE, meta, version, legacy=EXPORT_PARTS)
        ctx.barrier()
        print(f"[embed] rank {ctx.rank}: {', '.join(str(p) for p in paths)}")
        if ctx.is_main:
            print(f"[embed] done: {stream.num_images} embeddings of split {args.split!r} in {out.resolve()} "
                  f"({ctx.world_size} part{'s' if ctx.world_size > 1 else ''}, {args.format})", flush=True)
        return 0

    return _on_checkpoint(args, work)


class NonFinite(UserError):
    """A model gave embeddings that are not finite (raised alike on every rank)."""

    on_every_rank = True


def index_command(args: argparse.Namespace) -> int:
    """A faiss index over exported embeddings, with each item's id, label, class and source beside it,
    and the model that made them (taken from the export, or --checkpoint)."""
    import numpy as np

    from dist_dml.export import export_meta, load_checkpoint, model_fingerprint, read_embeddings
    from dist_dml.search import build_index, save_index

    _outputs_writable(args)
    if args.nlist < 0 or args.m < 1:
        raise UserError(f"--nlist must be >= 0 (0: 4 sqrt(N)) and --m >= 1, got {args.nlist} and {args.m}")
    pp = _index_postprocess(args)
    source = Path(args.embeddings)
    exported = read_embeddings(source)
    model = export_meta(source)
    if args.checkpoint:
        fingerprint = model_fingerprint(load_checkpoint(args.checkpoint)[0])
        if model.get("fingerprint") not in (None, fingerprint):
            print(f"dist-dml index: error: {source} was embedded with {model['checkpoint']} (model "
                  f"{model['fingerprint']}), not --checkpoint {args.checkpoint} (model {fingerprint})", file=sys.stderr)
            return 2
        model = {**model, "checkpoint": str(Path(args.checkpoint).resolve()), "fingerprint": fingerprint}
    out = Path(args.out)
    vectors = exported.embeddings
    if pp is not None and "dba" in pp and pp.dba_k:
        from dist_dml.sharded import database_augmented

        seconds = 15 * (len(vectors) / 1e5) ** 2 * vectors.shape[1] / 128  # measured: 100k x 128 in 15 s, 2 cores
        print(f"[index] database-side augmentation of {len(vectors):,} vectors ({pp.describe().split(', ')[0]}): an "
              f"exact k-NN search of the whole export, about {seconds:.0f} s on 2 CPU cores", flush=True)
        vectors = database_augmented(vectors, exported.ids, pp.dba_k, pp.dba_alpha)
    try:
        index = build_index(vectors, args.type, nlist=args.nlist, m=args.m)
    except RuntimeError as exc:  # faiss: e.g. too few vectors to train an ivfpq index of these lists
        raise UserError(f"--type {args.type} over {len(exported.ids)} embeddings: {one_line(exc, 200)}") from None
    # Written beside the index that is there, then made current in one rename (files.publish): a search that runs
    # meanwhile reads the old index and its columns or the new ones, never a mix.
    version = new_version(out)
    save_index(index, version / "index.faiss")
    for name in ("ids", "labels", "classes", "items"):
        np.save(version / f"{name}.npy", getattr(exported, name))
    meta = {"type": args.type, "count": int(len(exported.ids)), "dim": int(exported.embeddings.shape[1]),
            "checkpoint": model.get("checkpoint"), "fingerprint": model.get("fingerprint"),
            **({"postprocess": pp.as_dict()} if pp is not None else {})}
    publish(out, "meta.json", meta, version)
    print(f"[index] done: {args.type} index of {len(exported.ids)} embeddings in {out.resolve()}"
          f" (model {meta['fingerprint'] or 'unknown'}{'; ' + pp.describe() if pp is not None else ''})")
    return 0


INDEX_POSTPROCESS = ("dba_k", "dba_alpha", "qe_k", "qe_alpha")  # what an index records of its post-processing


def _index_postprocess(args: argparse.Namespace):
    """The post-processing an index carries (--postprocess with its --dba-* / --qe-*), checked as eval's; None for
    none. k-reciprocal re-ranking needs the query among the gallery's neighbour lists: evaluation only."""
    fields = {key: getattr(args, key) for key in INDEX_POSTPROCESS}
    try:
        pp = _postprocess_of(args.postprocess, fields)
    except ValueError as exc:
        message = str(exc)
        for key in ("postprocess", *INDEX_POSTPROCESS):
            message = message.replace(f"eval.{key}", f"--{key.replace('_', '-')}")
        raise UserError(message) from None
    if pp is not None and "k_reciprocal" in pp:
        raise UserError("--postprocess k_reciprocal: re-ranking is measured by evaluation (eval.postprocess); an "
                        "index carries dba and qe")
    return pp


def _postprocess_of(steps: str, fields: dict):
    """A Postprocess (None for none) of ``steps`` ('+'-joined) and the INDEX_POSTPROCESS ``fields``, checked as
    eval.postprocess is (a ValueError saying what is wrong)."""
    from dist_dml.config import EvalConfig
    from dist_dml.postprocess import Postprocess

    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in fields.values()):
        raise ValueError("a parameter is not a number")
    given = EvalConfig(postprocess=steps, **fields)
    given.validate()
    return Postprocess.of(given)


def _index_meta(folder: Path) -> dict:
    """An index folder's meta.json; a missing or damaged one is a UserError."""
    path = folder / "meta.json"
    if not path.is_file():
        raise UserError(f"{folder}: not an index folder (no meta.json; build one with dist-dml index)")
    from dist_dml.export import json_object

    return json_object(path, "build the index again with dist-dml index")


def _recorded_postprocess(meta: dict, folder: Path):
    """The post-processing an index's meta.json records (a Postprocess; None: none), checked as --postprocess is:
    the parameters of each step it names must be there."""
    recorded = meta.get("postprocess")
    if recorded is None:
        return None
    try:
        steps = "+".join(recorded["steps"]) or "none"
        needed = [key for key in INDEX_POSTPROCESS if key.split("_")[0] in recorded["steps"]]
        return _postprocess_of(steps, {key: recorded[key] for key in needed})
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise UserError(f"{folder / 'meta.json'}: damaged (its postprocess: {one_line(exc, 200)}); build the index "
                        "again with dist-dml index") from None


def search_command(args: argparse.Namespace) -> int:
    """The nearest indexed items of image files, by class and source. The model must be the one the
    index was built with (--force searches anyway, with a warning)."""
    import numpy as np

    from dist_dml.export import embed_images, load_checkpoint, model_fingerprint
    from dist_dml.search import load_index, search_index

    folder = Path(args.index)
    if args.k < 1:
        raise UserError(f"--k {args.k}: give at least 1 neighbour")
    meta = _index_meta(folder)
    checkpoint = args.checkpoint or meta.get("checkpoint")
    if not checkpoint:
        print("dist-dml search: error: give --checkpoint (the index does not name one)", file=sys.stderr)
        return 2
    missing = [str(p) for p in args.images if not p.is_file()]
    if missing:
        print(f"dist-dml search: error: no such image file: {', '.join(missing)}", file=sys.stderr)
        return 2
    model, cfg = load_checkpoint(checkpoint)
    fingerprint = model_fingerprint(model)
    if meta.get("fingerprint") and fingerprint != meta["fingerprint"]:
        message = (f"the index in {folder} was built with model {meta['fingerprint']} ({meta.get('checkpoint')}), "
                   f"but {checkpoint} is model {fingerprint}: its embeddings are not comparable")
        if not args.force:
            print(f"dist-dml search: error: {message} (--force searches anyway)", file=sys.stderr)
            return 2
        print(f"dist-dml search: warning: {message}", file=sys.stderr)
    try:
        base = published(folder, meta)  # the version meta.json names: one index with its own columns
        index = load_index(base / "index.faiss")
        columns = {}
        for name in ("ids", "labels", "classes", "items"):
            if (base / f"{name}.npy").exists():
                with open_regular(base / f"{name}.npy") as f:
                    columns[name] = np.load(f, allow_pickle=False)
    except (RuntimeError, ValueError, OSError) as exc:
        raise UserError(f"{folder}: the index is damaged ({one_line(exc, 200)}); build it again "
                        "with dist-dml index") from None
    if index.ntotal != len(columns.get("ids", ())):
        raise UserError(f"{folder}: the index holds {index.ntotal} vectors but ids.npy {len(columns.get('ids', ()))}"
                        "; build it again with dist-dml index")
    pp = _recorded_postprocess(meta, folder)
    if pp is not None:
        print(f"[search] with the index's post-processing: {pp.describe()}")
    scores, rows = search_index(index, embed_images(model, cfg, args.images).numpy(), args.k, pp)
    for image, score_row, index_row in zip(args.images, scores, rows):
        print(f"{image}:")
        for rank, (score, row) in enumerate(zip(score_row, index_row), start=1):
            if row >= 0:
                names = "".join(f" {key}={columns[plural][row]}" for key, plural in (("class", "classes"), ("item", "items"))
                                if plural in columns)
                print(f"  {rank:3d}. score={score:.4f}{names} id={columns['ids'][row]} label={columns['labels'][row]}")
    return 0


def export_command(args: argparse.Namespace) -> int:
    """A checkpoint as an ONNX graph (uint8 NHWC images in, L2-normalised embeddings out), checked against
    torch with onnxruntime."""
    from dist_dml.onnx_export import MIN_OPSET, TOLERANCE, export_onnx

    _outputs_writable(args)
    if args.opset < MIN_OPSET:
        raise UserError(f"--opset {args.opset}: torch's ONNX exporter writes opset {MIN_OPSET} or later (it wrote "
                        f"{MIN_OPSET} whatever was asked below it)")
    print(f"[export] exporting {args.checkpoint} to ONNX (seconds for a small model, a minute or two for a ViT)",
          flush=True)
    differences = export_onnx(args.checkpoint, args.onnx, opset=args.opset)
    shown = ", ".join(f"{k.replace('_', ' of ')}: {v:.1e}" for k, v in differences.items())
    print(f"[export] wrote {Path(args.onnx).resolve()}: onnxruntime equals torch within {TOLERANCE} ({shown})")
    return 0


def demo_command(args: argparse.Namespace) -> int:
    """Synthetic shards, a short training on CPU processes, Recall@1 before and after. An earlier demo in the
    folder is moved into OUTPUT/previous/ (train.move_aside); a folder that holds another run is refused."""
    from dist_dml.distributed import free_port
    from dist_dml.run_folder import earlier_run

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
    config = _config_path("configs/cpu_synthetic.yaml")
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
    """Whether the run in ``folder`` is a demo's (its config.yaml names the run demo)."""
    import yaml

    try:
        saved = yaml.safe_load(read_regular(folder / "config.yaml"))
        return saved["train"]["name"] == "demo"
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return False


def build_parser() -> argparse.ArgumentParser:
    """`dist-dml` and its subcommands (each also takes --debug)."""
    parser = argparse.ArgumentParser(prog="dist-dml", description="Distributed deep metric learning")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of a user error (also DIST_DML_DEBUG=1)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of a user error (also DIST_DML_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    from dist_dml.patches import subcommands_with_parents

    subcommands_with_parents(sub, [common])

    p = sub.add_parser("train", help="train (run under torchrun, srun, or alone)")
    p.add_argument("config", help="a YAML file under configs/")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.set_defaults(func=train_command)

    p = sub.add_parser("check", help="check a training's config, data and resume before starting processes")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--world-size", type=int, required=True, help="the number of processes the run will have")
    p.set_defaults(func=check_command)

    p = sub.add_parser("fetch-weights", help="download a config's backbone weights into the cache (on a machine "
                       "with internet, for compute nodes without it)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=fetch_weights_command)

    p = sub.add_parser("setup", help="build what this environment needs once (DeepSpeed's CPU op)")
    p.add_argument("--quiet", action="store_true")
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

    _add_after_training(sub)
    return parser


def _add_after_training(sub) -> None:
    """The commands that take a trained model: eval, embed, export, index, search; and prep."""
    p = sub.add_parser("eval", help="retrieval metrics of a checkpoint (under torchrun: distributed extraction)")
    p.add_argument("checkpoint", help="OUTPUT/final_model.pt or OUTPUT/checkpoints/stepN")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.root=... eval.split=query,gallery")
    p.add_argument("--out", help="also write the metrics to this JSON file")
    p.add_argument("--plots", help="draw Recall@K and a few queries' nearest neighbours into this folder")
    p.set_defaults(func=eval_command)

    p = sub.add_parser("embed", help="export the embeddings of a split (one part per rank)")
    p.add_argument("checkpoint")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--split", default="test")
    p.add_argument("--out", required=True)
    p.add_argument("--format", choices=["npy", "parquet"], default="npy")
    p.set_defaults(func=embed_command)

    p = sub.add_parser("export", help="a checkpoint as an ONNX graph: uint8 NHWC images in, embeddings out")
    p.add_argument("checkpoint", help="OUTPUT/final_model.pt or OUTPUT/checkpoints/stepN")
    p.add_argument("--onnx", required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=18)
    p.set_defaults(func=export_command)

    p = sub.add_parser("index", help="build a faiss index over exported embeddings")
    p.add_argument("embeddings", help="a folder written by dist-dml embed")
    p.add_argument("--out", required=True)
    p.add_argument("--type", choices=["flat", "ivfpq"], default="flat")
    p.add_argument("--nlist", type=int, default=0, help="ivfpq lists (0: 4 sqrt(N))")
    p.add_argument("--m", type=int, default=16, help="ivfpq sub-quantizers")
    p.add_argument("--checkpoint", help="the model that made the embeddings (default: the one the export names)")
    p.add_argument("--postprocess", default="none", help="none, dba, qe or dba+qe: DBA augments the indexed vectors, "
                   "QE the queries of every search (as eval.postprocess)")
    p.add_argument("--dba-k", type=int, default=2, help="neighbours averaged into each indexed vector")
    p.add_argument("--dba-alpha", type=float, default=3.0, help="their weight: max(similarity, 0) ** alpha")
    p.add_argument("--qe-k", type=int, default=2, help="indexed neighbours averaged into each query")
    p.add_argument("--qe-alpha", type=float, default=3.0, help="their weight: max(similarity, 0) ** alpha")
    p.set_defaults(func=index_command)

    p = sub.add_parser("search", help="the nearest indexed items of image files")
    p.add_argument("index", help="a folder written by dist-dml index")
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--checkpoint", help="default: the one the index names")
    p.add_argument("--force", action="store_true", help="search even with a model other than the index's")
    p.set_defaults(func=search_command)

    from dist_dml.grid import add_parser as add_grid

    add_grid(sub)
    from data_prep.cli import build_parser as prep_parser, run as prep_run

    p = sub.add_parser("prep", help="convert a dataset (or synthesise one) to class-grouped shards")
    prep_parser(p)
    p.set_defaults(func=prep_run)


def config_command(args) -> int:
    """`dist-dml config --reference` (docs/config.md), or a config resolved (YAML, checked without its data)."""
    if args.reference:
        from dist_dml.reference import reference

        text = reference()
    elif args.config:
        from dist_dml.config import dump_yaml, load_config

        text = dump_yaml(load_config(args.config, args.overrides, check_data=False))
    else:
        raise UserError("dist-dml config: give a config file to resolve, or --reference")
    if args.out:
        write_atomically(Path(args.out), text)
        print(f"[config] wrote {args.out}", flush=True)
    else:
        print(text, end="" if text.endswith("\n") else "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # section.key=value overrides placed after an option (argparse takes positionals before them only)
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    debug = getattr(args, "debug", False) or os.environ.get("DIST_DML_DEBUG", "") not in ("", "0")
    try:
        return args.func(args)
    except UserError as exc:
        if debug:
            raise
        from dist_dml.distributed import env_rank

        rank = env_rank()
        if rank == 0 or not exc.on_every_rank:
            where = f" (rank {rank})" if rank else ""
            print(f"dist-dml {args.command}: error{where}: {one_line(exc, 2000)}", file=sys.stderr, flush=True)
        return 2
    except OSError as exc:
        if debug or exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"dist-dml {args.command}: error: no space left on the device of {exc.filename or 'the output'}: "
              f"free some space (or give another train.output_dir) and run again", file=sys.stderr, flush=True)
        return 2


def _leave(code: int) -> None:
    """Exit a rank of a multi-process launch whose command returned: everything is written and its process group
    is down, so leave without the interpreter's teardown. torch's C++ static destructors have aborted a finished
    rank there now and then ("terminate called without an active exception", a thread still joinable: exit -6),
    which turned a run that had succeeded into a failed launch."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    returned = main()
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        _leave(returned)
    sys.exit(returned)
