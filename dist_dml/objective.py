"""The training objective over the global batch: gather, sample for local anchors, loss share.

Knows nothing of process groups: the collectives come from the :class:`DistContext` it is handed,
which are identities in one process.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from dist_dml.distributed import DistContext
from dist_dml.losses import LossOutput, TripletLossBase
from dist_dml.sampling import Sampler, Triplets


@dataclass
class StepResult:
    output: LossOutput
    triplets: Triplets
    spread: Tensor | None = None  # the global batch's RMS pairwise distance (detached; the same on every rank)


def embedding_spread(embeddings: Tensor) -> Tensor:
    """The root mean square distance over all pairs (i, j) of L2-normalised embeddings, in O(B d): the mean of
    ||e_i - e_j||^2 over all pairs is 2 - 2 ||mean e||^2. About sqrt(2) for embeddings spread over the sphere,
    0 where they all collapse onto one point."""
    mean = embeddings.detach().float().mean(dim=0)
    return (2.0 - 2.0 * mean.pow(2).sum()).clamp_min(0.0).sqrt()


class GlobalBatchObjective:
    """Local anchors x global candidates: O(B_local x B_global) per rank, never O(B_global^2)."""

    def __init__(self, sampler: Sampler, loss: TripletLossBase, ctx: DistContext):
        self.sampler = sampler
        self.loss = loss
        self.ctx = ctx

    def __call__(self, local_embeddings: Tensor, labels: Tensor, image_ids: Tensor, step: int) -> StepResult:
        ctx = self.ctx
        local_embeddings = local_embeddings.float()  # the loss is fp32 even when the model runs in bf16
        embeddings = ctx.all_gather_with_grad(local_embeddings)
        labels = ctx.all_gather_no_grad(labels.to(local_embeddings.device))
        image_ids = ctx.all_gather_no_grad(image_ids.to(local_embeddings.device))
        batch = local_embeddings.shape[0]  # equal on every rank: the data contract
        start = ctx.rank * batch
        triplets = self.sampler(embeddings.detach(), labels, start, start + batch, step)
        output = self.loss(embeddings, labels, image_ids, triplets, ctx.all_reduce_sum)
        return StepResult(output, triplets, embedding_spread(embeddings))
