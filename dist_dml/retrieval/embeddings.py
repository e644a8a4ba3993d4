"""Exported embeddings (`dist-dml embed`): one part per rank (npy columns or one parquet file), published whole
as a version folder that MODEL_FILE names with the model that made them (infra.published: one writer, many
readers); read back ordered by image id, every column checked, nothing unpickled."""
from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import numpy as np

from dist_dml.infra.errors import UserError, one_line
from dist_dml.infra.files import open_regular, read_json_object
from dist_dml.infra.published import open_published

MODEL_FILE = "model.json"  # beside exported embeddings and in an index folder: the model that made them
EXPORT_PARTS = ("part-*.parquet", "embeddings-*.npy", "labels-*.npy", "ids-*.npy", "classes-*.npy", "items-*.npy")


def write_embeddings(embedded, out: Path, part: int, fmt: str = "npy") -> list[Path]:
    """One part of an exported split (an sharded.Embedded with names): npy files, or one parquet
    file (id, label, class, item, embedding)."""
    out.mkdir(parents=True, exist_ok=True)
    emb_np = embedded.embeddings.float().cpu().numpy()
    lab_np, ids_np = embedded.labels.cpu().numpy(), embedded.image_ids.cpu().numpy()
    classes, items = np.array(embedded.classes, dtype=str), np.array(embedded.items, dtype=str)
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"id": ids_np, "label": lab_np, "class": classes.tolist(), "item": items.tolist(),
                          "embedding": pa.FixedSizeListArray.from_arrays(emb_np.reshape(-1), emb_np.shape[1])})
        path = out / f"part-{part:05d}.parquet"
        pq.write_table(table, path)
        return [path]
    paths = []
    for name, array in (("embeddings", emb_np), ("labels", lab_np), ("ids", ids_np), ("classes", classes),
                        ("items", items)):
        paths.append(out / f"{name}-{part:05d}.npy")
        np.save(paths[-1], array)
    return paths


@dataclass
class Exported:
    """An exported split, ordered by image id: what `dist-dml index` indexes and `search` reports."""

    embeddings: np.ndarray
    labels: np.ndarray
    ids: np.ndarray
    classes: np.ndarray  # the source's class id or name of each item
    items: np.ndarray  # each item's source path or id


def read_embeddings(folder: Path, say=print) -> Exported:
    """All parts of an exported split, ordered by image id: the export model.json names, its files opened before
    any is read (infra.published: a new export published meanwhile is never mixed in). A folder without parts,
    a part that is not a plain numeric array (an object array is never unpickled), parts that disagree in
    length, or an embedding that is not finite is a UserError naming the file or the items."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder (give one written by dist-dml embed)")
    if (folder / MODEL_FILE).exists():
        meta, files = open_published(folder, MODEL_FILE, REWRITE, "the export", say)
        where = folder / meta["version"] if meta.get("version") else folder
    else:  # an export of an older dist-dml: its parts as they lie in the folder
        meta, where = {}, folder
        files = _open_all([p for p in sorted(folder.iterdir()) if p.suffix in (".npy", ".parquet")])
    try:
        exported = _read_parts(where, files)
    finally:
        for handle in files.values():
            handle.close()
    if "count" in meta and len(exported.ids) != meta["count"]:
        raise UserError(f"{folder}: its parts hold {len(exported.ids)} embeddings, but the export wrote {meta['count']} "
                        f"(parts of another export?); {REWRITE}")
    return exported


REWRITE = "write the embeddings again with dist-dml embed"


def _open_all(paths: list[Path]) -> dict:
    """{name: open file} of ``paths`` (regular files only); a path that cannot be read is a UserError."""
    opened = {}
    try:
        for path in paths:
            opened[path.name] = open_regular(path)
    except OSError as exc:
        for handle in opened.values():
            handle.close()
        raise UserError(f"{exc.filename or path}: cannot be read ({exc.strerror or exc})") from None
    return opened


def export_meta(folder: Path) -> dict:
    """An export's MODEL_FILE ({} where an export of an older dist-dml has none); a damaged one is a UserError."""
    path = Path(folder) / MODEL_FILE
    return read_json_object(path, REWRITE) if path.exists() else {}


