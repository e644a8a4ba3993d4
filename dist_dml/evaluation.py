"""Exact retrieval metrics in memory (brute force): the reference the faiss path is tested against."""
from __future__ import annotations

import torch
from torch import Tensor


def recall_at_k(embeddings: Tensor, labels: Tensor, ks: tuple[int, ...] = (1,), block: int = 4096) -> dict[int, float]:
    """Recall@K on one split: each item queries all others (itself excluded by index, not distance).

    Ties in similarity go to the lower index. Blocks of queries keep memory at O(block x N).
    """
    embeddings = embeddings.float()
    n, kmax = embeddings.shape[0], min(max(ks), embeddings.shape[0] - 1)
    hits = {k: 0 for k in ks}
    for lo in range(0, n, block):
        sim = embeddings[lo:lo + block] @ embeddings.T
        sim[torch.arange(sim.shape[0]), torch.arange(lo, lo + sim.shape[0])] = -float("inf")
        # topk is not stable under ties: sort by (-sim, index) explicitly.
        top = torch.sort(-sim, dim=1, stable=True).indices[:, :kmax]
        match = labels[top] == labels[lo:lo + block, None]
        for k in ks:
            hits[k] += int(match[:, :k].any(dim=1).sum())
    return {k: hits[k] / n for k in ks}
