"""Losses against plain loops over hand-listed triplets, in float64."""
import math

import pytest
import torch

from dist_dml.method.losses import LossConfig, build_loss
from dist_dml.method.sampling import Triplets


def triplets_of(rows):
    a, p, n = (torch.tensor(x) for x in zip(*rows))
    return Triplets(a, p, n, num_anchors=len(set(a.tolist())), num_fallback=0)


def dist(x, i, j):
    return math.sqrt(sum((x[i][k] - x[j][k]) ** 2 for k in range(len(x[i]))))


def loop_loss(kind, x, labels, ids, rows, alpha, beta0, class_beta=None, image_beta=None, nu=0.0):
    """The loss written out term by term, in Python floats."""
    total, active, reg = 0.0, 0, 0.0
    for a, p, n in rows:
        dap, dan = dist(x, a, p), dist(x, a, n)
        beta = beta0 + (class_beta[labels[a]] if class_beta else 0.0) + (image_beta[ids[a]] if image_beta else 0.0)
        if kind == "margin":
            terms = [max(0.0, alpha + dap - beta), max(0.0, alpha - dan + beta)]
            reg += nu * beta
        elif kind == "triplet":
            terms = [max(0.0, dap - dan + alpha)]
        else:
            terms = [dap * dap, max(0.0, alpha - dan) ** 2]
        total += sum(terms)
        active += sum(t > 0 for t in terms)
    return (total + reg) / active if active else 0.0


