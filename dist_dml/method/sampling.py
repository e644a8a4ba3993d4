"""Triplet samplers: local anchors against the global batch.

Pure tensor math (imports torch only), so every sampler can be tested without a process group.

Every rank holds the same global batch ``embeddings`` (B_global x d, L2-normalised) and ``labels``
and samples for its own anchors, the rows ``[anchor_start, anchor_stop)``. Positives of an anchor
are all other items of the global batch with its label; each (anchor, positive) pair gets one
negative. The output is a :class:`Triplets` of global indices. With a cross-batch memory the
candidates are the global batch followed by the memory's items (dist_dml.method.cross_batch_memory): anchors stay in
the batch, negatives come from both, and positives from the first ``positive_limit`` candidates only
(the batch) unless the memory gives positives too.

Determinism across world sizes: the uniform numbers that drive the draws form a (B_global x P_max)
table generated from (seed, step) alone; anchor ``g`` uses row ``g``. So the same global batch gives
the same triplets on 1 rank or on W ranks.

Cost: O(B_local x B_global) time, and memory of a few (chunk x B_global) buffers: anchors are
processed in chunks of ``chunk_elements // B_global`` rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor

from dist_dml.infra.seeding import mix


@dataclass(frozen=True)
class SamplerConfig:
    """Which negative each (anchor, positive) pair of the global batch gets, and the distance-weighted
    sampler's parameters."""

    kind: str = "distance_weighted"  # which negative each (anchor, positive) pair gets
    cutoff: float = 0.5  # distance weights are clamped at this distance (the paper's lambda)
    nonzero_loss_cutoff: float = 1.4  # farther negatives give zero margin loss: never drawn
    seed: int = 0  # the draws depend only on (seed, step, the anchor's global index): the same on 1 or W ranks
    chunk_elements: int = 1 << 22  # anchors per chunk = chunk_elements // candidates (16 MB a buffer)

    def validate(self) -> None:
        if self.kind not in SAMPLERS:
            raise ValueError(f"sampler.kind: unknown sampler {self.kind!r}; known: {sorted(SAMPLERS)}")
        if not 0.0 < self.cutoff < 2.0:
            raise ValueError(f"sampler.cutoff must lie in (0, 2), got {self.cutoff}")
        if not self.cutoff < self.nonzero_loss_cutoff:
            raise ValueError(
                f"sampler.nonzero_loss_cutoff ({self.nonzero_loss_cutoff}) must exceed sampler.cutoff ({self.cutoff})"
            )
        if self.chunk_elements < 1:
            raise ValueError(f"sampler.chunk_elements must be positive, got {self.chunk_elements}")
        if self.seed < 0:
            raise ValueError(f"sampler.seed must be >= 0, got {self.seed}")


@dataclass(frozen=True)
class Triplets:
    """Sampled (anchor, positive, negative) triplets, as indices into the global batch."""

    anchor: Tensor
    positive: Tensor
    negative: Tensor
    num_anchors: int  # local anchors that have at least one positive and one negative
    num_fallback: int  # of those, anchors whose negatives were drawn by the fallback rule

    def __len__(self) -> int:
        return int(self.anchor.numel())


class Sampler(Protocol):
    def __call__(
        self, embeddings: Tensor, labels: Tensor, anchor_start: int, anchor_stop: int, step: int,
        positive_limit: int | None = None,
    ) -> Triplets: ...


def _positives(groups: "_Groups", anchors: Tensor, limit: int | None) -> "_Pairs":
    """Each anchor's positives (same-label columns, self excluded), among the first ``limit`` candidates
    only where a limit is given (the global batch, with a cross-batch memory after it)."""
    pairs = _block_pairs(groups, anchors)
    if limit is None:
        return pairs
    keep = groups.order[pairs.column] < limit
    return _Pairs(pairs.row[keep], pairs.column[keep], pairs.slot[keep])


def _has_positive(groups: "_Groups", labels: Tensor, anchors: Tensor, limit: int | None) -> Tensor:
    """Whether each anchor has a positive (among the first ``limit`` candidates where a limit is given)."""
    if limit is None:
        return groups.count[anchors] > 1
    return _Groups(labels[:limit]).count[anchors] > 1


# Distances are computed from similarities: D = sqrt(2 - 2 s) for unit vectors.
def distance_to_similarity(distance: float) -> float:
    return 1.0 - distance * distance / 2.0


def similarity_to_distance(similarity: Tensor) -> Tensor:
    return torch.sqrt(torch.clamp(2.0 - 2.0 * similarity, min=0.0))


