"""After training: evaluate a checkpoint, export embeddings, build a faiss index, search it with images.

A checkpoint is `OUTPUT/final_model.pt` (a plain state dict with its config) or a DeepSpeed
checkpoint folder `OUTPUT/checkpoints/stepN` (the config is then `OUTPUT/config.yaml`). Both load
with `weights_only=True`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dist_dml.config import RunConfig, apply_overrides, build_config, load_config
from dist_dml.models import EmbeddingModel, build_model


def load_checkpoint(path: str | Path, overrides: list[str] = ()) -> tuple[EmbeddingModel, RunConfig]:
    path = Path(path)
    if path.is_dir():
        states = path / "mp_rank_00_model_states.pt"
        if not states.is_file():
            raise FileNotFoundError(f"{path}: not a DeepSpeed checkpoint folder (no {states.name})")
        from dist_dml.engine import WeightsOnlyCheckpointEngine

        with torch.serialization.safe_globals(WeightsOnlyCheckpointEngine.SAFE_GLOBALS):
            module_state = torch.load(states, map_location="cpu", weights_only=True)["module"]
        state = {k[len("model."):]: v for k, v in module_state.items() if k.startswith("model.")}
        config = load_config(path.parent.parent / "config.yaml", list(overrides))
    else:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        state = saved["state_dict"]
        config = build_config(apply_overrides(saved["config"], list(overrides)), source=f"{path} (its config)")
    model = build_model(config.model)
    model.load_state_dict(state)
    return model.eval(), config


def write_embeddings(emb: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor, out: Path, part: int,
                     fmt: str = "npy") -> list[Path]:
    """One part of an exported split: npy files, or one parquet file (id, label, embedding)."""
    out.mkdir(parents=True, exist_ok=True)
    emb_np, lab_np, ids_np = emb.float().cpu().numpy(), labels.cpu().numpy(), ids.cpu().numpy()
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"id": ids_np, "label": lab_np,
                          "embedding": pa.FixedSizeListArray.from_arrays(emb_np.reshape(-1), emb_np.shape[1])})
        path = out / f"part-{part:05d}.parquet"
        pq.write_table(table, path)
        return [path]
    paths = []
    for name, array in (("embeddings", emb_np), ("labels", lab_np), ("ids", ids_np)):
        paths.append(out / f"{name}-{part:05d}.npy")
        np.save(paths[-1], array)
    return paths


def read_embeddings(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All parts of an exported split, ordered by image id."""
    folder = Path(folder)
    parts = sorted(folder.glob("part-*.parquet"))
    if parts:
        import pyarrow.parquet as pq

        tables = [pq.read_table(p) for p in parts]
        ids = np.concatenate([t.column("id").to_numpy() for t in tables])
        labels = np.concatenate([t.column("label").to_numpy() for t in tables])
        emb = np.concatenate([np.stack(t.column("embedding").to_numpy(zero_copy_only=False)) for t in tables])
    else:
        names = sorted(folder.glob("embeddings-*.npy"))
        if not names:
            raise FileNotFoundError(f"{folder}: no exported embeddings (embeddings-*.npy or part-*.parquet)")
        emb = np.concatenate([np.load(p) for p in names])
        labels = np.concatenate([np.load(p.with_name(p.name.replace("embeddings", "labels"))) for p in names])
        ids = np.concatenate([np.load(p.with_name(p.name.replace("embeddings", "ids"))) for p in names])
    order = np.argsort(ids, kind="stable")
    return emb[order].astype(np.float32), labels[order], ids[order]


def embed_images(model: EmbeddingModel, config: RunConfig, paths: list[Path]) -> torch.Tensor:
    """Embeddings of image files, through the evaluation transform."""
    from dist_dml.data import eval_image, new_batch

    images = new_batch(len(paths), config.data.image_size)
    for path, out in zip(paths, images):
        eval_image(Path(path).read_bytes(), config.data, out)
    with torch.no_grad():
        return model(images)
