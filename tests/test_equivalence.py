"""W processes under DeepSpeed (gloo, CPU) against one plain-PyTorch process on the concatenated batch.

The contract of DESIGN.md: the same loss, the same gradients for the model and for every beta part
(global, per-class, per-image), and the same parameters after several optimizer steps; with
BatchNorm in the model (model.norm=sync), the same BatchNorm running statistics too.
"""
import pytest

from .conftest import HANG_GUARD_S, torchrun
import torch

from dist_dml.train.engine import build_optimizer
from dist_dml.method.cross_batch_memory import CrossBatchMemory, MemoryConfig
from dist_dml.method.sampling import build_sampler
from tests import equivalence_worker as problem

STEPS = 3

# Every distributed problem of this file, per world size: one torchrun launch runs all of a world size's jobs
# (each its own engines, one after another), instead of a launch per test (~15 s of start-up each here).
JOBS = {
    1: {"chunks": {"zero": [0, 2], "steps": STEPS, "norm": "frozen", "chunks": [1, 4]}},
    2: {"plain": {"zero": [0, 2], "steps": STEPS},
        # Random negatives: distance-weighted draws are discontinuous in the distances, and after an optimizer step
        # the float32 difference between 2 ranks and 1 process (1e-7) flipped one draw of this deeper model (the
        # steps after it then differ by a whole triplet). The draws' exactness is the linear jobs' to test.
        "timm": {"zero": [2], "steps": STEPS, "backbone": "timm:test_resnet", "sampler": "random"},
        "memory": {"zero": [0, 2], "steps": 4, "memory": 48},
        "chunks": {"zero": [0, 2], "steps": STEPS, "norm": "frozen", "chunks": [1, 4]},
        "chunks_centres": {"zero": [2], "steps": STEPS, "norm": "frozen", "chunks": [1, 4], "proxy": "arcface"},
        "lonely": {"zero": [0, 2], "steps": 2, "scenario": "lonely"},
        "local_norm": {"zero": [0], "steps": 3, "norm": "local"},
        "bf16": {"zero": [1, 2], "steps": 3, "precision": "bf16"},
        "arcface": {"zero": [2], "steps": STEPS, "proxy": "arcface"},
        "proxy_anchor": {"zero": [0], "steps": STEPS, "proxy": "proxy_anchor"}},
    4: {"plain": {"zero": [0, 2], "steps": STEPS},
        "memory": {"zero": [0, 2], "steps": 4, "memory": 48},
        "arcface": {"zero": [2], "steps": STEPS, "proxy": "arcface"}},
}


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """launched(world_size, job): what rank 0 of that world size's launch saw for the job (launched once)."""
    import json

    done = {}

    def results(world_size: int, job: str) -> dict:
        if world_size not in done:
            out = tmp_path_factory.mktemp(f"equivalence{world_size}") / "result.pt"
            torchrun(world_size, "tests.equivalence_worker", "--jobs", json.dumps(JOBS[world_size]), "--out", str(out),
                     timeout=HANG_GUARD_S)
            done[world_size] = torch.load(out, weights_only=True)
        return done[world_size][job]

    return results


def single_process_reference(steps: int, scenario: str, world_size: int, backbone: str = "linear",
                             memory: int = 0, sampler: str = "distance_weighted", proxy: str = "") -> dict:
    """Plain PyTorch, no DeepSpeed, no process group: the whole global batch in one process; with a memory,
    the last ``memory`` embeddings of the earlier steps (detached) after it as candidates, kept by hand; with
    ``proxy``, every class centre in this process with a torch optimizer of its own at the head's rate times the
    kind's factor, and proxy.weight x its loss added to the margin loss."""
    from dist_dml.infra.distributed import DistContext
    from dist_dml.method.proxies import CentreLoss

    module = problem.build_module(backbone)
    settings = problem.optimizer_for(backbone, proxy)
    optimizer = build_optimizer(module, settings)
    sampler = build_sampler(problem.sampler_config(sampler))
    record = {"loss": [], "grads": [], "beta": [], "memory": [], "centres": []}
    centres = centre_optimizer = None
    if proxy:
        config = problem.proxy_config(proxy)
        centres = CentreLoss(config.loss_config(), problem.CENTRE_CLASSES, problem.EMBED, DistContext())
        centre_optimizer = torch.optim.SGD(centres.parameters(), lr=(settings.head_lr or settings.lr) *
                                           config.rate_factor(), momentum=settings.momentum,
                                           weight_decay=settings.weight_decay)
        assert settings.name == "sgd"
    bank = CrossBatchMemory(MemoryConfig(size=memory), problem.EMBED) if memory else None
    for step in range(steps):
        x, labels, ids = problem.global_batch(step, scenario, world_size, backbone)
        optimizer.zero_grad()
        embeddings = module(x)
        candidates, c_labels, c_ids, limit = embeddings, labels, ids, None
        if bank is not None and bank.fill:
            m_emb, m_labels, m_ids, _ = bank.contents()
            candidates, c_labels, c_ids = torch.cat([embeddings, m_emb]), torch.cat([labels, m_labels]), torch.cat(
                [ids, m_ids])
            limit = len(labels)
        triplets = sampler(candidates.detach(), c_labels, 0, len(labels), step, positive_limit=limit)
        loss = module.loss(candidates, c_labels, c_ids, triplets).loss
        if centres is not None:
            centre_optimizer.zero_grad()
            loss = loss + config.weight * centres(embeddings, labels, step)
        loss.backward()
        if centres is not None:
            centre_optimizer.step()
            record["centres"].append(centres.centres.detach().clone())
        if bank is not None:
            bank.enqueue(embeddings.detach(), labels, ids, step)
            record["memory"].append(torch.cat([t.float().reshape(len(t), -1) for t in bank.contents()], dim=1))
        record["loss"].append(float(loss.detach()))
        record["grads"].append({k: p.grad.detach().clone() for k, p in module.named_parameters()})
        optimizer.step()
        record["beta"].append({k: v.detach().clone() for k, v in module.loss.named_parameters()})
    record["params"] = {k: v.detach().clone() for k, v in module.named_parameters()}
    record["buffers"] = {k: v.detach().float().clone() for k, v in module.named_buffers()}
    return record