_SPHERE_EDGE = 1e-3  # clamp distances at 2 - eps: log(1 - d^2/4) is -inf at d = 2


def sphere_log_density(distance: Tensor, dim: int) -> Tensor:
    """log q(d) up to a constant, for points uniform on the unit sphere in R^dim (Wu et al., eq. 1)."""
    return (dim - 2.0) * torch.log(distance) + ((dim - 3.0) / 2.0) * torch.log(1.0 - distance * distance / 4.0)


def distance_weighted_log_weights(distance: Tensor, dim: int, cutoff: float) -> Tensor:
    """log w = -log q(d_c), d_c = clamp(d, cutoff, 2 - eps): the paper's min(lambda, 1/q(d))."""
    clamped = distance.clamp(cutoff, 2.0 - _SPHERE_EDGE)
    return -sphere_log_density(clamped, dim)


class _Groups:
    """The global batch ordered by label, so each label is one contiguous block of columns.

    ``order[j]`` is the global index of sorted column ``j`` and ``position`` its inverse; for each
    global item, ``start`` and ``count`` give its label's block. A stable sort keeps each block in
    global-index order.
    """

    def __init__(self, labels: Tensor):
        labels = labels.reshape(-1)
        self.order = torch.argsort(labels, stable=True)
        self.position = torch.empty_like(self.order)
        self.position[self.order] = torch.arange(labels.numel(), device=labels.device)
        _, counts = torch.unique_consecutive(labels[self.order], return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        group = torch.repeat_interleave(torch.arange(counts.numel(), device=labels.device), counts)[self.position]
        self.start = starts[group]
        self.count = counts[group]
        self.size = labels.numel()
        self.max_positives = int(counts.max()) - 1 if counts.numel() else 0


@dataclass
class _Pairs:
    """Same-label columns of a block of anchors; ``slot`` numbers each anchor's positives."""

    row: Tensor  # anchor row within the block
    column: Tensor  # sorted column of the same-label item
    slot: Tensor  # 0 .. positives-1 within its anchor, in global-index order


def _block_pairs(groups: _Groups, anchors: Tensor, include_self: bool = False) -> _Pairs:
    """Every same-label column of each anchor in ``anchors`` (global indices), self excluded unless asked."""
    count = groups.count[anchors]
    row = torch.repeat_interleave(torch.arange(anchors.numel(), device=anchors.device), count)
    first = torch.cumsum(count, 0) - count
    offset = torch.arange(row.numel(), device=anchors.device) - first[row]
    column = groups.start[anchors][row] + offset
    if include_self:
        return _Pairs(row, column, offset)
    self_offset = (groups.position[anchors] - groups.start[anchors])[row]
    keep = offset != self_offset
    slot = offset - (offset > self_offset).long()
    return _Pairs(row[keep], column[keep], slot[keep])


def _rowwise_searchsorted(sorted_rows: Tensor, row: Tensor, values: Tensor, right: bool) -> Tensor:
    """searchsorted of each ``values[i]`` in ``sorted_rows[row[i]]``, without copying a row per value.

    The values are laid out as a (rows x max per row) table padded with +inf, so one batched
    searchsorted runs over the matrix in place.
    """
    if row.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=sorted_rows.device)
    counts = torch.bincount(row, minlength=sorted_rows.shape[0])
    order = torch.argsort(row, stable=True)
    first = torch.cumsum(counts, 0) - counts
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=row.device) - first[row[order]]
    padded = torch.full((sorted_rows.shape[0], int(counts.max())), math.inf, dtype=sorted_rows.dtype, device=row.device)
    padded[row, position] = values.to(sorted_rows.dtype)
    found = torch.searchsorted(sorted_rows, padded, right=right)
    return found[row, position]


