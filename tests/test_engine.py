"""The engine in this process (a one-process group): what a step does to the learning-rate schedule."""
import math

import torch
from torch import nn

from dist_dml.distributed import DistContext, process_group
from dist_dml.engine_config import DeepSpeedConfig, OptimizerConfig
from dist_dml.losses import LossOutput
from dist_dml.objective import StepResult
from dist_dml.sampling import Triplets


def test_a_skipped_non_finite_step_does_not_shift_the_learning_rate_schedule():
    """The rate at trainer step s is the schedule's at s, whether or not steps before it were skipped for a
    non-finite loss (the trainer counts them; DeepSpeed's scheduler did not, so the cosine lagged behind and a
    run never reached its end)."""
    from dist_dml.engine import TrainEngine
    from dist_dml.step import take_step

    optimizer = OptimizerConfig(name="sgd", lr=0.1, schedule="cosine", warmup_steps=2, weight_decay=0.0)
    total, skipped = 8, {1, 2, 5}
    factor = optimizer.lr_lambda(total)
    empty = Triplets(*(torch.zeros(0, dtype=torch.long) for _ in range(3)), 0, 0)

    def objective(embeddings, labels, image_ids, step):
        loss = embeddings.sum() * (float("nan") if step in skipped else 1.0)
        one = torch.ones(())
        return StepResult(LossOutput(loss, one, one), empty)

    torch.manual_seed(0)
    with process_group(DistContext(), 5) as ctx:
        engine = TrainEngine(nn.Linear(4, 2), ctx, optimizer, DeepSpeedConfig(), micro_batch=3, lr_lambda=factor)
        rates, taken = [], []
        for step in range(total):
            rates.append(engine.learning_rates()["backbone"])
            taken.append(take_step(engine, objective, torch.randn(3, 4), torch.zeros(3), torch.zeros(3), step)[1])
    assert [not t for t in taken] == [s in skipped for s in range(total)]
    assert all(math.isclose(rate, 0.1 * factor(step), rel_tol=1e-6) for step, rate in enumerate(rates)), rates