@pytest.fixture
def problem():
    torch.manual_seed(3)
    x = torch.nn.functional.normalize(torch.randn(8, 5, dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    ids = torch.tensor([5, 3, 7, 0, 1, 2, 6, 4])
    rows = [(0, 1, 2), (0, 6, 4), (1, 0, 3), (2, 3, 5), (3, 7, 0), (4, 5, 6), (6, 0, 7), (7, 2, 1)]
    return x, labels, ids, rows


@pytest.mark.parametrize("kind", ["margin", "triplet", "contrastive"])
@pytest.mark.parametrize("beta_parts", ["global", "class", "image", "all"])
def test_loss_value_and_gradient_match_loop(problem, kind, beta_parts):
    x, labels, ids, rows = problem
    cfg = LossConfig(kind=kind, alpha=0.3, beta_init=1.1, nu=0.05 if kind == "margin" else 0.0,
                     beta_per_class=kind == "margin" and beta_parts in ("class", "all"),  # the margin loss's alone
                     beta_per_image=kind == "margin" and beta_parts in ("image", "all"),
                     num_classes=3, num_images=8)
    loss_fn = build_loss(cfg).double()
    class_beta = [0.1, -0.2, 0.05] if cfg.beta_per_class else None
    image_beta = [0.01 * i - 0.03 for i in range(8)] if cfg.beta_per_image else None
    if kind == "margin":
        with torch.no_grad():
            if class_beta:
                loss_fn.beta.class_beta.copy_(torch.tensor(class_beta))
            if image_beta:
                loss_fn.beta.image_beta.copy_(torch.tensor(image_beta))
    emb = x.clone().requires_grad_()
    out = loss_fn(emb, labels, ids, triplets_of(rows))
    out.loss.backward()

    want = loop_loss(kind, x.tolist(), labels.tolist(), ids.tolist(), rows, 0.3, 1.1, class_beta, image_beta, cfg.nu)
    assert float(out.loss.detach()) == pytest.approx(want, rel=1e-6)

    # Gradient of the loop reference by central differences in float64.
    eps = 1e-6
    grad = torch.zeros_like(x)
    for i in range(x.shape[0]):
        for k in range(x.shape[1]):
            hi, lo = x.clone(), x.clone()
            hi[i, k] += eps
            lo[i, k] -= eps
            f = lambda z: loop_loss(kind, z.tolist(), labels.tolist(), ids.tolist(), rows, 0.3, 1.1, class_beta, image_beta, cfg.nu)
            grad[i, k] = (f(hi) - f(lo)) / (2 * eps)
    torch.testing.assert_close(emb.grad.double(), grad, rtol=1e-4, atol=1e-6)

    if kind == "margin":
        # d loss / d beta_a: -1 per active positive term, +1 per active negative term, + nu; over the active count.
        d_beta = {}
        active = 0
        for a, p, n in rows:
            beta = 1.1 + (class_beta[labels[a]] if class_beta else 0) + (image_beta[ids[a]] if image_beta else 0)
            pos = 0.3 + dist(x.tolist(), a, p) - beta > 0
            neg = 0.3 - dist(x.tolist(), a, n) + beta > 0
            active += pos + neg
            d_beta[a] = d_beta.get(a, 0.0) - pos + neg + cfg.nu
        g_global = sum(d_beta.values()) / active
        assert float(loss_fn.beta.global_beta.grad) == pytest.approx(g_global, rel=1e-6)
        if class_beta:
            want_class = [sum(v for a, v in d_beta.items() if labels[a] == c) / active for c in range(3)]
            torch.testing.assert_close(loss_fn.beta.class_beta.grad, torch.tensor(want_class, dtype=torch.float64))
        if image_beta:
            want_img = [sum(v for a, v in d_beta.items() if ids[a] == i) / active for i in range(8)]
            torch.testing.assert_close(loss_fn.beta.image_beta.grad, torch.tensor(want_img, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["margin", "triplet", "contrastive"])
def test_zero_active_terms_give_connected_zero(kind):
    # Positives coincide-ish, negatives far: every margin / triplet term is zero.
    x = torch.tensor([[1.0, 0.0], [0.995, 0.0998], [-1.0, 0.0], [-0.995, -0.0998]], dtype=torch.float64)
    labels, ids = torch.tensor([0, 0, 1, 1]), torch.arange(4)
    rows = [(0, 1, 2), (1, 0, 3), (2, 3, 0), (3, 2, 1)]
    betas = dict(nu=0.1, beta_per_class=True, beta_per_image=True) if kind == "margin" else {}  # margin's alone
    cfg = LossConfig(kind=kind, alpha=0.2, beta_init=0.5, num_classes=2, num_images=4, **betas)
    loss_fn = build_loss(cfg).double()
    emb = x.clone().requires_grad_()
    if kind == "contrastive":
        emb = torch.cat([x[:1], x[:1], x[2:3], x[2:3]]).clone().requires_grad_()  # D_ap = 0 exactly
    out = loss_fn(emb, labels, ids, triplets_of(rows))
    assert float(out.active) == 0
    assert float(out.loss.detach()) == 0.0
    out.loss.backward()
    assert emb.grad is not None and torch.all(emb.grad == 0)
    for name, p in loss_fn.named_parameters():
        assert p.grad is not None and torch.all(p.grad == 0), name


def test_beta_settings_of_a_loss_without_beta_are_refused_not_dropped():
    """triplet and contrastive learn no beta: a per-class table asked of them was silently ignored."""
    for kind in ("triplet", "contrastive"):
        for setting in (dict(beta_per_class=True), dict(beta_per_image=True), dict(nu=0.1)):
            with pytest.raises(ValueError, match="apply to the margin loss only"):
                build_loss(LossConfig(kind=kind, **setting))


def test_no_triplets_at_all_is_connected_zero():
    x = torch.nn.functional.normalize(torch.randn(4, 3), dim=1).requires_grad_()
    empty = Triplets(torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), 0, 0)
    loss_fn = build_loss(LossConfig(beta_per_class=True, num_classes=2))
    out = loss_fn(x, torch.tensor([0, 1, 0, 1]), torch.arange(4), empty)
    out.loss.backward()
    assert float(out.loss.detach()) == 0.0 and torch.all(x.grad == 0)
    assert loss_fn.beta.global_beta.grad is not None and loss_fn.beta.class_beta.grad is not None


def test_shares_of_ranks_sum_to_global_loss(problem):
    """Split the anchors between two 'ranks': with the global count, the shares add up to the whole.
    The loss is float32 (whatever the input's precision), so the sum's order decides the last digits:
    compared at float32's tolerance."""
    x, labels, ids, rows = problem
    loss_fn = build_loss(LossConfig(nu=0.02)).double()
    full = loss_fn(x, labels, ids, triplets_of(rows))
    first, second = triplets_of(rows[:3]), triplets_of(rows[3:])
    count = lambda t: loss_fn(x, labels, ids, t).active
    both = count(first) + count(second)
    shares = [loss_fn(x, labels, ids, t, global_sum=lambda local, t=t: local * 0 + torch.stack([both, full.terms])).loss
              for t in (first, second)]
    assert full.loss.dtype == torch.float32
    assert float(sum(shares).detach()) == pytest.approx(float(full.loss.detach()), rel=4 * torch.finfo(torch.float32).eps)


def test_loss_runs_in_float32_for_bf16_embeddings(problem):
    x, labels, ids, rows = problem
    loss_fn = build_loss(LossConfig())
    emb = x.to(torch.bfloat16).requires_grad_()
    out = loss_fn(emb, labels, ids, triplets_of(rows))
    assert out.loss.dtype == torch.float32
    out.loss.backward()
    assert emb.grad.dtype == torch.bfloat16


def test_beta_table_too_small_is_a_clear_error(problem):
    x, labels, ids, rows = problem
    loss_fn = build_loss(LossConfig(beta_per_class=True, num_classes=2))
    with pytest.raises(IndexError, match="loss.num_classes"):
        loss_fn(x.float(), labels, ids, triplets_of(rows))


def test_bad_loss_config_is_rejected():
    with pytest.raises(ValueError, match="loss.kind"):
        build_loss(LossConfig(kind="arcface"))
    with pytest.raises(ValueError, match="loss.num_classes"):
        build_loss(LossConfig(beta_per_class=True, num_classes=-1))
