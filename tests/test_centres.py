"""Losses against class centres sharded by class across ranks: each loss against an independent float64 loop of its
published formula (and a hand-worked case), and the sharded run on 2 and 3 ranks against one process holding every
centre: the loss, the gradients of the embeddings and of the centres; sampled classes the same at any world size."""
from __future__ import annotations

import math
import re

import pytest
import torch

from dist_dml.infra.distributed import DistContext
from dist_dml.method.proxies import (CentreLoss, CentreLossConfig, initial_centres, sampled_classes, shard_range)

from .centres_worker import CASES, CLASSES, DIM, batch, run
from .conftest import HANG_GUARD_S


def unit(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def cosine(a, b) -> float:
    return sum(x * y for x, y in zip(unit(a), unit(b)))


def reference(config: CentreLossConfig, embeddings, labels, centres, classes=None) -> float:
    """The published formula, one image and one class at a time in float64 (classes: those a sampled softmax runs
    over)."""
    scale, margin = config.resolved()
    E, C, y = embeddings.tolist(), centres.tolist(), labels.tolist()
    if config.kind == "proxy_anchor":  # Kim et al. 2020, eq. 4
        alpha, delta = scale, margin
        present = sorted(set(y))
        pos = sum(math.log(1 + sum(math.exp(-alpha * (cosine(E[i], C[p]) - delta)) for i in range(len(E)) if y[i] == p))
                  for p in present) / len(present)
        neg = sum(math.log(1 + sum(math.exp(alpha * (cosine(E[i], C[p]) + delta)) for i in range(len(E)) if y[i] != p))
                  for p in range(len(C))) / len(C)
        return pos + neg
    classes = range(len(C)) if classes is None else classes
    total = 0.0
    for i in range(len(E)):
        logits = {}
        for c in classes:
            cos = cosine(E[i], C[c])
            if c == y[i] and config.kind == "cosface":  # Wang et al. 2018
                cos -= margin
            elif c == y[i] and config.kind == "arcface":  # Deng et al. 2019
                cos = math.cos(math.acos(cos) + margin)
            logits[c] = scale * cos
        total += -logits[y[i]] + math.log(sum(math.exp(v) for v in logits.values()))
    return total / len(E)


def one_process(config: CentreLossConfig, embeddings, labels, step: int = 7):
    return run(DistContext(), config, embeddings, labels, step)


@pytest.mark.parametrize("config", CASES, ids=lambda c: f"{c.kind}-{c.sample_rate}")
def test_each_loss_is_its_published_formula(config):
    embeddings, labels = batch(2)
    total, grad, centre_grad, centres = one_process(config, embeddings, labels)
    classes = None
    if config.sample_rate < 1:
        classes = sampled_classes(labels, 0, CLASSES, config.sample_rate, config.seed, 7).tolist()
        assert set(labels.tolist()) <= set(classes) and len(classes) < CLASSES
    assert float(total) == pytest.approx(reference(config, embeddings, labels, centres, classes), rel=1e-12)
    # The gradient is the formula's: a central difference of the reference along the gradient's direction.
    direction = grad / grad.norm()
    h = 1e-6
    ahead = reference(config, embeddings[:len(grad)] + h * direction, labels, centres, classes)
    behind = reference(config, embeddings[:len(grad)] - h * direction, labels, centres, classes)
    assert (ahead - behind) / (2 * h) == pytest.approx(float(grad.norm()), rel=1e-6)


def test_a_hand_worked_cosface_case():
    """Two classes at right angles, one image on class 0's centre: logits s(1 - m) and 0, so the loss is
    log(1 + exp(-s(1 - m)))."""
    loss = CentreLoss(CentreLossConfig(kind="cosface", scale=4.0, margin=0.25), 2, 2, DistContext()).double()
    with torch.no_grad():
        loss.centres.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64))
    value = loss(torch.tensor([[3.0, 0.0]], dtype=torch.float64), torch.tensor([0]))
    assert float(value.detach()) == pytest.approx(math.log(1 + math.exp(-4.0 * 0.75)), rel=1e-14)


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_over_ranks_equals_one_process_with_every_centre(world, run_torchrun, tmp_path):
    """On 2 and 3 ranks (11 classes: 6 + 5, and 4 + 4 + 3 centres), the shares sum to one process's loss, and every
    image's and every centre's gradient is that process's, in float64; with a sample rate the same classes are
    drawn as in one process."""
    out = tmp_path / "centres.pt"
    run_torchrun(world, "tests.centres_worker", str(out), timeout=HANG_GUARD_S)
    got = torch.load(out, weights_only=True)
    embeddings, labels = batch(world)
    for config, sharded in zip(CASES, got):
        total, grad, centre_grad, centres = one_process(config, embeddings, labels)
        torch.testing.assert_close(sharded["centres"], centres, rtol=0, atol=0)
        torch.testing.assert_close(sharded["loss"], total, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sharded["grad"], grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(sharded["centre_grad"], centre_grad, rtol=1e-10, atol=1e-12)


def test_centres_and_draws_are_the_same_at_any_world_size():
    """The initial centres and a step's sampled classes, rank by rank, are the rows and classes of one process's:
    also for more ranks than classes, and across a block of generated rows."""
    for classes, worlds in ((11, (1, 2, 3, 16)), (9000, (1, 3, 8))):
        whole = initial_centres(classes, 4, 0, 1, seed=5)
        labels = torch.arange(0, classes, 7)
        drawn = sampled_classes(labels, 0, classes, 0.3, 5, 11)
        for world in worlds:
            shards = [shard_range(classes, r, world) for r in range(world)]
            assert shards[0][0] == 0 and shards[-1][1] == classes and all(a[1] == b[0] for a, b in zip(shards, shards[1:]))
            torch.testing.assert_close(torch.cat([initial_centres(classes, 4, r, world, 5) for r in range(world)]), whole,
                                       rtol=0, atol=0)
            assert torch.cat([sampled_classes(labels, a, b, 0.3, 5, 11) for a, b in shards]).tolist() == drawn.tolist()
    others = 9000 - len(labels)  # the batch's 1,286 classes always, each other with probability 0.3
    assert abs(len(drawn) - len(labels) - 0.3 * others) < 4 * math.sqrt(others * 0.3 * 0.7)
    assert sampled_classes(labels, 0, 9000, 0.3, 5, 12).tolist() != drawn.tolist()  # another step, other classes
    assert sampled_classes(labels, 0, 9000, 1.0, 5, 11).tolist() == list(range(9000))


@pytest.mark.parametrize("config, says", [(CentreLossConfig(kind="softmax"), "one of proxy_anchor"),
                                          (CentreLossConfig(kind="proxy_anchor", sample_rate=0.5), "every proxy"),
                                          (CentreLossConfig(kind="arcface", sample_rate=0.0), "(0, 1]")])
def test_bad_settings_are_refused(config, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        config.validate()
