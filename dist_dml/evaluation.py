"""Embedding a split on every rank, and exact retrieval metrics in memory (brute force).

Issue-5 note: the faiss path, MAP@R, R-Precision and NMI build on these; this exact version is the
reference they are tested against.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from dist_dml.distributed import DistContext


def recall_at_k(query: Tensor, query_labels: Tensor, ks: tuple[int, ...] = (1,),
                gallery: Tensor | None = None, gallery_labels: Tensor | None = None,
                block: int = 2048) -> dict[int, float]:
    """Recall@K by inner product. Without a gallery each item queries all others: the query itself
    is excluded by index, not by distance. Ties in similarity go to the lower gallery index."""
    query = query.float()
    same_set = gallery is None
    gallery = query if same_set else gallery.float()
    gallery_labels = query_labels if same_set else gallery_labels
    n = query.shape[0]
    kmax = min(max(ks), gallery.shape[0] - (1 if same_set else 0))
    hits = {k: 0 for k in ks}
    for lo in range(0, n, block):
        sim = query[lo:lo + block] @ gallery.T
        if same_set:
            rows = torch.arange(sim.shape[0])
            sim[rows, rows + lo] = -float("inf")
        top = torch.sort(-sim, dim=1, stable=True).indices[:, :kmax]  # stable: ties to the lower index
        match = gallery_labels[top] == query_labels[lo:lo + block, None]
        for k in ks:
            hits[k] += int(match[:, :k].any(dim=1).sum())
    return {k: hits[k] / max(n, 1) for k in ks}


@torch.no_grad()
def embed_split(model: nn.Module, stream, ctx: DistContext) -> tuple[Tensor, Tensor, Tensor]:
    """Every rank embeds its share of ``stream`` (an EvalStream); all ranks get the whole split,
    ordered by image id: (embeddings, labels, image ids)."""
    was_training = model.training
    model.eval()
    parts, labels, ids = [], [], []
    for images, lab, image_ids in stream.loader():
        parts.append(model(images.to(ctx.device)).float())
        labels.append(lab.to(ctx.device))
        ids.append(image_ids.to(ctx.device))
    model.train(was_training)
    dim = model.head.out_features
    local = torch.cat(parts) if parts else torch.empty(0, dim, device=ctx.device)
    local_labels = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long, device=ctx.device)
    local_ids = torch.cat(ids) if ids else torch.empty(0, dtype=torch.long, device=ctx.device)
    emb, lab, idx = (ctx.gather_uneven(t) for t in (local, local_labels, local_ids))
    order = torch.argsort(idx)
    return emb[order].cpu(), lab[order].cpu(), idx[order].cpu()
