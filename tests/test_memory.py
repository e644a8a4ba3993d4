"""The cross-batch memory in one process: what the samplers draw from batch and memory against brute-force
loops, no gradient into the memory, its warm-up, its FIFO, its state through a checkpoint bit for bit."""
import pytest
import torch

from dist_dml.infra.distributed import DistContext
from dist_dml.method.losses import LossConfig, build_loss
from dist_dml.method.cross_batch_memory import CrossBatchMemory, MemoryConfig
from dist_dml.method.objective import GlobalBatchObjective
from dist_dml.method.sampling import SamplerConfig, build_sampler

from .test_sampling import brute_force_nearest, pk_labels, reference_probabilities, unit

BATCH, MEMORY = 32, 48


def batch_and_memory(seed: int = 0):
    """A global batch of 8 classes x 4 and a memory of 48 items, some of the batch's classes, some not."""
    x = unit(BATCH + MEMORY, 6, seed)
    labels = torch.cat([pk_labels(8, 4, seed), torch.arange(MEMORY) % 12])
    return x, labels


@pytest.mark.parametrize("positives", [False, True], ids=["negatives", "positives_too"])
@pytest.mark.parametrize("kind", ["hard", "semi_hard"])
def test_nearest_samplers_over_batch_and_memory_equal_a_loop(kind, positives):
    x, labels = batch_and_memory()
    t = build_sampler(SamplerConfig(kind=kind, chunk_elements=300))(x, labels, 0, BATCH, 0,
                                                                     positive_limit=None if positives else BATCH)
    got = sorted(zip(t.anchor.tolist(), t.positive.tolist(), t.negative.tolist()))
    assert got == brute_force_nearest(x, labels, kind, anchors=BATCH, positives_below=None if positives else BATCH)
    assert any(n >= BATCH for _, _, n in got)  # the memory gives negatives for real
    assert any(p >= BATCH for _, p, _ in got) == positives


def test_distance_weighted_draws_over_batch_and_memory_as_the_float64_weights_say():
    x, labels = batch_and_memory(3)
    sampler = build_sampler(SamplerConfig(seed=1))
    got = sampler.probabilities(x, labels, 0, BATCH)
    want = reference_probabilities(x, labels)[:BATCH]
    torch.testing.assert_close(got, want, rtol=2e-4, atol=1e-9)
    t = sampler(x, labels, 0, BATCH, 5, positive_limit=BATCH)
    assert bool((got[t.anchor, t.negative] > 0).all())  # every draw has positive probability
    assert bool((t.positive < BATCH).all()) and bool((t.negative >= BATCH).any())
    pairs = sorted(zip(t.anchor.tolist(), t.positive.tolist()))
    assert pairs == sorted((a, p) for a in range(BATCH) for p in range(BATCH) if a != p and labels[a] == labels[p])


def test_memory_items_receive_no_gradient_and_the_batch_gets_the_loss_with_memory_as_constants():
    torch.manual_seed(0)
    memory = CrossBatchMemory(MemoryConfig(size=MEMORY), 6)
    x, labels = batch_and_memory(4)
    # The remembered embeddings come out of a graph, as a step's global batch does: nothing may flow back into it.
    earlier = x[BATCH:].clone().requires_grad_()
    memory.enqueue(earlier * 1.0, labels[BATCH:], torch.arange(MEMORY) + 1000, step=0)
    loss = build_loss(LossConfig(kind="triplet"))
    objective = GlobalBatchObjective(build_sampler(SamplerConfig(kind="hard")), loss, DistContext(), memory)
    local = x[:BATCH].clone().requires_grad_()
    result = objective(local, labels[:BATCH], torch.arange(BATCH), step=1)
    result.output.loss.backward()
    assert earlier.grad is None and not memory.contents()[0].requires_grad
    # The reference: the same triplets' loss over the batch with the memory as a constant tensor.
    leaf = x[:BATCH].clone().requires_grad_()
    candidates = torch.cat([leaf, memory.contents()[0]])
    ref_labels = torch.cat([labels[:BATCH], memory.contents()[1]])
    ref = loss(candidates, ref_labels, torch.cat([torch.arange(BATCH), memory.contents()[2]]), result.triplets)
    ref.loss.backward()
    assert float(result.output.loss.detach()) == pytest.approx(float(ref.loss.detach()), rel=1e-6)
    torch.testing.assert_close(local.grad, leaf.grad)
    assert result.memory["memory_negatives"] > 0 and result.memory["memory_fill"] == MEMORY
    assert result.memory["memory_age_sum"] == result.memory["memory_draws"]  # every item is 1 step old


def test_the_memory_is_sampled_from_its_start_step_on():
    memory = CrossBatchMemory(MemoryConfig(size=MEMORY, start_step=3), 6)
    x, labels = batch_and_memory(5)
    memory.enqueue(x[BATCH:], labels[BATCH:], torch.arange(MEMORY), step=0)
    objective = GlobalBatchObjective(build_sampler(SamplerConfig(kind="hard")), build_loss(LossConfig()), DistContext(),
                                     memory)
    for step, from_memory in ((2, False), (3, True)):
        t = objective(x[:BATCH], labels[:BATCH], torch.arange(BATCH), step).triplets
        assert bool((t.negative >= BATCH).any()) == from_memory


