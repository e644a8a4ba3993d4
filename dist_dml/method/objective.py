"""The training objective over the global batch: gather, sample for local anchors, loss share.

Knows nothing of process groups: the collectives come from the :class:`DistContext` it is handed,
which are identities in one process.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dist_dml.infra.distributed import DistContext
from dist_dml.method.losses import LossOutput, TripletLossBase
from dist_dml.method.cross_batch_memory import CrossBatchMemory
from dist_dml.method.sampling import Sampler, Triplets


@dataclass
class StepResult:
    output: LossOutput
    triplets: Triplets
    spread: Tensor | None = None  # the global batch's RMS pairwise distance (detached; the same on every rank)
    batch: tuple[Tensor, Tensor, Tensor] | None = None  # the global batch (embeddings detached, labels, ids)
    memory: dict[str, float] = field(default_factory=dict)  # this rank's draws from the cross-batch memory
    centres: Tensor | None = None  # this rank's share of the weighted loss against class centres (detached)


def embedding_spread(embeddings: Tensor) -> Tensor:
    """The root mean square distance over all pairs (i, j) of L2-normalised embeddings, in O(B d): the mean of
    ||e_i - e_j||^2 over all pairs is 2 - 2 ||mean e||^2. About sqrt(2) for embeddings spread over the sphere,
    0 where they all collapse onto one point."""
    mean = embeddings.detach().float().mean(dim=0)
    return (2.0 - 2.0 * mean.pow(2).sum()).clamp_min(0.0).sqrt()


class GlobalBatchObjective:
    """Local anchors x global candidates: O(B_local x (B_global + memory)) per rank, never O(B_global^2).

    With a cross-batch memory, the candidates are the global batch followed by the memory's items
    (detached: only the batch receives gradient); a step's global batch (StepResult.batch) goes into it once
    the step is taken (the run's memory part does that).

    With class centres (``centres``: a callable of the global batch's embeddings, labels and the step giving this
    rank's share of a weighted loss against them, whose ``parameters()`` are the centres, e.g.
    dist_dml.train.centres.ClassCentres), that share is
    added to the pair loss's (weighted by ``pair_weight``): the same global batch, gathered once."""

    def __init__(self, sampler: Sampler, loss: TripletLossBase, ctx: DistContext,
                 memory: CrossBatchMemory | None = None, centres=None, pair_weight: float = 1.0):
        self.sampler = sampler
        self.loss = loss
        self.ctx = ctx
        self.memory = memory
        self.centres = centres
        self.pair_weight = pair_weight  # loss.weight: 0 with centres trains them alone (the pairs logged, not trained)

    def __call__(self, local_embeddings: Tensor, labels: Tensor, image_ids: Tensor, step: int) -> StepResult:
        ctx = self.ctx
        local_embeddings = local_embeddings.float()  # the loss is fp32 even when the model runs in bf16
        embeddings = ctx.all_gather_with_grad(local_embeddings)
        labels = ctx.all_gather_no_grad(labels.to(local_embeddings.device))
        image_ids = ctx.all_gather_no_grad(image_ids.to(local_embeddings.device))
        batch = local_embeddings.shape[0]  # equal on every rank: the data contract
        start = ctx.rank * batch
        candidates, c_labels, c_ids, limit, steps = embeddings, labels, image_ids, None, None
        own = None  # memory.mode add: the triplets of the batch alone, kept beside those drawn with the memory
        if self.memory is not None and self.memory.active(step):
            m_emb, m_labels, m_ids, steps = self.memory.contents()
            candidates = torch.cat([embeddings, m_emb.to(embeddings.device)])
            c_labels, c_ids = torch.cat([labels, m_labels.to(labels.device)]), torch.cat([image_ids, m_ids.to(labels.device)])
            limit = None if self.memory.config.positives else len(labels)
            if self.memory.config.mode == "add":
                own = self.sampler(embeddings.detach(), labels, start, start + batch, step)
        triplets = self.sampler(candidates.detach(), c_labels, start, start + batch, step, positive_limit=limit)
        if own is not None:
            triplets = _joined(own, triplets)
        memory_from = len(labels) if steps is not None and not self.memory.config.beta else None
        output = self.loss(candidates, c_labels, c_ids, triplets, ctx.all_reduce_sum, memory_from=memory_from)
        drawn = _memory_draws(triplets, len(labels), steps, step, self.memory) if steps is not None else {}
        if self.pair_weight != 1:
            output = dataclasses.replace(output, loss=output.loss * self.pair_weight)
        centres = None
        if self.centres is not None:
            centres = self.centres(embeddings, labels, step)
            output = dataclasses.replace(output, loss=output.loss + centres)
        return StepResult(output, triplets, embedding_spread(embeddings), (embeddings.detach(), labels, image_ids), drawn,
                          None if centres is None else centres.detach())


def _joined(own: Triplets, drawn: Triplets) -> Triplets:
    """The batch's own triplets followed by those drawn with the memory (indices into the same candidates: the
    batch comes first in both); anchors counted once, fallbacks as the batch's."""
    return Triplets(torch.cat([own.anchor, drawn.anchor]), torch.cat([own.positive, drawn.positive]),
                    torch.cat([own.negative, drawn.negative]), own.num_anchors, own.num_fallback)


def _memory_draws(triplets: Triplets, batch: int, steps: Tensor, step: int, memory: CrossBatchMemory) -> dict:
    """This rank's draws from the memory: negatives and positives taken from it, and their summed age in steps."""
    negatives, positives = triplets.negative >= batch, triplets.positive >= batch
    drawn = torch.cat([triplets.negative[negatives], triplets.positive[positives]]) - batch
    age = (step - steps.to(drawn.device)[drawn]).sum() if drawn.numel() else torch.zeros((), dtype=torch.long)
    return {"memory_negatives": float(negatives.sum()), "memory_positives": float(positives.sum()),
            "memory_age_sum": float(age), "memory_draws": float(drawn.numel()), "memory_fill": float(memory.fill)}
