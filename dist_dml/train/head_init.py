"""model.head_init=pca: the head of a fresh run set to the principal directions of the backbone's features on a
sample of training images (models.embedding.pca_head), so that step 0 ranks items as the backbone's own features
do, centred, instead of through a random projection. Every rank embeds its share of the sample; the sums are
all-reduced, so every rank sets the same head."""
from __future__ import annotations

import math
import time

import torch

from dist_dml.data import EvalStream
from dist_dml.models.embedding import EmbeddingModel, pca_head


@torch.no_grad()
def init_head_by_pca(model: EmbeddingModel, cfg, ctx, verdicts=None) -> str:
    """Set ``model``'s head from ``cfg.model.head_init_images`` training images (over all ranks); a line saying what
    it did. Call on every rank."""
    started = time.time()
    want = math.ceil(cfg.model.head_init_images / ctx.world_size)
    stream = EvalStream(cfg.data, cfg.data.train_split, ctx.rank, ctx.world_size, cfg.eval.batch_size, verdicts=verdicts)
    width = model.head.in_features
    total = torch.zeros(width, dtype=torch.float64, device=ctx.device)
    outer = torch.zeros(width, width, dtype=torch.float64, device=ctx.device)
    seen, was_training = 0, model.training
    model.eval()
    for batch in stream.loader():
        if seen >= want:
            break
        images = batch.images[:want - seen]
        if not len(images):
            continue
        features = model.features(images.to(ctx.device)).double()
        total += features.sum(dim=0)
        outer += features.T @ features
        seen += len(images)
    model.train(was_training)
    sums = ctx.all_reduce_sum(torch.cat([total, outer.flatten(), torch.tensor([seen], dtype=torch.float64,
                                                                              device=ctx.device)]))
    count = int(sums[-1])
    if count < 2:
        return "[train] head: random (model.head_init=pca found fewer than 2 training images to embed)"
    weight, bias = pca_head(sums[:width], sums[width:-1].view(width, width), count, model.head.out_features)
    model.head.weight.copy_(weight.to(model.head.weight))
    model.head.bias.copy_(bias.to(model.head.bias))
    return (f"[train] head: the {min(model.head.out_features, width)} principal directions of the backbone's "
            f"{width} features on {count} training images, whitened (model.head_init=pca, "
            f"{time.time() - started:.0f}s)")
