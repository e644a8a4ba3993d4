"""A trained model outside training: loaded from a checkpoint, fingerprinted, and embedding image files or arrays
through the evaluation transform (what `dist-dml eval / embed / search / export` and the MLflow Model use).

A checkpoint is `OUTPUT/final_model.pt` (a plain state dict with its config) or a DeepSpeed
checkpoint folder `OUTPUT/checkpoints/stepN` (the config is then `OUTPUT/config.yaml`). Both load
with `weights_only=True`.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from dist_dml.config import RunConfig, apply_overrides, build_config, load_config
from dist_dml.infra.errors import UserError, one_line
from dist_dml.infra.files import load_plain, read_regular
from dist_dml.models.embedding import EmbeddingModel, build_model


def load_checkpoint(path: str | Path, overrides: list[str] = ()) -> tuple[EmbeddingModel, RunConfig]:
    path = Path(path)
    if path.is_dir():
        from dist_dml.train.checkpoints import verify

        states = path / "mp_rank_00_model_states.pt"
        problem = verify(path)
        if problem:
            raise UserError(f"{path}: not a whole checkpoint folder ({problem})")
        from dist_dml.train.engine import WeightsOnlyCheckpointEngine

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
