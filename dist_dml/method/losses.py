"""Losses over sampled triplets: margin (with learnable beta), triplet, contrastive.

Pure tensor math (imports torch only). Each loss sees the global batch (every rank holds the same
gathered embeddings) and the triplets of this rank's anchors. Its value is this rank's share of the
global loss: the sum of its terms divided by the number of non-zero terms over the *global* batch,
obtained through the ``global_sum`` callable (an all-reduce on W ranks, identity on one). Summing
the shares of all ranks gives the single-process loss on the concatenated batch.

Every loss is computed in float32, whatever the model's precision, and is always connected to the
embeddings and every beta parameter, even with no active term (then it is an exact zero): every
rank runs the same backward collectives and gives every parameter a gradient.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from dist_dml.method.sampling import Triplets

GlobalSum = Callable[[Tensor], Tensor]

# Each loss's margin alpha where the config leaves it unset. Distances are between unit vectors, in [0, 2].
# margin (Wu et al. 2017) and triplet: 0.2, as in the paper. contrastive: negatives are pushed out to
# alpha itself (not alpha beyond the positives), so it needs a margin at the scale of the distances:
# 1.0, the negative margin of pytorch-metric-learning's ContrastiveLoss; with 0.2 negatives barely move.
DEFAULT_MARGINS = {"margin": 0.2, "triplet": 0.2, "contrastive": 1.0}


def _identity(t: Tensor) -> Tensor:
    return t


@dataclass(frozen=True)
class LossConfig:
    """The loss over the sampled triplets: its kind, its margin α and, for the margin loss, the boundary β
    (global, per class, per image)."""

    kind: str = "margin"  # the loss over the sampled triplets
    alpha: float | None = None  # the margin; None: the loss's own default (DEFAULT_MARGINS)
    beta_init: float = 1.2  # beta^(0); learnable when beta_global
    beta_global: bool = True  # beta^(0) learns (false: fixed at beta_init)
    beta_per_class: bool = False  # a learnable offset per class (table of num_classes)
    beta_per_image: bool = False  # a learnable offset per image (table of num_images)
    num_classes: int = 0  # per-class beta table size; 0: the training split's class count
    num_images: int = 0  # per-image beta table size; 0: the training split's image count
    nu: float = 0.0  # weight of the beta regulariser nu * sum(beta) over the pairs
    # The pair loss's weight in the training loss; 0 with proxy.kind set trains the centre loss alone (the pairs are
    # still sampled and logged: d_ap, d_an, the active share describe the embedding, and move nothing)
    weight: float = 1.0

    def __post_init__(self):
        if self.alpha is None and self.kind in DEFAULT_MARGINS:
            object.__setattr__(self, "alpha", DEFAULT_MARGINS[self.kind])

    def validate(self) -> None:
        if self.kind not in LOSSES:
            raise ValueError(f"loss.kind: unknown loss {self.kind!r}; known: {sorted(LOSSES)}")
        for key in ("alpha", "beta_init", "nu", "weight"):
            if not math.isfinite(getattr(self, key)):
                raise ValueError(f"loss.{key} must be finite, got {getattr(self, key)}")
        for key in ("alpha", "beta_init", "nu", "weight"):  # a margin, a distance and two weights
            if getattr(self, key) < 0:
                raise ValueError(f"loss.{key} must be >= 0, got {getattr(self, key)}")
        if self.kind != "margin" and (self.beta_per_class or self.beta_per_image or self.nu):
            raise ValueError(f"loss.beta_per_class, loss.beta_per_image and loss.nu apply to the margin loss only: "
                             f"loss.kind={self.kind} learns no beta (set them false / 0, or use loss.kind=margin)")
        if self.num_classes < 0 or self.num_images < 0:
            raise ValueError("loss.num_classes and loss.num_images must be >= 0 (0: sized from the data's manifest)")


class Beta(nn.Module):
    """beta_i = beta^(0) + beta^class[label_i] + beta^img[image_id_i], each part optional, in fp32.

    Parameters have shape (1,), (C,) and (N,): a 0-dim parameter crashes deepspeed.initialize. Under
    bf16/fp16 the parameters are low-precision copies; the engine hands the optimizer's fp32 masters
    to :meth:`use_masters`, and the forward then uses the masters' values (gradients still reach the
    parameters), so the loss sees beta exactly, not rounded to 2^-7.
    """

    def __init__(self, config: LossConfig):
        super().__init__()
        self.init_value = float(config.beta_init)
        init = torch.tensor([config.beta_init], dtype=torch.float32)
        if config.beta_global:
            self.global_beta = nn.Parameter(init)
        else:
            self.register_buffer("global_beta", init)  # kept for checkpoints; the forward uses init_value
        self.class_beta = nn.Parameter(torch.zeros(config.num_classes)) if config.beta_per_class else None
        self.image_beta = nn.Parameter(torch.zeros(config.num_images)) if config.beta_per_image else None
        self._masters: dict[str, Tensor] = {}

    def use_masters(self, masters: dict[str, Tensor]) -> None:
        """fp32 values of the parameters (by name) that the forward uses in their place."""
        self._masters = masters

    def _rows(self, name: str, index: Tensor) -> Tensor:
        rows = getattr(self, name)[index].float()
        master = self._masters.get(name)
        if master is None:
            return rows
        return rows + (master.to(rows.device)[index] - rows).detach()  # the master's value, the parameter's gradient

    def forward(self, labels: Tensor, image_ids: Tensor) -> Tensor:
        if isinstance(self.global_beta, nn.Parameter):
            beta = self._rows("global_beta", torch.zeros_like(labels))
        else:
            beta = torch.full(labels.shape, self.init_value, device=labels.device)
        if self.class_beta is not None:
            beta = beta + self._rows("class_beta", _checked_index(labels, self.class_beta, "label", "num_classes"))
        if self.image_beta is not None:
            beta = beta + self._rows("image_beta", _checked_index(image_ids, self.image_beta, "image id", "num_images"))
        return beta


def _checked_index(index: Tensor, table: Tensor, what: str, key: str) -> Tensor:
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= table.shape[0]):
        raise IndexError(
            f"{what} {int(index.max()) if int(index.max()) >= table.shape[0] else int(index.min())} is outside the "
            f"beta table of size {table.shape[0]}: raise loss.{key}"
        )
    return index


def pair_distance(x: Tensor, y: Tensor) -> Tensor:
    """||x_i - y_i||_2 in float32; coincident points give exactly 0 with a zero gradient (not NaN)."""
    diff = x.float() - y.float()
    squared = (diff * diff).sum(dim=1)
    positive = squared > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, squared, torch.ones_like(squared))), 0.0)


@dataclass
class LossOutput:
    loss: Tensor  # this rank's share of the global loss (sum over ranks = single-process loss)
    active: Tensor  # global number of non-zero terms (float, no grad)
    terms: Tensor  # global number of terms
    # Local sums for logging (detached): reduce across ranks before dividing.
    stats: dict[str, Tensor] = field(default_factory=dict)
    negative_distances: Tensor | None = None  # this rank's sampled D_an, detached


Terms = tuple[tuple[Tensor, ...], Tensor, dict[str, Tensor]]  # (terms, regulariser, detached stats)


class TripletLossBase(nn.Module):
    """Distances of the sampled triplets, terms, and normalisation by the global non-zero count."""

    def __init__(self, config: LossConfig):
        super().__init__()
        self.config = config

    def terms(self, d_ap: Tensor, d_an: Tensor, labels: Tensor, image_ids: Tensor,
              held: tuple[Tensor, Tensor] | None = None) -> Terms:
        """The loss terms of the triplets; labels and ids are those of the anchors; ``held``: (positive, negative)
        masks of the pairs whose other item is a memory's (they do not move beta where given)."""
        raise NotImplementedError

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        image_ids: Tensor,
        triplets: Triplets,
        global_sum: GlobalSum = _identity,
        memory_from: int | None = None,
    ) -> LossOutput:
        """``memory_from``: candidates from this index on are a memory's, whose pairs do not move beta (None: all
        pairs move it)."""
        device = embeddings.device
        # index_select: its backward is index_add, far cheaper on the CPU than advanced indexing's.
        anchor = embeddings.index_select(0, triplets.anchor)
        d_ap = pair_distance(anchor, embeddings.index_select(0, triplets.positive))
        d_an = pair_distance(anchor, embeddings.index_select(0, triplets.negative))
        anchor_labels, anchor_ids = labels[triplets.anchor], image_ids[triplets.anchor]
        held = None if memory_from is None else (triplets.positive >= memory_from, triplets.negative >= memory_from)
        terms, regulariser, stats = self.terms(d_ap, d_an, anchor_labels, anchor_ids, held)

        local_active = sum(((t > 0).sum() for t in terms), torch.zeros((), dtype=torch.long, device=device))
        local_terms = torch.tensor(float(len(terms) * len(triplets)), device=device)
        active, num_terms = global_sum(torch.stack([local_active.float(), local_terms]))
        total = sum((t.sum() for t in terms), torch.zeros((), device=device)) + regulariser
        # Zero-valued, but it reaches every embedding and every parameter of the loss.
        connection = 0.0 * embeddings.float().sum()
        for p in self.parameters():
            connection = connection + 0.0 * p.float().sum().to(device)
        loss = (total / active if float(active) > 0 else 0.0 * total) + connection
        stats.update(d_ap_sum=d_ap.detach().sum(), d_an_sum=d_an.detach().sum(), triplets=local_terms / len(terms))
        return LossOutput(loss, active.detach(), num_terms.detach(), stats, d_an.detach())


