"""The commands that take a trained model: eval, embed, export, index, search; and prep. Each reads its arguments,
calls the library and prints; a refusal is a UserError, which `dist-dml` prints in one line (exit 2)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from dist_dml.infra.errors import UserError
from dist_dml.retrieval.postprocess import Postprocess


def _outputs_writable(args: argparse.Namespace) -> None:
    """Every output path of the command (--out, --plots, --onnx) checked before its work starts
    (files.output_problem): a UserError. --plots, and the --out of embed and index, are folders."""
    from dist_dml.infra.files import output_problem

    for option in ("out", "plots", "onnx"):
        value = getattr(args, option, None)
        folder = option == "plots" or (option == "out" and args.command in ("embed", "index"))
        problem = output_problem(value, folder=folder) if value else None
        if problem:
            raise UserError(f"--{option}: {problem}")


def _on_checkpoint(args: argparse.Namespace, work) -> int:
    """Run ``work(model, config, context)`` for eval/embed: the checkpoint with its overrides, and a process group
    if launched, shut down afterwards."""
    from dist_dml.infra.accelerator import configure
    from dist_dml.infra.distributed import DistContext, process_group
    from dist_dml.serve.trained_model import load_checkpoint

    _outputs_writable(args)
    try:
        model, cfg = load_checkpoint(args.checkpoint, args.overrides)
    except (FileNotFoundError, KeyError) as exc:
        raise UserError(str(exc)) from None
    configure(cfg.train.device)
    ctx = DistContext.from_env(device=cfg.train.device)
    with process_group(ctx, cfg.deepspeed.timeout_minutes):
        return work(model.to(ctx.device), cfg, ctx)


def eval_command(args: argparse.Namespace) -> int:
    """Retrieval metrics of a checkpoint on the configured evaluation split(s)."""
    from dist_dml.infra.files import write_atomically
    from dist_dml.retrieval.evaluation import EvaluationIncomplete, evaluate, evaluation_problem

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
    """Each rank writes the embeddings of its share of a split as one part, with each item's class and source;
    the export names the model that made them."""
    from dist_dml.retrieval.embeddings import export_split
    from dist_dml.serve.trained_model import model_fingerprint

    def work(model, cfg, ctx) -> int:
        out = Path(args.out)
        made_by = {"checkpoint": str(Path(args.checkpoint).resolve()), "fingerprint": model_fingerprint(model)}
        paths = export_split(model, cfg, args.split, out, args.format, ctx, made_by)
        print(f"[embed] rank {ctx.rank}: {', '.join(str(p) for p in paths)}")
        if ctx.is_main:
            count = json.loads((out / "model.json").read_text())["images"]
            print(f"[embed] done: {count} embeddings of split {args.split!r} in {out.resolve()} "
                  f"({ctx.world_size} part{'s' if ctx.world_size > 1 else ''}, {args.format})", flush=True)
        return 0

    return _on_checkpoint(args, work)


def index_command(args: argparse.Namespace) -> int:
    """A faiss index over exported embeddings, with each item's id, label, class and source beside it, and the
    model that made them (taken from the export, or --checkpoint)."""
    from dist_dml.retrieval.embeddings import export_meta, read_embeddings
    from dist_dml.retrieval.index_folder import build_index_folder, index_postprocess
    from dist_dml.serve.trained_model import load_checkpoint, model_fingerprint

    _outputs_writable(args)
    if args.nlist < 0 or args.m < 1:
        raise UserError(f"--nlist must be >= 0 (0: 4 sqrt(N)) and --m >= 1, got {args.nlist} and {args.m}")
    pp = index_postprocess(args.postprocess, {key: getattr(args, key) for key in _INDEX_FLAGS})
    source = Path(args.embeddings)
    exported = read_embeddings(source, say=lambda line: print(f"[index] {line}", flush=True))
    model = export_meta(source)
    if args.checkpoint:
        fingerprint = model_fingerprint(load_checkpoint(args.checkpoint)[0])
        if model.get("fingerprint") not in (None, fingerprint):
            raise UserError(f"{source} was embedded with {model['checkpoint']} (model {model['fingerprint']}), not "
                            f"--checkpoint {args.checkpoint} (model {fingerprint})")
        model = {**model, "checkpoint": str(Path(args.checkpoint).resolve()), "fingerprint": fingerprint}
    out = Path(args.out)
    meta = build_index_folder(exported, out, args.type, args.nlist, args.m, pp, model)
    print(f"[index] done: {args.type} index of {len(exported.ids)} embeddings in {out.resolve()}"
          f" (model {meta['fingerprint'] or 'unknown'}{'; ' + pp.describe() if pp is not None else ''})")
    return 0


_INDEX_FLAGS = ("dba_k", "dba_alpha", "qe_k", "qe_alpha")  # --dba-k ...: the parameters an index records


def search_command(args: argparse.Namespace) -> int:
    """The nearest indexed items of image files, by class and source. The model must be the one the index was
    built with (--force searches anyway, with a warning)."""
    import sys

    from dist_dml.retrieval.index_folder import IndexFolder
    from dist_dml.serve.trained_model import embed_images, load_checkpoint, model_fingerprint

    if args.k < 1:
        raise UserError(f"--k {args.k}: give at least 1 neighbour")
    folder = IndexFolder(args.index, say=lambda line: print(f"[search] {line}", flush=True))
    checkpoint = args.checkpoint or folder.checkpoint
    if not checkpoint:
        raise UserError("give --checkpoint (the index does not name one)")
    missing = [str(p) for p in args.images if not p.is_file()]
    if missing:
        raise UserError(f"no such image file: {', '.join(missing)}")
    model, cfg = load_checkpoint(checkpoint)
    fingerprint = model_fingerprint(model)
    if folder.fingerprint and fingerprint != folder.fingerprint:
        message = (f"the index in {folder.folder} was built with model {folder.fingerprint} ({folder.checkpoint}), "
                   f"but {checkpoint} is model {fingerprint}: its embeddings are not comparable")
        if not args.force:
            raise UserError(f"{message} (--force searches anyway)")
        print(f"dist-dml search: warning: {message}", file=sys.stderr)
    folder.load()
    if folder.postprocess is not None:
        print(f"[search] with the index's post-processing: {folder.postprocess.describe()}")
    for image, hits in zip(args.images, folder.search(embed_images(model, cfg, args.images).numpy(), args.k)):
        print(f"{image}:")
        for hit in hits:
            names = "".join(f" {key}={value}" for key, value in (("class", hit.item_class), ("item", hit.item))
                            if value is not None)
            print(f"  {hit.rank:3d}. score={hit.score:.4f}{names} id={hit.id} label={hit.label}")
    return 0


def export_command(args: argparse.Namespace) -> int:
    """A checkpoint as an ONNX graph (uint8 NHWC images in, L2-normalised embeddings out), checked against torch
    with onnxruntime."""
    from dist_dml.serve.onnx_export import MIN_OPSET, TOLERANCE, export_onnx

    _outputs_writable(args)
    if args.opset < MIN_OPSET:
        raise UserError(f"--opset {args.opset}: torch's ONNX exporter writes opset {MIN_OPSET} or later (it writes "
                        f"{MIN_OPSET} whatever is asked below it)")
    print(f"[export] exporting {args.checkpoint} to ONNX (seconds for a small model, a minute or two for a ViT)",
          flush=True)
    differences = export_onnx(args.checkpoint, args.onnx, opset=args.opset)
    shown = ", ".join(f"{k.replace('_', ' of ')}: {v:.1e}" for k, v in differences.items())
    print(f"[export] wrote {Path(args.onnx).resolve()}: onnxruntime equals torch within {TOLERANCE} ({shown})")
    return 0


def add_commands(sub) -> None:
    """eval, embed, export, index, search and prep."""
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
    p.add_argument("--dba-k", type=int, default=Postprocess.dba_k, help="neighbours averaged into each indexed vector")
    p.add_argument("--dba-alpha", type=float, default=Postprocess.dba_alpha,
                   help="their weight: max(similarity, 0) ** alpha")
    p.add_argument("--qe-k", type=int, default=Postprocess.qe_k, help="indexed neighbours averaged into each query")
    p.add_argument("--qe-alpha", type=float, default=Postprocess.qe_alpha,
                   help="their weight: max(similarity, 0) ** alpha")
    p.set_defaults(func=index_command)

    p = sub.add_parser("search", help="the nearest indexed items of image files")
    p.add_argument("index", help="a folder written by dist-dml index")
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--checkpoint", help="default: the one the index names")
    p.add_argument("--force", action="store_true", help="search even with a model other than the index's")
    p.set_defaults(func=search_command)

    from data_prep.cli import build_parser as prep_parser, run as prep_run

    p = sub.add_parser("prep", help="convert a dataset (or synthesise one) to class-grouped shards")
    prep_parser(p)
    p.set_defaults(func=prep_run)
