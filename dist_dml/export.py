"""After training: evaluate a checkpoint, export embeddings, build a faiss index, search it with images.

A checkpoint is `OUTPUT/final_model.pt` (a plain state dict with its config) or a DeepSpeed
checkpoint folder `OUTPUT/checkpoints/stepN` (the config is then `OUTPUT/config.yaml`). Both load
with `weights_only=True`.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dist_dml.config import RunConfig, apply_overrides, build_config, load_config
from dist_dml.errors import UserError, one_line
from dist_dml.files import load_plain, open_regular, parse_json, published, read_regular
from dist_dml.models import EmbeddingModel, build_model


def load_checkpoint(path: str | Path, overrides: list[str] = ()) -> tuple[EmbeddingModel, RunConfig]:
    path = Path(path)
    if path.is_dir():
        from dist_dml.checkpoint import verify

        states = path / "mp_rank_00_model_states.pt"
        problem = verify(path)
        if problem:
            raise UserError(f"{path}: not a whole checkpoint folder ({problem})")
        from dist_dml.engine import WeightsOnlyCheckpointEngine

        with torch.serialization.safe_globals(WeightsOnlyCheckpointEngine.SAFE_GLOBALS):
            module_state = _read(states)["module"]
        state = {k[len("model."):]: v for k, v in module_state.items() if k.startswith("model.")}
        config = load_config(path.parent.parent / "config.yaml", list(overrides), train_data=False)
    else:
        saved = _read(path)
        if not isinstance(saved, dict) or not {"state_dict", "config"} <= set(saved):
            raise UserError(f"{path}: not a dist-dml model (expected final_model.pt or a checkpoint folder)")
        state = saved["state_dict"]
        config = build_config(apply_overrides(saved["config"], list(overrides)), source=f"{path} (its config)",
                              train_data=False)
    model = build_model(config.model, image_size=config.data.image_size)
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise UserError(f"{path} holds another model than the config describes ({_shape_difference(model, state)}); "
                        "leave model.* as the checkpoint was trained") from None
    return model.eval(), config


def _read(path: Path):
    """torch.load with weights_only=True; a file that is not a readable checkpoint is a UserError."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    return load_plain(path, "checkpoint", UserError)


def _shape_difference(model: torch.nn.Module, state: dict) -> str:
    mine = model.state_dict()
    for name, tensor in state.items():
        if name in mine and mine[name].shape != tensor.shape:
            return f"{name} is {tuple(tensor.shape)} there, {tuple(mine[name].shape)} here"
    missing = sorted(set(mine) - set(state))
    return f"it lacks {missing[0]} and {len(missing) - 1} more" if missing else "other parameter names"


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short digest of a model's weights and buffers (as float32): which model made an index."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


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


def read_embeddings(folder: Path) -> Exported:
    """All parts of an exported split, ordered by image id. A folder without parts, a part that is not a
    plain numeric array (an object array is never unpickled), parts that disagree in length, or an
    embedding that is not finite is a UserError naming the file or the items."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder (give one written by dist-dml embed)")
    meta = export_meta(folder)
    try:
        base = published(folder, meta)  # the export model.json names (an older export's parts are never read)
    except ValueError as exc:
        raise UserError(f"{folder}: {exc}; write the embeddings again with dist-dml embed") from None
    exported = _read_parts(base)
    if "count" in meta and len(exported.ids) != meta["count"]:
        raise UserError(f"{folder}: its parts hold {len(exported.ids)} embeddings, but the export wrote {meta['count']} "
                        "(parts of another export?); write the embeddings again with dist-dml embed")
    return exported


def export_meta(folder: Path) -> dict:
    """An export's MODEL_FILE ({} where an export of an older dist-dml has none); a damaged one is a UserError."""
    path = Path(folder) / MODEL_FILE
    return json_object(path, "write the embeddings again with dist-dml embed") if path.exists() else {}


def json_object(path: Path, remedy: str) -> dict:
    """A small JSON object file of ours (an export's model.json, an index's meta.json); a damaged one is a
    UserError that says what to do (``remedy``)."""
    try:
        meta = parse_json(read_regular(path))
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise UserError(f"{path}: damaged ({one_line(exc, 2000)}); {remedy}") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path}: damaged (not a JSON object); {remedy}")
    return meta