def assert_same_run(distributed: dict, reference: dict) -> None:
    assert distributed["loss"] == pytest.approx(reference["loss"], rel=1e-5, abs=1e-7)
    for step, (got, want) in enumerate(zip(distributed["grads"], reference["grads"])):
        assert set(got) == set(want)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"step {step} grad {name}: {m}")
    for name, want in reference["params"].items():
        torch.testing.assert_close(distributed["params"][name], want, rtol=1e-4, atol=1e-5, msg=lambda m: f"param {name}: {m}")
    assert set(distributed["buffers"]) == set(reference["buffers"]) and reference["buffers"]
    for name, want in reference["buffers"].items():
        torch.testing.assert_close(distributed["buffers"][name], want, rtol=1e-4, atol=1e-5, msg=lambda m: f"buffer {name}: {m}")


@pytest.mark.parametrize("world_size", [2, 4])
def test_deepspeed_ranks_equal_single_process(world_size, launched):
    results = launched(world_size, "plain")
    reference = single_process_reference(STEPS, "normal", world_size)
    # The beta parts really receive gradients: the comparison is not between zeros.
    for part in ("global_beta", "class_beta", "image_beta"):
        assert reference["grads"][0][f"loss.beta.{part}"].abs().sum() > 0
    # BatchNorm's running statistics moved away from their start (0 and 1): they are compared for real.
    assert reference["buffers"]["model.backbone.1.running_mean"].abs().max() > 1e-3
    for stage in (0, 2):
        assert_same_run(results[stage], reference)
        assert_unused_beta_rows_stay(results[stage]["beta"], world_size)


def assert_unused_beta_rows_stay(beta: list[dict], world_size: int) -> None:
    """Per-image beta rows of images absent from a step's global batch are bit-identical before and after
    that step (no stale Adam momentum), and the rows of the images present moved."""
    for step in range(1, len(beta)):
        _, _, ids = problem.global_batch(step, "normal", world_size)
        before, after = beta[step - 1]["beta.image_beta"], beta[step]["beta.image_beta"]
        present = torch.zeros(problem.IMAGES, dtype=torch.bool)
        present[ids] = True
        assert (~present).any() and torch.equal(after[~present], before[~present])
        assert (after[present] != before[present]).float().mean() > 0.9


def test_a_timm_backbone_on_two_ranks_equals_one_process(launched):
    """timm:test_resnet (BatchNorm2d layers, made global-batch BatchNorm by model.norm=sync) on 32-px
    images, under SGD (see equivalence_worker.SGD): 2 ranks under ZeRO 2 give the single process's loss,
    gradients, parameters and BatchNorm statistics."""
    reference = single_process_reference(STEPS, "normal", 2, "timm:test_resnet", sampler="random")
    assert any("running_mean" in name and buffer.abs().max() > 1e-3 for name, buffer in reference["buffers"].items())
    assert_same_run(launched(2, "timm")[2], reference)


