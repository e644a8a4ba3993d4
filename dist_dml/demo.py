"""The core on the CPU, end to end: 2 processes, DeepSpeed ZeRO-2 over gloo, global-batch sampling.

Synthetic "products": each class is a prototype; its images are noisy views of it through a fixed
random non-linear map. An MLP learns embeddings on the training classes and is scored by Recall@1
on held-out classes, before and after training.

    torchrun --nproc_per_node 2 -m dist_dml.demo      (what `dist-dml demo` runs)
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from dist_dml.distributed import DistContext
from dist_dml.engine import EngineConfig, TrainEngine
from dist_dml.evaluation import recall_at_k
from dist_dml.losses import LossConfig, build_loss
from dist_dml.objective import EmbeddingModel, GlobalBatchObjective, TrainModule
from dist_dml.sampling import SamplerConfig, build_sampler

IN_DIM, LATENT = 64, 16


def synthetic_products(num_classes: int, per_class: int, seed: int, first_class: int = 0):
    """(inputs, labels) of ``per_class`` views of classes first_class .. first_class + num_classes - 1."""
    world = torch.Generator().manual_seed(1234)  # the same "world" for train and test classes
    mix1, mix2 = torch.randn(LATENT, 96, generator=world), torch.randn(96, IN_DIM, generator=world) / 96 ** 0.5
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(first_class + num_classes, LATENT, generator=torch.Generator().manual_seed(99))[first_class:]
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    latent = protos[labels] + 0.55 * torch.randn(len(labels), LATENT, generator=g)
    x = torch.tanh(latent @ mix1) @ mix2 + 0.05 * torch.randn(len(labels), IN_DIM, generator=g)
    return x, labels + first_class


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--classes-per-rank", type=int, default=16, help="P")
    parser.add_argument("--images-per-class", type=int, default=4, help="K")
    parser.add_argument("--zero-stage", type=int, default=2)
    args = parser.parse_args(argv)

    ctx = DistContext.from_env(device="cpu")
    train_x, train_y = synthetic_products(400, 8, seed=1)
    test_x, test_y = synthetic_products(200, 8, seed=2, first_class=400)

    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(IN_DIM, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU())
    module = TrainModule(EmbeddingModel(backbone, 256, 32), build_loss(LossConfig()))
    p, k = args.classes_per_rank, args.images_per_class
    engine = TrainEngine(module, ctx, EngineConfig(lr=1e-3, beta_lr=1e-2, zero_stage=args.zero_stage), micro_batch=p * k)
    objective = GlobalBatchObjective(build_sampler(SamplerConfig(seed=0)), engine.module.loss, ctx)

    def evaluate() -> float:
        with torch.no_grad():
            return recall_at_k(engine.module.model(test_x), test_y, (1,))[1]

    before = evaluate()
    start = time.time()
    for step in range(args.steps):
        # The global batch of this step: P x K images of P * world classes, the same on every rank.
        g = torch.Generator().manual_seed(step)
        classes = torch.randperm(400, generator=g)[: p * ctx.world_size]
        mine = classes[ctx.rank * p:(ctx.rank + 1) * p]
        picks = torch.stack([torch.randperm(8, generator=g)[:k] for _ in mine]) + mine[:, None] * 8
        idx = picks.reshape(-1)
        result = objective(engine(train_x[idx]), train_y[idx], idx, step)
        engine.backward(result.output.loss)
        engine.step()
        if (step + 1) % 50 == 0:
            loss = float(ctx.all_reduce_sum(result.output.loss.detach()))  # every rank joins the reduce
            rate = (step + 1) * p * k * ctx.world_size / (time.time() - start)
            if ctx.is_main:
                print(f"step {step + 1}/{args.steps} loss={loss:.4f} "
                      f"beta={engine.module.loss.beta.global_beta.item():.3f} images/s={rate:.0f}", flush=True)
    after = evaluate()
    if ctx.is_main:
        print(f"Recall@1 on {len(test_y) // 8} held-out classes: untrained {before:.3f} -> trained {after:.3f}")
    ctx.barrier()
    ctx.shutdown()


if __name__ == "__main__":
    main()