class MarginLoss(TripletLossBase):
    """(alpha + y (D - beta_a))_+ for the positive (y = +1) and negative (y = -1) pair of each triplet,
    plus nu * beta_a per (anchor, positive) pair (Wu et al. 2017, eq. 4-5)."""

    def __init__(self, config: LossConfig):
        super().__init__(config)
        self.beta = Beta(config)

    def terms(self, d_ap, d_an, labels, image_ids, held=None):
        beta = self.beta(labels, image_ids).to(d_ap.device)
        alpha = self.config.alpha
        stats = {"beta_sum": beta.detach().sum()}
        if beta.numel():
            stats.update(beta_min=beta.detach().min(), beta_max=beta.detach().max())
        beta_p = beta_n = beta
        if held is not None:  # a memory's pairs see beta but do not move it
            beta_p, beta_n = (torch.where(mask, beta.detach(), beta) for mask in held)
        pos, neg = torch.relu(alpha + d_ap - beta_p), torch.relu(alpha - d_an + beta_n)
        return (pos, neg), self.config.nu * beta.sum(), stats


class TripletMarginLoss(TripletLossBase):
    """(D_ap - D_an + alpha)_+ per triplet."""

    def terms(self, d_ap, d_an, labels, image_ids, held=None):
        return (torch.relu(d_ap - d_an + self.config.alpha),), d_ap.new_zeros(()), {}


class ContrastiveLoss(TripletLossBase):
    """D_ap^2 for each positive pair and (alpha - D_an)_+^2 for each negative pair (Hadsell et al. 2006)."""

    def terms(self, d_ap, d_an, labels, image_ids, held=None):
        return (d_ap * d_ap, torch.relu(self.config.alpha - d_an) ** 2), d_ap.new_zeros(()), {}


LOSSES: dict[str, type[TripletLossBase]] = {
    "margin": MarginLoss,
    "triplet": TripletMarginLoss,
    "contrastive": ContrastiveLoss,
}


def build_loss(config: LossConfig) -> TripletLossBase:
    config.validate()
    return LOSSES[config.kind](config)