def draw_uniforms(seed: int, step: int, rows: int, cols: int) -> Tensor:
    """The (rows x cols) table of U[0, 1) for one step, identical on every rank (CPU generator)."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(mix(seed, step))
    return torch.rand((rows, max(cols, 1)), generator=generator, dtype=torch.float64)


def _chunks(anchor_start: int, anchor_stop: int, columns: int, chunk_elements: int):
    rows = max(1, chunk_elements // max(columns, 1))
    for lo in range(anchor_start, anchor_stop, rows):
        yield lo, min(anchor_stop, lo + rows)


def _collect(parts: list[tuple[Tensor, Tensor, Tensor]], num_anchors: int, num_fallback: int, device) -> Triplets:
    if not parts:
        parts = [(torch.empty(0, dtype=torch.long, device=device),) * 3]
    anchor, positive, negative = (torch.cat(x) for x in zip(*parts))
    return Triplets(anchor, positive, negative, num_anchors, num_fallback)


class DistanceWeightedSampler:
    """Distance-weighted negatives (Wu et al. 2017), normalised per anchor row.

    For anchor a, negative j is drawn with probability proportional to min(lambda, 1/q(D_aj)) among
    the negatives with D_aj < nonzero_loss_cutoff; an anchor without such a negative draws
    uniformly among all its negatives (counted in ``num_fallback``). Draws are inverse-CDF lookups
    of the step's uniform table, one per (anchor, positive) pair, with replacement.

    The weight is evaluated on similarities: with s = 1 - D^2/2, log w = -log q(D) equals
    ((2-n)/2) log(1-s) - ((n-3)/2) log(1+s) + const, and each row's max is subtracted before exp,
    so no row underflows however far its negatives are (a single global max would: at n = 128 the
    weights span about e^92). Weights below e^-87 of the row max are raised to it: far below what a
    float32 cumulative sum resolves, and it keeps exp off its slow subnormal path.
    """

    def __init__(self, config: SamplerConfig):
        self.config = config

    def __call__(self, embeddings: Tensor, labels: Tensor, anchor_start: int, anchor_stop: int, step: int,
                 positive_limit: int | None = None) -> Triplets:
        cfg = self.config
        with torch.no_grad():
            embeddings = embeddings.detach().float()
            groups = _Groups(labels)
            uniforms = draw_uniforms(cfg.seed, step, groups.size, groups.max_positives)
            candidates = embeddings[groups.order]
            workspace = _Workspace(anchor_stop - anchor_start, groups.size, cfg.chunk_elements, embeddings.device)
            parts, num_anchors, num_fallback = [], 0, 0
            for lo, hi in _chunks(anchor_start, anchor_stop, groups.size, cfg.chunk_elements):
                anchors = torch.arange(lo, hi, device=embeddings.device)
                weights, valid, fallback = self.row_weights(embeddings[lo:hi], candidates, groups, anchors, workspace)
                if positive_limit is not None:
                    valid &= _has_positive(groups, labels, anchors, positive_limit)
                cumulative = torch.cumsum(weights, dim=1, out=weights)
                pairs = _positives(groups, anchors, positive_limit)
                keep = valid[pairs.row]
                row, column, slot = pairs.row[keep], pairs.column[keep], pairs.slot[keep]
                u = uniforms[anchors[row].cpu(), slot.cpu()].to(cumulative.device)
                negative = _inverse_cdf(cumulative, row, u)
                parts.append((anchors[row], groups.order[column], groups.order[negative]))
                num_anchors += int(valid.sum())
                num_fallback += int((fallback & valid).sum())
            return _collect(parts, num_anchors, num_fallback, embeddings.device)

    def row_weights(self, anchor_emb: Tensor, candidates: Tensor, groups: _Groups, anchors: Tensor, workspace: "_Workspace"):
        """Unnormalised sampling weights over the sorted columns, each row's max being 1.

        Returns (weights [rows x B], valid [rows], fallback [rows]): valid anchors have a positive
        and a negative; fallback rows (no negative within the nonzero-loss cutoff) weigh every
        negative 1. Same-label columns, self included, weigh 0. The weights live in ``workspace``.
        """
        cfg = self.config
        rows = anchor_emb.shape[0]
        sim, log_w, eligible = workspace.views(rows)
        s_eligible = distance_to_similarity(cfg.nonzero_loss_cutoff)
        s_low = max(distance_to_similarity(2.0 - _SPHERE_EDGE), s_eligible)
        s_high = distance_to_similarity(cfg.cutoff)
        dim = anchor_emb.shape[1]
        coef_minus, coef_plus = (2.0 - dim) / 2.0, -(dim - 3.0) / 2.0

        torch.mm(anchor_emb, candidates.T, out=sim)
        # Ineligible similarities are clamped onto s_low, where the weight is harmless; the 0/1
        # mask remembers them. (s - s_eligible > 0 is exact in IEEE arithmetic.)
        sim.clamp_(s_low, s_high)
        torch.sub(sim, s_eligible, out=eligible).sign_()
        same_label = _block_pairs(groups, anchors, include_self=True)
        eligible.view(-1).index_fill_(0, same_label.row * groups.size + same_label.column, 0.0)

        torch.add(_ONE, sim, alpha=-1.0, out=log_w).log_().mul_(coef_minus)
        log_w.add_(sim.add_(1.0).log_(), alpha=coef_plus)
        # Shift every log weight to >= 1 before masking: a masked 0 then never wins the row max,
        # and a row whose max is 0 has no eligible negative.
        log_w.add_(1.0 - _min_log_weight(coef_minus, coef_plus, s_low, s_high)).mul_(eligible)
        row_max = log_w.amax(dim=1, keepdim=True)
        weights = log_w.sub_(row_max).clamp_(min=_LOG_FLOAT_TINY).exp_().mul_(eligible)

        count = groups.count[anchors]
        has_negative = count < groups.size
        fallback = (row_max.squeeze(1) == 0) & has_negative
        if bool(fallback.any()):
            fallback_rows = fallback.nonzero().squeeze(1)
            weights[fallback_rows] = 1.0
            in_rows = fallback[same_label.row]
            weights[same_label.row[in_rows], same_label.column[in_rows]] = 0.0
        return weights, has_negative & (count > 1), fallback

    def probabilities(self, embeddings: Tensor, labels: Tensor, anchor_start: int, anchor_stop: int) -> Tensor:
        """Per-anchor sampling probabilities (rows: anchors, columns: global index), in float64.

        The distribution the sampler draws from; for tests and plots, not for training. Rows of
        anchors without a positive or a negative are all zero.
        """
        with torch.no_grad():
            embeddings = embeddings.detach().float()
            groups = _Groups(labels)
            anchors = torch.arange(anchor_start, anchor_stop, device=embeddings.device)
            workspace = _Workspace(anchors.numel(), groups.size, anchors.numel() * groups.size, embeddings.device)
            weights, valid, _ = self.row_weights(embeddings[anchor_start:anchor_stop], embeddings[groups.order], groups, anchors, workspace)
            weights = weights.double() * valid.unsqueeze(1)
            probs_sorted = weights / weights.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
            probs = torch.empty_like(probs_sorted)
            probs[:, groups.order] = probs_sorted
            return probs


_ONE = torch.ones(())
_LOG_FLOAT_TINY = -87.0  # exp(-87) is still a normal float32


def _min_log_weight(coef_minus: float, coef_plus: float, s_low: float, s_high: float) -> float:
    """min over s in [s_low, s_high] of coef_minus*log(1-s) + coef_plus*log(1+s) (float64)."""

    def log_w(s: float) -> float:
        return coef_minus * math.log(1.0 - s) + coef_plus * math.log(1.0 + s)

    points = [s_low, s_high]
    if coef_minus + coef_plus != 0.0:
        stationary = (coef_plus - coef_minus) / (coef_minus + coef_plus)
        if s_low < stationary < s_high:
            points.append(stationary)
    return min(log_w(s) for s in points)


class _Workspace:
    """Three (rows x B) float32 buffers reused across anchor chunks (fresh large allocations page-fault)."""

    def __init__(self, anchors: int, columns: int, chunk_elements: int, device: torch.device):
        rows = max(1, min(anchors, chunk_elements // max(columns, 1)))
        self.buffers = torch.empty((3, rows, columns), dtype=torch.float32, device=device)

    def views(self, rows: int) -> tuple[Tensor, Tensor, Tensor]:
        return self.buffers[0, :rows], self.buffers[1, :rows], self.buffers[2, :rows]


def _inverse_cdf(cumulative: Tensor, row: Tensor, u: Tensor) -> Tensor:
    """The column j with cum[j-1] <= u * total < cum[j] in row ``row``: a column of positive weight.

    float32 rounding of u * total may reach the total; the result is clamped to the row's last
    column of positive weight (the first whose cumulative weight equals the total).
    """
    total = cumulative[:, -1]
    found = _rowwise_searchsorted(cumulative, row, u * total[row].double(), right=True)
    last = torch.searchsorted(cumulative, total.contiguous().unsqueeze(1), right=False).squeeze(1)
    # Non-finite embeddings (a diverged model) give NaN weights and out-of-range positions: any
    # valid column will do, since the loss is then non-finite and the step is skipped.
    return torch.minimum(found, last[row]).clamp_(max=cumulative.shape[1] - 1)


class RandomNegativeSampler:
    """Uniform negatives: each (anchor, positive) pair draws any other-label item of the batch."""

    def __init__(self, config: SamplerConfig):
        self.config = config

    def __call__(self, embeddings: Tensor, labels: Tensor, anchor_start: int, anchor_stop: int, step: int,
                 positive_limit: int | None = None) -> Triplets:
        groups = _Groups(labels)
        uniforms = draw_uniforms(self.config.seed, step, groups.size, groups.max_positives)
        anchors = torch.arange(anchor_start, anchor_stop, device=labels.device)
        pairs = _positives(groups, anchors, positive_limit)
        a = anchors[pairs.row]
        num_neg = groups.size - groups.count[a]
        keep = num_neg > 0
        a, column, slot, num_neg = a[keep], pairs.column[keep], pairs.slot[keep], num_neg[keep]
        u = uniforms[a.cpu(), slot.cpu()].to(labels.device)
        k = torch.minimum((u * num_neg.double()).long(), num_neg - 1)
        start = groups.start[a]
        negative = torch.where(k < start, k, k + groups.count[a])
        valid = _has_positive(groups, labels, anchors, positive_limit) & (groups.count[anchors] < groups.size)
        return Triplets(a, groups.order[column], groups.order[negative], int(valid.sum()), 0)


class _NearestNegativeSampler:
    """Shared chunked scan for the deterministic samplers (hard, semi-hard)."""

    def __init__(self, config: SamplerConfig):
        self.config = config

    def __call__(self, embeddings: Tensor, labels: Tensor, anchor_start: int, anchor_stop: int, step: int,
                 positive_limit: int | None = None) -> Triplets:
        with torch.no_grad():
            embeddings = embeddings.detach().float()
            groups = _Groups(labels)
            candidates = embeddings[groups.order]
            parts, num_anchors, num_fallback = [], 0, 0
            for lo, hi in _chunks(anchor_start, anchor_stop, groups.size, self.config.chunk_elements):
                anchors = torch.arange(lo, hi, device=embeddings.device)
                sim = embeddings[lo:hi] @ candidates.T
                pairs = _positives(groups, anchors, positive_limit)
                has_negative = groups.count[anchors] < groups.size
                keep = has_negative[pairs.row]
                row, column = pairs.row[keep], pairs.column[keep]
                negative, fallback = self.choose(sim, groups, anchors, row, sim[row, column])
                parts.append((anchors[row], groups.order[column], groups.order[negative]))
                valid = has_negative & _has_positive(groups, labels, anchors, positive_limit)
                num_anchors += int(valid.sum())
                num_fallback += int((fallback & valid).sum())
            return _collect(parts, num_anchors, num_fallback, embeddings.device)

    def choose(self, sim: Tensor, groups: _Groups, anchors: Tensor, row: Tensor, sim_ap: Tensor):
        raise NotImplementedError


class HardNegativeSampler(_NearestNegativeSampler):
    """The closest negative of the anchor, for each of its positives."""

    def choose(self, sim, groups, anchors, row, sim_ap):
        block = _block_pairs(groups, anchors, include_self=True)
        sim[block.row, block.column] = -math.inf
        nearest = sim.argmax(dim=1)
        return nearest[row], torch.zeros(anchors.numel(), dtype=torch.bool, device=sim.device)


class SemiHardNegativeSampler(_NearestNegativeSampler):
    """FaceNet's semi-hard negative: the closest negative farther than the positive (D_an > D_ap).

    Where no negative is farther than the positive, the farthest negative is taken (as TensorFlow's
    triplet_semihard_loss does) and the anchor counts as a fallback.
    """

    def choose(self, sim, groups, anchors, row, sim_ap):
        block = _block_pairs(groups, anchors, include_self=True)
        sim[block.row, block.column] = math.inf  # positives sort last and never qualify
        sorted_sim, sorted_col = torch.sort(sim, dim=1)
        # Farther than the positive means smaller similarity: the last sorted entry below sim_ap.
        below = _rowwise_searchsorted(sorted_sim, row, sim_ap, right=False) - 1
        missing = below < 0
        position = below.clamp(min=0)  # missing: position 0, the farthest negative
        fallback = torch.zeros(anchors.numel(), dtype=torch.bool, device=sim.device)
        fallback[row[missing]] = True
        return sorted_col[row, position], fallback


SAMPLERS: dict[str, Callable[[SamplerConfig], Sampler]] = {
    "distance_weighted": DistanceWeightedSampler,
    "random": RandomNegativeSampler,
    "semi_hard": SemiHardNegativeSampler,
    "hard": HardNegativeSampler,
}


def build_sampler(config: SamplerConfig) -> Sampler:
    config.validate()
    return SAMPLERS[config.kind](config)