def test_the_fifo_keeps_the_newest_items_and_its_state_round_trips_bit_for_bit():
    memory = CrossBatchMemory(MemoryConfig(size=10, dtype="bf16"), 3)
    for step in range(4):  # 4 batches of 4: the last 10 items stay
        memory.enqueue(unit(4, 3, step), torch.arange(4) + 10 * step, torch.arange(4) + 100 * step, step)
    emb, labels, ids, steps = memory.contents()
    assert memory.fill == 10 and sorted(ids.tolist()) == [102, 103, 200, 201, 202, 203, 300, 301, 302, 303]
    assert sorted(steps.tolist()) == [1, 1, 2, 2, 2, 2, 3, 3, 3, 3]
    assert emb.dtype == torch.float32 and memory.embeddings.dtype == torch.bfloat16
    again = CrossBatchMemory(MemoryConfig(size=10, dtype="bf16"), 3)
    again.load_state_dict(memory.state_dict())
    for a, b in zip(memory.contents(), again.contents()):
        assert torch.equal(a, b)
    assert (again.fill, again.head) == (memory.fill, memory.head)
    with pytest.raises(ValueError, match="memory.size or model.embedding_dim changed"):
        CrossBatchMemory(MemoryConfig(size=20), 3).load_state_dict(memory.state_dict())


def test_a_resumed_run_continues_with_the_same_memory_bit_for_bit(tiny_shards, tmp_path):
    """Two trainings with a memory: one straight to step 8, one stopped at step 4 and resumed from its
    checkpoint there (the memory travels in it); at step 8 both hold the same memory, bit for bit."""
    import shutil

    from .conftest import ROOT, dist_dml_here, tiny_overrides
    from .test_training import checkpoint_client_state

    def train(out, steps):
        overrides = tiny_overrides(tiny_shards, out, **{"train.steps": steps, "checkpoint.every_steps": 4,
                                                        "checkpoint.keep_last": 3, "eval.at_start": False,
                                                        "tracking.enabled": False, "memory.size": 40})
        proc = dist_dml_here("train", str(ROOT / "configs/cpu_synthetic.yaml"), *overrides)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(straight, 8)
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step00000008")
    (resumed / "results.json").unlink()
    log = train(resumed, 8)
    assert "step00000004 at step 4" in log and "memory=40" in log, log[-2000:]
    want = checkpoint_client_state(straight / "checkpoints" / "step00000008")["parts"]["memory"]
    got = checkpoint_client_state(resumed / "checkpoints" / "step00000008")["parts"]["memory"]
    assert want["fill"] == got["fill"] == 40 and want["head"] == got["head"]
    for key in ("embeddings", "labels", "image_ids", "steps"):
        assert torch.equal(got[key], want[key]), key


def test_chunks_with_batch_statistic_batchnorm_are_refused_before_training(tiny_shards):
    """train.embedding_chunks > 1 is exact only where no BatchNorm computes statistics of its batch: sync and
    local are refused at the config check; frozen BatchNorm and a backbone without BatchNorm are accepted."""
    from dist_dml.config import ConfigError, load_config

    from .conftest import ROOT

    config = str(ROOT / "configs/cpu_synthetic.yaml")
    base = [f"data.root={tiny_shards}", "train.embedding_chunks=4"]
    for norm in ("sync", "local"):
        with pytest.raises(ConfigError, match=f"model.norm={norm}: tiny_cnn's BatchNorm would compute statistics"):
            load_config(config, [*base, f"model.norm={norm}"])
    assert load_config(config, [*base, "model.norm=frozen"]).train.embedding_chunks == 4
    assert load_config(config, [*base, "model.backbone=timm:test_vit", "model.norm=sync"]).train.embedding_chunks == 4
    with pytest.raises(ConfigError, match="does not divide the local batch of 64"):
        load_config(config, [*base[:1], "train.embedding_chunks=3", "model.norm=frozen"])


