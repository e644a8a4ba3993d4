"""The code of the MLflow Model a training logs (MLflow's "models from code": nothing is pickled; MLflow
stores this file with the model and runs it to load it, with the dist_dml package beside it).

    model = mlflow.pyfunc.load_model("models:/NAME/1")
    embeddings = model.predict(images)   # uint8 (N, H, W, 3) RGB -> float32 (N, d), L2-normalised

Each image goes through the evaluation transform of the training's config (the shorter side resized to
data.resize, the central data.image_size square), the backbone's normalisation and the embedding head:
the embeddings `dist-dml embed` writes for the same images. A batch whose embedding is not finite for
some image is refused, naming the rows.
"""
from __future__ import annotations

import mlflow.pyfunc
import numpy as np


class Embedder(mlflow.pyfunc.PythonModel):
    """uint8 (N, H, W, 3) RGB images to L2-normalised float32 embeddings (N, d)."""

    def load_context(self, context):
        from dist_dml.serve.trained_model import load_checkpoint

        self.model, self.config = load_checkpoint(context.artifacts["checkpoint"])  # weights_only

    def predict(self, context, model_input: np.ndarray, params=None):
        # The hint is what MLflow takes as "validate nothing, infer no signature" (the logged signature says
        # it all); without one, MLflow warns in the middle of the training's log on every import of this file.
        from dist_dml.serve.trained_model import embed_array

        return embed_array(self.model, self.config, model_input)


mlflow.models.set_model(Embedder())
