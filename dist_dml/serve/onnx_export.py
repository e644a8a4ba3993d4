"""`dist-dml export CHECKPOINT --onnx OUT`: the embedding model as an ONNX graph a serving stack reads,
with the preprocessing inside.

    input  "images":     uint8 (N, S, S, 3), RGB, S = the training's data.image_size (resize and crop first,
                         as the evaluation does: the shorter side to data.resize, the central S square)
    output "embeddings": float32 (N, d), L2-normalised

The batch is dynamic. The graph normalises with the backbone's mean and std, runs the backbone and the
head and L2-normalises; the export is checked against torch with onnxruntime on the same images (a
batch of 1 and one of 7) before it is kept.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from dist_dml.infra.errors import UserError, one_line
from dist_dml.infra.files import replacing

TOLERANCE = 1e-4  # the largest difference from torch an exported embedding may have


class NHWCEmbedder(nn.Module):
    """uint8 NHWC images to the embedding model's L2-normalised embeddings."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.permute(0, 3, 1, 2))


MIN_OPSET = 18  # torch's dynamo exporter writes no earlier opset (asked for one, it writes 18)


def export_onnx(checkpoint: str | Path, out: str | Path, opset: int = MIN_OPSET) -> dict[str, float]:
    """Write the ONNX graph of ``checkpoint`` to ``out`` (atomically), checked with onnxruntime against
    torch; returns the largest difference per batch size checked."""
    from dist_dml.serve.trained_model import load_checkpoint

    model, config = load_checkpoint(checkpoint)
    module = NHWCEmbedder(model.float()).eval()
    size = config.data.image_size
    example = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1)
    with replacing(out) as tmp:  # checked before it replaces anything
        try:
            program = torch.onnx.export(module, (example,), dynamo=True, input_names=["images"],
                                        output_names=["embeddings"], dynamic_shapes={"images": {0: batch}},
                                        opset_version=opset, verbose=False)
            program.save(str(tmp))
        except Exception as exc:  # noqa: BLE001 -- torch.export and onnxscript raise many kinds for what they cannot take
            raise UserError(f"{checkpoint}: its model ({config.model.backbone}) cannot be exported to ONNX: "
                            f"{one_line(exc)}") from None
        differences = check_onnx(tmp, module, size)
    return differences


def check_onnx(path: str | Path, module: nn.Module, size: int, batches=(1, 7)) -> dict[str, float]:
    """The largest difference between onnxruntime's embeddings and torch's, per batch size, on the same
    random images; a UserError above TOLERANCE."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    differences = {}
    for n in batches:
        images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        with torch.no_grad():
            want = module(torch.from_numpy(images)).numpy()
        got = session.run(["embeddings"], {"images": images})[0]
        differences[f"batch_{n}"] = float(np.abs(got - want).max())
        if not np.isfinite(got).all() or differences[f"batch_{n}"] > TOLERANCE:
            raise UserError(f"{path}: onnxruntime's embeddings differ from torch's by {differences[f'batch_{n}']:.2e} "
                            f"on a batch of {n} (more than {TOLERANCE}): the export is not kept")
    return differences