def test_mode_add_keeps_the_batchs_own_negatives_and_adds_one_drawn_with_the_memory():
    """memory.mode=add: each (anchor, positive) pair gets its negative from the batch alone (the triplets of a run
    without memory) and one more drawn from batch + memory, and the loss is over both (the memory still gets no
    gradient); mode shared draws one negative per pair, from batch + memory."""
    x, labels = batch_and_memory(6)
    sampler = build_sampler(SamplerConfig(seed=2))
    loss = build_loss(LossConfig())
    ids = torch.arange(BATCH + MEMORY)
    runs = {}
    for mode in ("shared", "add"):
        memory = CrossBatchMemory(MemoryConfig(size=MEMORY, mode=mode), 6)
        memory.enqueue(x[BATCH:], labels[BATCH:], ids[BATCH:], step=0)
        local = x[:BATCH].clone().requires_grad_()
        runs[mode] = (GlobalBatchObjective(sampler, loss, DistContext(), memory)(local, labels[:BATCH], ids[:BATCH], 4),
                      local)
    alone = sampler(x[:BATCH], labels[:BATCH], 0, BATCH, 4)
    shared, added = runs["shared"][0].triplets, runs["add"][0].triplets
    triplets = lambda t: list(zip(t.anchor.tolist(), t.positive.tolist(), t.negative.tolist()))  # noqa: E731
    assert triplets(added) == triplets(alone) + triplets(shared)
    assert bool((alone.negative < BATCH).all()) and bool((shared.negative >= BATCH).float().mean() > 0.5)
    # the loss over both sets of triplets, the memory as constants
    leaf = x[:BATCH].clone().requires_grad_()
    ref = loss(torch.cat([leaf, x[BATCH:]]), labels, ids, added)
    ref.loss.backward()
    result, local = runs["add"]
    result.output.loss.backward()
    assert float(result.output.loss.detach()) == pytest.approx(float(ref.loss.detach()), rel=1e-6)
    torch.testing.assert_close(local.grad, leaf.grad)
    with pytest.raises(ValueError, match="memory.mode must be one of shared, add"):
        MemoryConfig(size=4, mode="replace").validate()


def test_with_memory_beta_false_the_memorys_pairs_do_not_move_beta():
    """memory.beta=false: the loss is the same, and beta's gradient is that of the batch's pairs alone, worked by
    hand in float64: (negatives active - positives active) / active terms, over the pairs whose other item is in
    the batch; the embeddings' gradients are unchanged."""
    from dist_dml.method.sampling import Triplets

    g = torch.Generator().manual_seed(3)
    candidates = torch.nn.functional.normalize(torch.randn(14, 6, generator=g), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 0, 1, 2, 3, 4, 5])  # 8 batch items, then 6 of a memory
    ids = torch.arange(14)
    triplets = Triplets(torch.tensor([0, 1, 2, 3, 4, 5, 6, 7]), torch.tensor([1, 0, 3, 2, 5, 4, 7, 6]),
                        torch.tensor([2, 9, 12, 13, 0, 10, 13, 1]), 8, 0)
    results = {}
    for memory_from in (None, 8):
        loss = build_loss(LossConfig(kind="margin", beta_init=1.5))
        emb = candidates.detach().clone().requires_grad_(True)
        out = loss(emb, labels, ids, triplets, memory_from=memory_from)
        out.loss.backward()
        results[memory_from] = (float(out.loss.detach()), loss.beta.global_beta.grad.item(), emb.grad.clone())
    assert results[None][0] == results[8][0]
    assert torch.equal(results[None][2], results[8][2])
    e = candidates.detach().double()
    d = lambda i, j: float((e[i] - e[j]).norm())  # noqa: E731
    pos = [0.2 + d(a, p) - 1.5 > 0 for a, p in zip(triplets.anchor.tolist(), triplets.positive.tolist())]
    neg = [0.2 - d(a, n) + 1.5 > 0 for a, n in zip(triplets.anchor.tolist(), triplets.negative.tolist())]
    active = sum(pos) + sum(neg)
    batch_neg = sum(a for a, n in zip(neg, triplets.negative.tolist()) if n < 8)
    assert 0 < batch_neg < sum(neg)  # some active negatives come from the memory
    assert results[8][1] == pytest.approx((batch_neg - sum(pos)) / active, abs=1e-6)
    assert results[None][1] == pytest.approx((sum(neg) - sum(pos)) / active, abs=1e-6)


def memory_run(tmp_path, **memory) -> tuple[list[float], str]:
    """A one-process training of the CPU default on 300 synthetic products (28 px), 240 steps with a 4,096-item
    memory: the spread of every log window, and the log."""
    import re

    from .conftest import ROOT, dist_dml_here, synthetic_shards

    shards = synthetic_shards(tmp_path / "data", 320, 20, 1.0)
    overrides = {"data.root": shards, "train.output_dir": tmp_path / "run", "train.steps": 240, "train.log_every": 20,
                 "data.image_size": 28, "data.resize": 32, "data.workers": 1, "eval.at_start": False,
                 "eval.every_steps": 0, "eval.plots": False, "checkpoint.every_steps": 0, "tracking.enabled": False,
                 "memory.size": 4096, **{f"memory.{k}": v for k, v in memory.items()}}
    ran = dist_dml_here("train", str(ROOT / "configs/cpu_synthetic.yaml"), *[f"{k}={v}" for k, v in overrides.items()])
    assert ran.returncode == 0, ran.stderr[-3000:]
    return [float(s) for s in re.findall(r" spread=([0-9.]+)", ran.stdout)], ran.stdout + ran.stderr


def test_the_memory_recipe_the_guide_recommends_does_not_collapse(tmp_path):
    """docs/method.md's recipe (memory.mode=add, memory.beta=false, started at two thirds of the run): every log
    window's spread stays above train.collapse_spread (0.2), and no collapse is warned of."""
    spreads, log = memory_run(tmp_path, mode="add", beta="false", start_step=160)
    assert len(spreads) == 12 and min(spreads) > 0.2, spreads
    assert "collapse" not in log