@pytest.mark.parametrize("world_size", [2, 4])
def test_a_cross_batch_memory_is_the_same_on_every_rank_and_ranks_equal_one_process(world_size, launched):
    """memory.size 48 (1.5 global batches) under ZeRO 0 and 2: after every step every rank holds the same
    memory, the single process's; negatives come from it; loss, gradients and parameters are the single
    process's with the memory as candidates."""
    reference = single_process_reference(4, "normal", world_size, memory=48)
    for stage, record in launched(world_size, "memory").items():
        assert sum(record["from_memory"][1:]) > 0, stage  # the memory gives negatives from the second step on
        for step, (ranks, want) in enumerate(zip(record["memory"], reference["memory"])):
            assert all(torch.equal(r, ranks[0]) for r in ranks[1:]), (stage, step)  # identical on every rank
            torch.testing.assert_close(ranks[0], want, rtol=1e-4, atol=1e-6)  # embeddings, labels, ids, steps
        assert_same_run(record, reference)


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_global_batch_in_four_chunks_gives_the_gradients_of_one_pass(world_size, launched):
    """train.embedding_chunks 4 against 1 (fp32, ZeRO 0 and 2) on the BatchNorm model with model.norm=frozen
    (each image's embedding its own): the same loss, gradients (model and beta) and parameters after 3 steps."""
    results = launched(world_size, "chunks")
    for stage in (0, 2):
        one, four = results[(stage, 1)], results[(stage, 4)]
        assert one["grads"][0]["loss.beta.class_beta"].abs().sum() > 0  # beta's gradient is compared for real
        assert_same_run(four, one)


def test_a_global_batch_in_chunks_carries_the_class_centres_gradient(launched):
    """train.embedding_chunks 4 against 1 on 2 ranks (ZeRO 2) with ArcFace's centres sharded beside the margin loss:
    the same loss, model gradients and parameters, and the same centres after every step."""
    results = launched(2, "chunks_centres")
    one, four = results[(2, 1)], results[(2, 4)]
    assert_same_run(four, one)
    for step, (got, want) in enumerate(zip(four["centres"], one["centres"])):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=lambda m: f"centres at step {step}: {m}")
    assert not torch.equal(one["centres"][0], one["centres"][-1])


def test_rank_without_triplets_neither_hangs_nor_crashes(launched):
    """The last rank's anchors have no positive, so no triplet and no active term (ZeRO 0 and 2)."""
    results = launched(2, "lonely")  # the launch's hang guard: HANG_GUARD_S
    reference = single_process_reference(2, "lonely", 2)
    for stage in (0, 2):
        assert_same_run(results[stage], reference)


def test_local_batchnorm_ranks_embed_alike_after_the_broadcast(launched):
    """model.norm=local: per-rank statistics drift apart in training; the broadcast the trainer runs
    before every evaluation and checkpoint makes both ranks embed the same images identically."""
    record = launched(2, "local_norm")[0]
    before, after = record["before"], record["after"]
    assert not torch.equal(before[0], before[1])  # the premise: local statistics differ per rank
    assert torch.equal(after[0], after[1])


def test_bf16_beta_in_the_loss_is_the_fp32_master(launched):
    """Under bf16 the beta tables are bf16 parameters; the loss uses the optimizer's fp32 masters (ZeRO 1
    and 2; ZeRO-0 with bf16 is refused: DeepSpeed keeps no fp32 master there), not their values rounded
    to 2^-7."""
    for stage, record in launched(2, "bf16").items():
        assert record["param_dtype"] == "torch.bfloat16", stage
        assert torch.equal(record["used"], record["from_masters"]), stage
        assert not torch.equal(record["used"], record["from_params"]), stage  # rounding would show


@pytest.mark.parametrize("world_size,kind", [(2, "arcface"), (2, "proxy_anchor"), (4, "arcface")])
def test_class_centres_sharded_over_ranks_train_as_one_process_holding_them_all(world_size, kind, launched):
    """Margin + DWS with a loss against class centres (ArcFace over a sampled half of the negative classes, and
    Proxy-Anchor), the centres sharded over 2 and 4 ranks (uneven on 4: 3, 3, 3, 1 rows) as the run's part with its
    own optimizer: the loss, the model's gradients and parameters, and every centre after every step are those of
    one process holding every centre."""
    reference = single_process_reference(STEPS, "normal", world_size, proxy=kind)
    start = problem.proxy_config(kind)
    for stage, record in launched(world_size, kind).items():
        assert_same_run(record, reference)
        assert len(record["centres"]) == STEPS
        for step, (got, want) in enumerate(zip(record["centres"], reference["centres"])):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=lambda m: f"stage {stage} step {step}: {m}")
    # The centres really learned (the comparison is not between untouched initial values) ...
    from dist_dml.method.proxies import initial_centres

    first = initial_centres(problem.CENTRE_CLASSES, problem.EMBED, 0, 1, start.seed).float()
    assert (reference["centres"][-1] - first).abs().max() > 1e-3
    # ... and the loss holds the centre term: it differs from the margin loss alone.
    plain = single_process_reference(STEPS, "normal", world_size)
    assert abs(reference["loss"][0] - plain["loss"][0]) > 1e-3
