"""Samplers against float64 brute force, the paper's uniformity claim, and world-size invariance."""
import math

import pytest
import torch
from scipy import stats

from dist_dml.method.sampling import SAMPLERS, SamplerConfig, build_sampler


def unit(n, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1).to(dtype)


def pk_labels(p, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.arange(p).repeat_interleave(k)[torch.randperm(p * k, generator=g)]


def reference_probabilities(x, labels, cutoff=0.5, nonzero_loss_cutoff=1.4):
    """float64 brute force of DESIGN.md: log w = (2-n) log d_c - ((n-3)/2) log(1 - d_c^2/4), per-row softmax."""
    x = x.double()
    n = x.shape[1]
    dist = torch.cdist(x, x)
    negative = labels[:, None] != labels[None, :]
    d_c = dist.clamp(cutoff, 2 - 1e-3)
    log_w = (2 - n) * torch.log(d_c) - ((n - 3) / 2) * torch.log(1 - d_c ** 2 / 4)
    eligible = negative & (dist < nonzero_loss_cutoff)
    probs = torch.zeros_like(dist)
    for a in range(len(labels)):
        has_positive = bool(((labels == labels[a]).sum()) > 1)
        if not has_positive or not negative[a].any():
            continue
        if eligible[a].any():
            probs[a, eligible[a]] = torch.softmax(log_w[a, eligible[a]], 0)
        else:
            probs[a, negative[a]] = 1.0 / negative[a].sum()
    return probs


@pytest.mark.parametrize("dim", [2, 3, 8, 32, 128, 512])
def test_distance_weighted_probabilities_match_float64(dim):
    x = unit(96, dim, seed=dim)
    if dim >= 32:  # pull pairs together so that distances below 1.4 exist in high dimension
        x = torch.nn.functional.normalize(x + 1.5 * unit(96, dim, seed=1)[torch.arange(96) % 6], dim=1)
    labels = pk_labels(24, 4, seed=dim)
    got = build_sampler(SamplerConfig()).probabilities(x, labels, 0, 96)
    want = reference_probabilities(x, labels)
    assert (want.sum(1) > 0).sum() > 48  # most rows are real distributions
    torch.testing.assert_close(got, want, rtol=2e-3 if dim >= 128 else 2e-4, atol=1e-9)


def underflow_case(dim):
    """Anchor 0's only eligible negative lies at D = 1.39, anchor 2's at D = 0.5; all else at sqrt(2)."""
    e = torch.eye(dim, dtype=torch.float64)
    at = lambda base, other, d: math.sqrt(1 - (1 - d * d / 2) ** 2) * e[other] + (1 - d * d / 2) * e[base]
    x = torch.stack([e[0], e[4], e[2], e[5], at(0, 1, 1.39), at(2, 3, 0.5)])
    labels = torch.tensor([0, 0, 1, 1, 2, 3])
    return x.float(), labels


@pytest.mark.parametrize("dim", [128, 512])
def test_no_row_underflows_where_a_global_max_would(dim):
    x, labels = underflow_case(dim)
    # A single global max-subtraction in float32 leaves anchor 0 without weight.
    d = torch.cdist(x, x).clamp(0.5, 2 - 1e-3)
    log_w = (2 - dim) * torch.log(d) - ((dim - 3) / 2) * torch.log(1 - d ** 2 / 4)
    eligible = (labels[:, None] != labels[None, :]) & (torch.cdist(x, x) < 1.4)
    naive = torch.exp(log_w - log_w[eligible].max()) * eligible
    assert float(naive[0].sum()) < 1e-30 < float(naive[2].sum())

    probs = build_sampler(SamplerConfig()).probabilities(x, labels, 0, 6)
    assert float(probs[0, 4]) == pytest.approx(1.0) and float(probs[2, 5]) == pytest.approx(1.0)
    triplets = build_sampler(SamplerConfig())(x, labels, 0, 6, step=0)
    for a, want in ((0, 4), (2, 5)):
        assert triplets.negative[triplets.anchor == a].tolist() == [want]
    assert triplets.num_fallback == 2  # anchors 1 and 3: nothing within 1.4


@pytest.mark.parametrize("dim", [2, 3, 8])
def test_sampled_negative_distances_are_uniform_on_sphere(dim):
    """Wu et al.'s claim: on uniform sphere points, sampled D_an is uniform over [cutoff, nonzero cutoff]."""
    cfg = SamplerConfig(seed=11)
    sampled = {"distance_weighted": [], "random": []}
    for step in range(6):
        x = unit(2400, dim, seed=100 * dim + step)
        labels = torch.arange(1200).repeat_interleave(2)
        for kind, out in sampled.items():
            t = build_sampler(SamplerConfig(kind=kind, seed=11))(x, labels, 0, 2400, step)
            out.append((x[t.anchor] - x[t.negative]).norm(dim=1))

    def uniformity_pvalue(kind):
        d = torch.cat(sampled[kind]).double().numpy()
        inside = d[(d >= cfg.cutoff) & (d < cfg.nonzero_loss_cutoff)]
        assert len(inside) > 3000
        return stats.kstest((inside - cfg.cutoff) / (cfg.nonzero_loss_cutoff - cfg.cutoff), "uniform").pvalue

    assert uniformity_pvalue("distance_weighted") > 0.01
    # The test has power: random negatives follow q(d), which is not uniform there.
    assert uniformity_pvalue("random") < 1e-6


def test_draw_frequencies_follow_probabilities():
    """The inverse-CDF draws: chi-square of counts against the sampler's own distribution."""
    x = unit(60, 4, seed=5)
    labels = torch.cat([torch.zeros(40, dtype=torch.long), torch.arange(1, 21)])  # anchor 0: 39 positives
    sampler = build_sampler(SamplerConfig(seed=3))
    probs = sampler.probabilities(x, labels, 0, 1)[0]
    counts = torch.zeros(60)
    for step in range(300):
        t = sampler(x, labels, 0, 1, step)
        counts += torch.bincount(t.negative, minlength=60)
    support = probs > 0
    assert counts[~support].sum() == 0
    expected = probs[support].double().numpy() * float(counts.sum())
    assert stats.chisquare(counts[support].double().numpy(), expected).pvalue > 1e-3


def test_fallback_is_uniform_over_negatives_and_counted():
    x = torch.tensor([[1.0, 0, 0], [0.99, 0.141, 0], [-1.0, 0, 0], [-0.99, 0, 0.141]])
    x = torch.nn.functional.normalize(x, dim=1)
    labels = torch.tensor([0, 0, 1, 2])
    sampler = build_sampler(SamplerConfig())
    probs = sampler.probabilities(x, labels, 0, 4)
    torch.testing.assert_close(probs[0], torch.tensor([0, 0, 0.5, 0.5], dtype=torch.float64))
    t = sampler(x, labels, 0, 4, step=0)
    assert t.num_anchors == 2 and t.num_fallback == 2  # anchors 2 and 3 have no positive


def brute_force_nearest(x, labels, kind, anchors=None, positives_below=None):
    """Per (anchor, positive): the closest negative (hard), or the closest farther than the positive (semi-hard;
    else the farthest). Anchors are the first ``anchors`` items (all by default) and positives the items below
    ``positives_below`` (all by default: a cross-batch memory after the batch can be left out of them)."""
    x = x.double()
    dist = torch.cdist(x, x)
    out = []
    for a in range(len(labels) if anchors is None else anchors):
        negatives = (labels != labels[a]).nonzero().squeeze(1)
        for p in (labels == labels[a]).nonzero().squeeze(1).tolist():
            if p == a or len(negatives) == 0 or (positives_below is not None and p >= positives_below):
                continue
            dn = dist[a, negatives]
            if kind == "hard":
                n = negatives[dn.argmin()]
            else:
                farther = dn > dist[a, p]
                n = negatives[dn.masked_fill(~farther, math.inf).argmin()] if farther.any() else negatives[dn.argmax()]
            out.append((a, p, int(n)))
    return sorted(out)


@pytest.mark.parametrize("kind", ["hard", "semi_hard"])
def test_hard_and_semi_hard_match_brute_force(kind):
    x = unit(72, 6, seed=2)
    labels = pk_labels(18, 4, seed=2)
    t = build_sampler(SamplerConfig(kind=kind, chunk_elements=500))(x, labels, 0, 72, step=0)
    got = sorted(zip(t.anchor.tolist(), t.positive.tolist(), t.negative.tolist()))
    assert got == brute_force_nearest(x, labels, kind)


def test_random_negatives_are_uniform_over_other_labels():
    x = unit(12, 4, seed=1)
    labels = torch.tensor([0] * 6 + [1, 2, 3, 4, 5, 6])
    counts = torch.zeros(12)
    sampler = build_sampler(SamplerConfig(kind="random"))
    for step in range(400):
        t = sampler(x, labels, 0, 1, step)
        counts += torch.bincount(t.negative, minlength=12)
    assert counts[:6].sum() == 0
    assert stats.chisquare(counts[6:].numpy()).pvalue > 1e-3


@pytest.mark.parametrize("kind", sorted(SAMPLERS))
def test_every_pair_once_with_a_true_negative(kind):
    x = unit(64, 8, seed=4)
    labels = torch.tensor([i % 13 for i in range(64)])
    t = build_sampler(SamplerConfig(kind=kind))(x, labels, 0, 64, step=2)
    pairs = sorted(zip(t.anchor.tolist(), t.positive.tolist()))
    want = sorted((a, p) for a in range(64) for p in range(64) if a != p and labels[a] == labels[p])
    assert pairs == want
    assert torch.all(labels[t.negative] != labels[t.anchor])


@pytest.mark.parametrize("kind", sorted(SAMPLERS))
def test_same_triplets_for_world_sizes_1_2_4(kind):
    x = unit(128, 16, seed=9)
    x = torch.nn.functional.normalize(x + 0.8 * unit(128, 16, seed=1)[torch.arange(128) % 8], dim=1)
    labels = pk_labels(32, 4, seed=9)
    runs = {}
    for world in (1, 2, 4):
        local = 128 // world
        parts = [build_sampler(SamplerConfig(kind=kind, seed=5))(x, labels, r * local, (r + 1) * local, step=17)
                 for r in range(world)]
        runs[world] = [torch.cat([getattr(p, f) for p in parts]) for f in ("anchor", "positive", "negative")]
        runs[world].append(sum(p.num_fallback for p in parts))
    for world in (2, 4):
        for got, want in zip(runs[world][:3], runs[1][:3]):
            assert torch.equal(got, want)
        assert runs[world][3] == runs[1][3]


def test_chunking_does_not_change_the_draws():
    x = unit(200, 16, seed=8)
    labels = pk_labels(50, 4, seed=8)
    whole = build_sampler(SamplerConfig(chunk_elements=1 << 22))(x, labels, 0, 200, step=1)
    chunked = build_sampler(SamplerConfig(chunk_elements=7 * 200))(x, labels, 0, 200, step=1)
    assert torch.equal(whole.negative, chunked.negative) and torch.equal(whole.anchor, chunked.anchor)


def test_draws_depend_on_seed_and_step_only():
    x = unit(256, 16, seed=3)
    labels = pk_labels(64, 4, seed=3)
    s = build_sampler(SamplerConfig(seed=1))
    a, b, c = s(x, labels, 0, 256, 5), s(x, labels, 0, 256, 5), s(x, labels, 0, 256, 6)
    assert torch.equal(a.negative, b.negative)
    assert not torch.equal(a.negative, c.negative)


def test_bad_sampler_config_is_rejected():
    with pytest.raises(ValueError, match="sampler.kind"):
        build_sampler(SamplerConfig(kind="smart"))
    with pytest.raises(ValueError, match="nonzero_loss_cutoff"):
        build_sampler(SamplerConfig(cutoff=1.5, nonzero_loss_cutoff=1.4))


@pytest.mark.parametrize("kind", sorted(SAMPLERS))
def test_non_finite_embeddings_give_valid_indices(kind):
    x = unit(32, 8, seed=1)
    x[3] = float("nan")
    labels = pk_labels(8, 4, seed=1)
    t = build_sampler(SamplerConfig(kind=kind))(x, labels, 0, 32, step=0)
    assert len(t) == 32 * 3 and int(t.negative.max()) < 32 and int(t.negative.min()) >= 0