def _read_parts(folder: Path) -> Exported:
    """The parts in ``folder`` (one export's), ordered by image id, checked as read_embeddings says."""
    parts = sorted(folder.glob("part-*.parquet"))
    if parts:
        import pyarrow.parquet as pq

        try:
            tables = [pq.read_table(p) for p in parts]
            column = lambda name: np.concatenate([t.column(name).to_numpy(zero_copy_only=False) for t in tables])
            ids, labels, classes, items = column("id"), column("label"), column("class"), column("item")
            emb = np.concatenate([np.stack(t.column("embedding").to_numpy(zero_copy_only=False)) for t in tables])
        except Exception as exc:  # noqa: BLE001 -- pyarrow's errors for a damaged or foreign file are many
            raise UserError(f"{folder}: a part is not an export of dist-dml embed ({one_line(exc, 200)})") from None
    else:
        names = sorted(folder.glob("embeddings-*.npy"))
        if not names:
            raise UserError(f"{folder}: no exported embeddings (embeddings-*.npy or part-*.parquet; write them "
                            "with dist-dml embed)")
        emb, labels, ids, classes, items = (np.concatenate([_load_npy(p.with_name(p.name.replace("embeddings", kind)))
                                                            for p in names])
                                            for kind in ("embeddings", "labels", "ids", "classes", "items"))
    if emb.ndim != 2 or emb.dtype.kind not in "fiu" or not all(len(a) == len(emb) for a in (labels, ids, classes, items)):
        raise UserError(f"{folder}: the parts do not fit together ({emb.shape[0] if emb.ndim else 0} embeddings of "
                        f"shape {emb.shape[1:]}, {len(ids)} ids); write them again with dist-dml embed")
    emb = emb.astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(emb).all(axis=1))
    if len(bad):
        shown = ", ".join(f"{items[i]} (id {ids[i]})" for i in bad[:5])
        raise UserError(f"{folder}: {len(bad)} of {len(emb)} embeddings are not finite (NaN or inf), e.g. {shown}: "
                        "they could never be found; embed them again with a sound model")
    order = np.argsort(ids, kind="stable")
    return Exported(emb[order], labels[order], ids[order], classes[order].astype(str), items[order].astype(str))


def _load_npy(path: Path) -> np.ndarray:
    """One part's column: a plain array, never unpickled."""
    try:
        with open_regular(path) as f:
            array = np.load(f, allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"{path}: missing (each part has embeddings, labels, ids, classes and items)") from None
    except (ValueError, OSError, EOFError) as exc:
        raise UserError(f"{path}: not a plain numeric or text array ({one_line(exc, 200)})") from None
    if array.dtype.kind not in "fiuU" or array.ndim == 0:
        raise UserError(f"{path}: holds {array.dtype} {array.shape}, not a column of an export")
    return array


def embed_images(model: EmbeddingModel, config: RunConfig, paths: list[Path]) -> torch.Tensor:
    """Embeddings of image files, through the evaluation transform. A file that is not a decodable
    image is a UserError naming it."""
    from dist_dml.data import eval_image, new_batch
    from dist_dml.data.images import ImageTooLarge

    images = new_batch(len(paths), config.data.image_size)
    for path, out in zip(paths, images):
        try:
            eval_image(read_regular(path), config.data, out)
        except ImageTooLarge as exc:
            raise UserError(f"{path}: refused: {exc}") from None
        except OSError as exc:  # missing, a folder, a FIFO or a device (never read)
            raise UserError(f"{path}: cannot be read ({exc.strerror or exc})") from None
        except (RuntimeError, ValueError):
            raise UserError(f"{path}: not a readable image (JPEG, PNG, WebP or GIF)") from None
    with torch.no_grad():
        return model(images)


def embed_array(model: EmbeddingModel, config: RunConfig, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """Embeddings of uint8 (N, H, W, 3) RGB images through the evaluation transform of ``config`` (what the
    logged MLflow Model serves). A batch with an embedding that is not finite is a ValueError naming rows."""
    from dist_dml.data.images import eval_transform, new_batch

    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or 0 in images.shape[1:3]:
        raise ValueError(f"expected uint8 RGB images of shape (N, H, W, 3) with H, W >= 1, got {images.dtype} "
                         f"{images.shape}")
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            part = images[start:start + batch]
            crops = new_batch(len(part), config.data.image_size)
            for image, crop in zip(part, crops):
                eval_transform(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1), config.data, crop)
            out.append(model(crops).float().cpu().numpy())
    embeddings = np.concatenate(out) if out else np.zeros((0, model.head.out_features), np.float32)
    bad = np.flatnonzero(~np.isfinite(embeddings).all(axis=1))
    if len(bad):
        raise ValueError(f"the embeddings of {len(bad)} of {len(images)} images are not finite (NaN or inf): rows "
                         f"{bad[:10].tolist()}")
    return embeddings