def _read_parts(where: Path, files: dict) -> Exported:
    """The parts among ``files`` ({name: open file} of one export, in ``where``), ordered by image id, checked as
    read_embeddings says."""
    parts = sorted(name for name in files if fnmatch(name, "part-*.parquet"))
    if parts:
        import pyarrow.parquet as pq

        try:
            tables = [pq.read_table(files[name]) for name in parts]
            column = lambda name: np.concatenate([t.column(name).to_numpy(zero_copy_only=False) for t in tables])
            ids, labels, classes, items = column("id"), column("label"), column("class"), column("item")
            emb = np.concatenate([np.stack(t.column("embedding").to_numpy(zero_copy_only=False)) for t in tables])
        except Exception as exc:  # noqa: BLE001 -- pyarrow's errors for a damaged or foreign file are many
            raise UserError(f"{where}: a part is not an export of dist-dml embed ({one_line(exc, 200)})") from None
    else:
        names = sorted(name for name in files if fnmatch(name, "embeddings-*.npy"))
        if not names:
            raise UserError(f"{where}: no exported embeddings (embeddings-*.npy or part-*.parquet; write them "
                            "with dist-dml embed)")
        emb, labels, ids, classes, items = (np.concatenate([_load_npy(where, files, name.replace("embeddings", kind))
                                                            for name in names])
                                            for kind in ("embeddings", "labels", "ids", "classes", "items"))
    if emb.ndim != 2 or emb.dtype.kind not in "fiu" or not all(len(a) == len(emb) for a in (labels, ids, classes, items)):
        raise UserError(f"{where}: the parts do not fit together ({emb.shape[0] if emb.ndim else 0} embeddings of "
                        f"shape {emb.shape[1:]}, {len(ids)} ids); write them again with dist-dml embed")
    emb = emb.astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(emb).all(axis=1))
    if len(bad):
        shown = ", ".join(f"{items[i]} (id {ids[i]})" for i in bad[:5])
        raise UserError(f"{where}: {len(bad)} of {len(emb)} embeddings are not finite (NaN or inf), e.g. {shown}: "
                        "they could never be found; embed them again with a sound model")
    order = np.argsort(ids, kind="stable")
    return Exported(emb[order], labels[order], ids[order], classes[order].astype(str), items[order].astype(str))


def _load_npy(where: Path, files: dict, name: str) -> np.ndarray:
    """One part's column: a plain array, never unpickled."""
    if name not in files:
        raise UserError(f"{where / name}: missing (each part has embeddings, labels, ids, classes and items)")
    try:
        array = np.load(files[name], allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise UserError(f"{where / name}: not a plain numeric or text array ({one_line(exc, 200)})") from None
    if array.dtype.kind not in "fiuU" or array.ndim == 0:
        raise UserError(f"{where / name}: holds {array.dtype} {array.shape}, not a column of an export")
    return array


class NonFinite(UserError):
    """A model gave embeddings that are not finite (raised alike on every rank)."""

    on_every_rank = True


def export_split(model, cfg, split: str, out: Path, fmt: str, ctx, model_meta: dict) -> list[Path]:
    """`dist-dml embed`: every rank embeds its share of ``split`` and writes it as one part of a new version of
    ``out``, which rank 0 then publishes with MODEL_FILE (``model_meta``: the checkpoint and fingerprint that made
    them, the split, the counts): a reader sees the old export or the new, never parts of two. An embedding that is
    not finite writes nothing (such an item could never be found again). Call on every rank; this rank's paths."""
    import torch

    from dist_dml.data import EvalStream, verify
    from dist_dml.infra.published import new_version, publish
    from dist_dml.retrieval.evaluation import embed_local, report_nonfinite

    stream = EvalStream(cfg.data, split, ctx.rank, ctx.world_size, cfg.eval.batch_size)
    verify(stream, ctx, repr(split))
    embedded = embed_local(model, stream, ctx, progress=True, names=True)
    bad = int(ctx.all_reduce_sum(torch.tensor([embedded.faults["nonfinite_embeddings"]], device=ctx.device)))
    if bad:
        line = report_nonfinite([embedded], ctx, bad, "so nothing is written")
        raise NonFinite(f"{line} (check the checkpoint {model_meta.get('checkpoint')})")
    version = Path(ctx.decide(lambda: str(new_version(out))))
    paths = write_embeddings(embedded, version, ctx.rank, fmt)
    count = int(ctx.all_reduce_sum(torch.tensor([len(embedded.image_ids)], device=ctx.device)))
    ctx.barrier()
    if ctx.is_main:
        meta = {**model_meta, "split": split, "images": stream.num_images, "count": count, "parts": ctx.world_size,
                "format": fmt, "dim": model.head.out_features}
        publish(out, MODEL_FILE, meta, version, legacy=EXPORT_PARTS)
    ctx.barrier()
    return paths
