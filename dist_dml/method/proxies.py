"""Losses against class centres (proxies), the centres sharded by class across ranks (Partial FC, An et al. 2021).

Rank r of W holds the centres of classes [r * ceil(C / W), (r + 1) * ceil(C / W)) and scores the all-gathered
global batch against them alone: no rank holds C x B logits or the whole C x d matrix. What couples the shards is
reduced across ranks, without gradient:

- the margin-softmax family (normalised softmax, CosFace, ArcFace): each image's softmax over all classes is
  normalised by an all-reduced max and sum; the gradient of the loss with respect to a rank's logits is then
  local (softmax minus one-hot, over the batch), so :class:`_ShardedCrossEntropy` gives it exactly;
- Proxy-Anchor (Kim et al. 2020): each proxy's term sums over the global batch's images, so it lives on the
  proxy's rank; only the counts it is divided by (proxies with a positive in the batch, all proxies) are global.

Each rank's value is its *share*: the shares sum over ranks to the loss of one process holding every centre, and
each share's gradient reaches this rank's centres and (through the all-gather's backward, which sums over ranks)
the embeddings exactly as that process's loss would. With ``sample_rate < 1`` the softmax runs over the batch's
classes and a share of the others, drawn per class from (seed, step): the same classes at any world size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dist_dml.infra.distributed import DistContext
from dist_dml.infra.seeding import mix

BLOCK = 4096  # classes whose initial centres (and sampling draws) come from one seeded generator

KINDS = ("proxy_anchor", "norm_softmax", "cosface", "arcface")
# Each paper's defaults: (scale, margin) for the softmax family (Zhai & Wu 2019 temperature 0.05; Wang et al.
# 2018 s=64, m=0.35; Deng et al. 2019 s=64, m=0.5), (alpha, delta) for Proxy-Anchor (Kim et al. 2020).
DEFAULTS = {"proxy_anchor": (32.0, 0.1), "norm_softmax": (20.0, 0.0), "cosface": (64.0, 0.35),
            "arcface": (64.0, 0.5)}


@dataclass(frozen=True)
class CentreLossConfig:
    """A loss against class centres: its kind, its two constants (0: the paper's) and Partial FC's sample rate."""

    kind: str = "proxy_anchor"
    scale: float = 0.0  # s of the softmax family, alpha of Proxy-Anchor (0: the paper's)
    margin: float = -1.0  # m of CosFace / ArcFace, delta of Proxy-Anchor (-1: the paper's)
    sample_rate: float = 1.0  # the share of the negative classes each step's softmax runs over (Partial FC)
    seed: int = 0  # the centres' initialisation and the sampled classes

    def resolved(self) -> tuple[float, float]:
        """(scale, margin) with the paper's where 0 / -1."""
        scale, margin = DEFAULTS[self.kind]
        return (self.scale or scale, margin if self.margin < 0 else self.margin)

    def validate(self, prefix: str = "") -> None:
        """Refuses a kind or constant out of range; ``prefix`` is how messages name the keys (proxy. in a config)."""
        if self.kind not in KINDS:
            raise ValueError(f"{prefix}kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        self.validate_constants(prefix)

    def validate_constants(self, prefix: str = "") -> None:
        """The constants' ranges, whatever the kind (a config checks them with its centres off too)."""
        if not math.isfinite(self.scale) or self.scale < 0:
            raise ValueError(f"{prefix}scale must be >= 0 and finite, got {self.scale}")
        if not math.isfinite(self.margin) or (self.margin < 0 and self.margin != -1):
            raise ValueError(f"{prefix}margin must be >= 0 and finite, or -1 (the paper's), got {self.margin}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"{prefix}sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.kind == "proxy_anchor" and self.sample_rate < 1:
            raise ValueError(f"{prefix}sample_rate < 1 samples the softmax's classes: Proxy-Anchor sums over every "
                             "proxy")


# Each kind's centre learning rate as a multiple of the embedding head's where proxy.lr_factor is 0: Proxy-Anchor
# trains its proxies 100 times faster than the network (Kim et al. 2020); the softmax family's classifier learns at
# the network's rate (arcface_torch, Partial FC).
LR_FACTORS = {"proxy_anchor": 100.0, "norm_softmax": 1.0, "cosface": 1.0, "arcface": 1.0}


@dataclass(frozen=True)
class ProxyConfig:
    """A loss against a centre per class (Proxy-Anchor, normalised softmax, CosFace, ArcFace), the centres sharded by
    class across the ranks (Partial FC), added with its weight to the loss over sampled pairs on the same global
    batch (off with kind none). The centres have an optimizer of their own and are checkpointed by shard."""

    kind: str = "none"  # none, proxy_anchor, norm_softmax, cosface or arcface
    weight: float = 1.0  # the centre loss's weight beside the pair loss
    scale: float = 0.0  # s (softmax family), alpha (Proxy-Anchor); 0: the paper's: 32, norm_softmax 20, cosface/arcface 64
    margin: float = -1.0  # m (CosFace, ArcFace), delta (Proxy-Anchor); -1: the paper's: 0.1, cosface 0.35, arcface 0.5
    sample_rate: float = 1.0  # Partial FC: the share of the negative classes each step's softmax runs over
    lr_factor: float = 0.0  # the centres' rate over the head's at every step; 0: 100 for proxy_anchor, 1 for the others
    num_classes: int = 0  # centres; 0: the training split's classes
    seed: int = 0  # the centres' initialisation and Partial FC's draws

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    def loss_config(self) -> CentreLossConfig:
        return CentreLossConfig(kind=self.kind, scale=self.scale, margin=self.margin, sample_rate=self.sample_rate,
                                seed=self.seed)

    def rate_factor(self) -> float:
        return self.lr_factor or LR_FACTORS[self.kind]

    def validate(self) -> None:
        if self.kind not in ("none", *KINDS):
            raise ValueError(f"proxy.kind must be none or one of {', '.join(KINDS)}, got {self.kind!r}")
        self.loss_config().validate_constants("proxy.")
        for key in ("weight", "lr_factor"):
            value = getattr(self, key)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"proxy.{key} must be >= 0 and finite, got {value}")
        if self.num_classes < 0 or self.seed < 0:
            raise ValueError("proxy.num_classes (0: the training split's) and proxy.seed must be >= 0")
        if self.enabled and self.weight == 0:
            raise ValueError(f"proxy.weight=0 with proxy.kind={self.kind}: the centres would learn nothing (proxy.kind="
                             "none turns them off)")


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """The classes [start, end) whose centres rank ``rank`` of ``world_size`` holds (ceil(C / W) each; the last
    ranks may hold fewer, or none)."""
    per = -(-num_classes // world_size)
    return min(num_classes, rank * per), min(num_classes, (rank + 1) * per)


def _block_draws(start: int, end: int, seed: int, *salt: int, width: int = 0) -> Tensor:
    """Seeded draws for classes [start, end), the same for a class whatever range asks for it: standard normal rows
    of ``width`` (or one uniform per class with width 0), from one generator per block of BLOCK classes."""
    parts = []
    for block in range(start // BLOCK, -(-end // BLOCK)):
        generator = torch.Generator().manual_seed(mix(seed, block, *salt))
        first = block * BLOCK
        if width:
            values = torch.randn(BLOCK, width, generator=generator, dtype=torch.float64)
        else:
            values = torch.rand(BLOCK, generator=generator, dtype=torch.float64)
        parts.append(values[max(start, first) - first:min(end, first + BLOCK) - first])
    return torch.cat(parts) if parts else torch.empty((0, width) if width else (0,), dtype=torch.float64)


def initial_centres(num_classes: int, dim: int, rank: int, world_size: int, seed: int) -> Tensor:
    """This rank's rows of the seeded initial centres (unit rows of a Gaussian): the same matrix at any world size,
    each rank drawing only the blocks its rows lie in."""
    start, end = shard_range(num_classes, rank, world_size)
    return F.normalize(_block_draws(start, end, seed, 0xCE, width=dim), dim=1)


def sampled_classes(labels: Tensor, start: int, end: int, rate: float, seed: int, step: int) -> Tensor:
    """The classes of [start, end) a step's softmax runs over: every class of the global batch, and each other with
    probability ``rate`` by its own draw from (seed, step, class). Ascending class indices."""
    if rate >= 1:
        return torch.arange(start, end, device=labels.device)
    keep = _block_draws(start, end, seed, 0x5A, step) < rate
    present = labels[(labels >= start) & (labels < end)] - start
    keep[present.cpu()] = True
    return torch.nonzero(keep).flatten().to(labels.device) + start


class _ShardedCrossEntropy(torch.autograd.Function):
    """The mean over the global batch of -log softmax(logits)[target], the classes' logits sharded over ranks: each
    rank passes its columns (``local``) and, per image, its target's column there (-1 where another rank holds it).
    Returns this rank's share (the sum over ranks is the loss); the backward gives this rank's columns the loss's
    gradient, (softmax - one-hot) / B."""

    @staticmethod
    def forward(fctx, local: Tensor, target: Tensor, ctx: DistContext) -> Tensor:
        batch = local.shape[0]
        top = ctx.all_reduce(local.max(dim=1).values if local.shape[1] else
                             torch.full((batch,), -torch.inf, dtype=local.dtype, device=local.device), "max")
        exp = torch.exp(local - top[:, None])
        total = ctx.all_reduce(exp.sum(dim=1), "sum")
        owned = target >= 0
        picked = torch.zeros(batch, dtype=local.dtype, device=local.device)
        picked[owned] = local[owned, target[owned]]
        softmax = exp / total[:, None]
        fctx.save_for_backward(softmax, target)
        # Every rank's share holds log(sum) / W; the target's logit is the share of the rank that holds it.
        share = ((torch.log(total) + top) / ctx.world_size - picked).sum() / batch
        return share

    @staticmethod
    def backward(fctx, grad: Tensor):
        softmax, target = fctx.saved_tensors
        owned = torch.nonzero(target >= 0).flatten()
        delta = softmax.clone()
        delta[owned, target[owned]] -= 1
        return grad * delta / softmax.shape[0], None, None


class CentreLoss(nn.Module):
    """A loss against this rank's shard of the class centres (a parameter of ``ceil(C / W)`` rows at most), scored
    against the global batch. ``forward`` returns this rank's share of the loss over the global batch."""

    def __init__(self, config: CentreLossConfig, num_classes: int, dim: int, ctx: DistContext):
        super().__init__()
        config.validate()
        self.config, self.ctx, self.num_classes = config, ctx, num_classes
        self.start, self.end = shard_range(num_classes, ctx.rank, ctx.world_size)
        self.centres = nn.Parameter(initial_centres(num_classes, dim, ctx.rank, ctx.world_size, config.seed).float())

    def forward(self, embeddings: Tensor, labels: Tensor, step: int = 0) -> Tensor:
        """``embeddings``: the global batch (all-gathered with gradient); ``labels``: its classes."""
        if self.config.kind == "proxy_anchor":
            return self._proxy_anchor(embeddings, labels)
        return self._margin_softmax(embeddings, labels, step)

    def _cosines(self, embeddings: Tensor, classes: Tensor | None = None) -> Tensor:
        centres = self.centres if classes is None else self.centres.index_select(0, classes - self.start)
        return F.normalize(embeddings, dim=1) @ F.normalize(centres.to(embeddings.dtype), dim=1).T

    def _margin_softmax(self, embeddings: Tensor, labels: Tensor, step: int) -> Tensor:
        scale, margin = self.config.resolved()
        classes = sampled_classes(labels, self.start, self.end, self.config.sample_rate, self.config.seed, step)
        cos = self._cosines(embeddings, classes)
        # Each image's target column here: its position among the sampled classes, -1 where another rank holds it.
        where = torch.searchsorted(classes, labels)
        owned = (labels >= self.start) & (labels < self.end)
        target = torch.where(owned, where.clamp_max(max(len(classes) - 1, 0)), -1)
        rows = torch.nonzero(owned).flatten()
        if len(rows) and margin:
            at = cos[rows, target[rows]]
            if self.config.kind == "cosface":
                moved = at - margin
            else:  # arcface: cos(theta + m), theta from the clamped cosine
                moved = torch.cos(torch.acos(at.clamp(-1 + 1e-7, 1 - 1e-7)) + margin)
            cos = cos.index_put((rows, target[rows]), moved)
        return _ShardedCrossEntropy.apply(scale * cos, target, self.ctx)

    def _proxy_anchor(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        alpha, delta = self.config.resolved()
        cos = self._cosines(embeddings)  # B x (this rank's proxies)
        positive = labels[:, None] == torch.arange(self.start, self.end, device=labels.device)[None, :]
        pos = torch.where(positive, torch.exp(-alpha * (cos - delta)), 0).sum(dim=0)
        neg = torch.where(positive, 0, torch.exp(alpha * (cos + delta))).sum(dim=0)
        with_positives = positive.any(dim=0)
        count = self.ctx.all_reduce(with_positives.sum().to(embeddings.dtype), "sum").clamp_min(1)
        return torch.log1p(pos[with_positives]).sum() / count + torch.log1p(neg).sum() / self.num_classes
