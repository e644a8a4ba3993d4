"""The engine in this process (a one-process group): what a step does to the learning-rate schedule."""
import math

import pytest

import torch
from torch import nn

from dist_dml.infra.distributed import DistContext, process_group
from dist_dml.config.optimizer import DeepSpeedConfig, OptimizerConfig
from dist_dml.method.losses import LossOutput
from dist_dml.method.objective import StepResult
from dist_dml.method.sampling import Triplets

from .conftest import as_own_process


def test_a_skipped_non_finite_step_does_not_shift_the_learning_rate_schedule():
    """The rate at trainer step s is the schedule's at s, whether or not steps before it were skipped for a
    non-finite loss (the trainer counts them; DeepSpeed's scheduler did not, so the cosine lagged behind and a
    run never reached its end)."""
    from dist_dml.train.engine import TrainEngine
    from dist_dml.train.step import take_step

    optimizer = OptimizerConfig(name="sgd", lr=0.1, schedule="cosine", warmup_steps=2, weight_decay=0.0)
    total, skipped = 8, {1, 2, 5}
    factor = optimizer.lr_lambda(total)
    empty = Triplets(*(torch.zeros(0, dtype=torch.long) for _ in range(3)), 0, 0)

    def objective(embeddings, labels, image_ids, step):
        loss = embeddings.sum() * (float("nan") if step in skipped else 1.0)
        one = torch.ones(())
        return StepResult(LossOutput(loss, one, one), empty)

    torch.manual_seed(0)
    with as_own_process(), process_group(DistContext(), 5) as ctx:  # the group's variables put back after
        engine = TrainEngine(nn.Linear(4, 2), ctx, optimizer, DeepSpeedConfig(), micro_batch=3, lr_lambda=factor)
        rates, taken = [], []
        for step in range(total):
            rates.append(engine.learning_rates()["backbone"])
            taken.append(take_step(engine, objective, torch.randn(3, 4), torch.zeros(3), torch.zeros(3), step)[1])
    assert [not t for t in taken] == [s in skipped for s in range(total)]
    assert all(math.isclose(rate, 0.1 * factor(step), rel_tol=1e-6) for step, rate in enumerate(rates)), rates


DROP = 0.5


def dropout_module():
    from dist_dml.method.losses import LossConfig, build_loss
    from dist_dml.models.embedding import EmbeddingModel, TrainModule

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.Dropout(DROP), nn.Tanh())
    return TrainModule(EmbeddingModel(net, 32, 8), build_loss(LossConfig(beta_per_class=True, num_classes=4)))


@pytest.mark.parametrize("precision, zero, tolerance", [("fp32", 0, 1e-5), ("bf16", 1, 2e-2)])
def test_chunks_with_dropout_give_one_pass_gradients_with_the_same_draws(precision, zero, tolerance):
    """train.embedding_chunks 4 on a model with dropout, in fp32 and bf16: the chunked step (embed without
    autograd, the loss's gradient once, each chunk embedded again with its RNG state replayed) gives the
    gradients, model and beta, of one autograd pass through the same four chunks from the same RNG state, i.e.
    with the dropout masks the first pass drew (without the replay the second pass draws other masks, and the
    gradients differ many times over the tolerance)."""
    from dist_dml.train.engine import TrainEngine
    from dist_dml.method.objective import GlobalBatchObjective
    from dist_dml.method.sampling import SamplerConfig, build_sampler
    from dist_dml.train.step import take_step

    g = torch.Generator().manual_seed(1)
    x, labels, ids = torch.randn(16, 8, generator=g), torch.arange(4).repeat(4), torch.arange(16)
    sampler = build_sampler(SamplerConfig(kind="random", seed=7))
    reference = dropout_module()
    if precision == "bf16":
        reference.model.to(torch.bfloat16)  # as DeepSpeed's bf16 runs the model; the loss and beta stay fp32
    with as_own_process(), process_group(DistContext(), 5) as ctx:
        torch.manual_seed(123)
        local = torch.cat([reference(part) for part in x.chunk(4)])
        out = GlobalBatchObjective(sampler, reference.loss, ctx)(local, labels, ids, 0).output.loss
        out.backward()
        want = {name: p.grad.float() for name, p in reference.named_parameters()}

        engine = TrainEngine(dropout_module(), ctx, OptimizerConfig(name="sgd", lr=0.1),
                             DeepSpeedConfig(zero_stage=zero, precision=precision), micro_batch=4, accumulation=4)
        objective, got = GlobalBatchObjective(sampler, engine.module.loss, ctx), {}
        torch.manual_seed(123)
        result, taken = take_step(engine, objective, x, labels, ids, 0, chunks=4,
                                  before_step=lambda: got.update(engine.full_gradients()))
    assert taken and float(result.output.loss.detach()) == pytest.approx(float(out.detach()), rel=tolerance)
    assert set(got) == set(want) and want["loss.beta.class_beta"].abs().sum() > 0
    for name in want:
        scale = want[name].abs().max()
        torch.testing.assert_close(got[name], want[name], rtol=tolerance, atol=tolerance * float(scale),
                                   msg=lambda m: f"{name}: {m}")
