"""Runs a few DeepSpeed steps on a tiny problem under torchrun; rank 0 saves what it saw.

    torchrun --nproc_per_node W -m tests.equivalence_worker --zero 0 2 --steps 3 --out result.pt
    torchrun --nproc_per_node W -m tests.equivalence_worker --jobs '{"plain": {"zero": [0, 2]}, ...}' --out result.pt

Shared with tests/test_equivalence.py, which runs the same problem in one plain-PyTorch process.
"""
from __future__ import annotations

import argparse
import json

import torch
from torch import nn

from dist_dml.cli import leave
from dist_dml.config.optimizer import DeepSpeedConfig, OptimizerConfig
from dist_dml.method.losses import LossConfig, build_loss
from dist_dml.models.embedding import EmbeddingModel, TrainModule
from dist_dml.method.sampling import SamplerConfig, build_sampler

GLOBAL_BATCH = 32
CLASSES = 8
IMAGES = 64
IN_DIM, FEATURES, EMBED = 16, 32, 8
LOSS = LossConfig(kind="margin", beta_per_class=True, beta_per_image=True, num_classes=CLASSES + GLOBAL_BATCH, num_images=IMAGES, nu=0.05)
OPTIMIZER = OptimizerConfig(name="adam", lr=1e-2, beta_lr=5e-2, weight_decay=1e-3)
# A deep backbone's smallest gradients are float noise: Adam's m / sqrt(v) would turn their sign into a whole
# step of lr, so the timm backbones are compared under SGD, where a step is as small as its gradient.
SGD = OptimizerConfig(name="sgd", lr=0.05, beta_lr=5e-2, momentum=0.9, weight_decay=1e-3)


def optimizer_for(backbone: str, proxy: str = "") -> OptimizerConfig:
    """Adam for the linear model; SGD for a timm backbone, and with class centres (whose loss leaves some of the
    small model's gradients near zero, where Adam turns float noise into whole steps as well)."""
    return OPTIMIZER if backbone == "linear" and not proxy else SGD
SAMPLER = SamplerConfig(kind="distance_weighted", seed=7)


def sampler_config(kind: str = "distance_weighted") -> SamplerConfig:
    """The problems' sampler: distance-weighted, or another kind with the same seed."""
    return SamplerConfig(kind=kind, seed=SAMPLER.seed)


IMAGE_SIZE = 32  # the inputs of a timm backbone: GLOBAL_BATCH random 3 x 32 x 32 images


def build_module(backbone: str = "linear") -> TrainModule:
    """A backbone with BatchNorm: "linear" (plain BatchNorm1d, the single-process reference's), or
    timm:NAME through dist_dml's registry (timm:test_resnet has BatchNorm2d layers)."""
    torch.manual_seed(0)
    if backbone == "linear":
        net, features = nn.Sequential(nn.Linear(IN_DIM, FEATURES), nn.BatchNorm1d(FEATURES), nn.Tanh()), FEATURES
    else:
        from dist_dml.models.backbones import backbone_spec

        net, features = backbone_spec(backbone).build(IMAGE_SIZE)
    return TrainModule(EmbeddingModel(net, features, EMBED), build_loss(LOSS))


def global_batch(step: int, scenario: str, world_size: int, backbone: str = "linear"):
    """Inputs, labels and image ids of the global batch of ``step`` (the same on every rank)."""
    g = torch.Generator().manual_seed(1000 + step)
    shape = (IN_DIM,) if backbone == "linear" else (3, IMAGE_SIZE, IMAGE_SIZE)
    x = torch.randn(GLOBAL_BATCH, *shape, generator=g)
    labels = torch.arange(CLASSES).repeat_interleave(GLOBAL_BATCH // CLASSES)[torch.randperm(GLOBAL_BATCH, generator=g)]
    if scenario == "lonely":
        # The last rank's items have labels nobody else has: its anchors have no positive at all.
        local = GLOBAL_BATCH // world_size
        labels = labels.clone()
        labels[-local:] = CLASSES + torch.arange(local)
    ids = (torch.arange(GLOBAL_BATCH) + GLOBAL_BATCH * step) % IMAGES
    return x, labels, ids


CENTRE_CLASSES = 10  # class centres (proxy): more than the batch's 8 classes, uneven shards on 4 ranks (3, 3, 3, 1)


def proxy_config(kind: str):
    """The centre losses the problems train beside the margin loss: ArcFace at a scale this small problem learns
    at, over half of the negative classes (Partial FC), and Proxy-Anchor with the paper's alpha and delta; the
    centres at 2 and 3 times the head's rate."""
    from dist_dml.method.proxies import ProxyConfig

    if kind == "arcface":
        return ProxyConfig(kind="arcface", scale=8.0, sample_rate=0.5, weight=0.5, lr_factor=2.0,
                           num_classes=CENTRE_CLASSES, seed=5)
    return ProxyConfig(kind=kind, lr_factor=3.0, num_classes=CENTRE_CLASSES, seed=5)


def run(zero_stages: list[int], steps: int, scenario: str, norm: str = "sync", precision: str = "fp32",
        backbone: str = "linear", device: str = "cpu", memory: int = 0, chunks: int = 1,
        sampler: str = "distance_weighted", proxy: str = "") -> dict:
    """Per ZeRO stage, what rank 0 saw (with ``chunks`` > 1, each step through dist_dml.train.step's chunked path;
    with ``proxy``, a loss against class centres sharded over the ranks beside the margin loss, the run's part)."""
    from dist_dml.infra.accelerator import configure
    from dist_dml.infra.distributed import DistContext

    configure(device)
    from dist_dml.train.engine import TrainEngine
    from dist_dml.method.cross_batch_memory import CrossBatchMemory, MemoryConfig
    from dist_dml.models.embedding import ModelConfig, with_norm
    from dist_dml.method.objective import GlobalBatchObjective
    from dist_dml.train.step import take_step

    ctx = DistContext.from_env(device=device)
    ctx.init_process_group()  # this worker owns its process group (main destroys it)
    results = {}
    local = GLOBAL_BATCH // ctx.world_size
    for stage in zero_stages:
        module = build_module(backbone)
        with_norm(module.model, ModelConfig(backbone="tiny_cnn", norm=norm), ctx.all_gather_with_grad, ctx.device)
        engine = TrainEngine(module, ctx, optimizer_for(backbone, proxy), DeepSpeedConfig(zero_stage=stage, precision=precision),
                             micro_batch=local // chunks, accumulation=chunks)
        bank = CrossBatchMemory(MemoryConfig(size=memory), EMBED, ctx.device) if memory else None
        centres = None
        if proxy:
            from dist_dml.train.centres import ClassCentres

            centres = ClassCentres(proxy_config(proxy), CENTRE_CLASSES, EMBED, ctx, optimizer_for(backbone, proxy),
                                   lambda step: engine.rate_at("head", step))
        objective = GlobalBatchObjective(build_sampler(sampler_config(sampler)), engine.module.loss, ctx, bank,
                                         centres=centres)
        record = {"loss": [], "grads": [], "beta": [], "memory": [], "from_memory": [], "centres": []}
        for step in range(steps):
            x, labels, ids = global_batch(step, scenario, ctx.world_size, backbone)
            part = slice(ctx.rank * local, (ctx.rank + 1) * local)
            result, taken = take_step(engine, objective, x[part], labels[part], ids[part], step, chunks,
                                      before_step=lambda: record["grads"].append(engine.full_gradients()))
            if centres is not None:
                centres.after_step(result, {}, step, taken)
                record["centres"].append(ctx.all_gather_uneven(centres.loss.centres.detach()).cpu())
            if bank is not None:  # the global batch into the memory, then every rank's memory, to compare them
                bank.enqueue(*result.batch, step)
                mine = torch.cat([t.float().cpu().reshape(len(t), -1) for t in bank.contents()], dim=1)
                record["memory"].append(ctx.all_gather_object(mine))
                record["from_memory"].append(result.memory.get("memory_negatives", 0.0))
            record["beta"].append({k: v.detach().float().cpu().clone() for k, v in engine.module.loss.named_parameters()})
            record["loss"].append(float(ctx.all_reduce_sum(result.output.loss.detach())))
        record["params"] = {k: v.detach().float().cpu().clone() for k, v in engine.module.named_parameters()}
        record["buffers"] = {k: v.detach().float().cpu().clone() for k, v in engine.module.named_buffers()}
        if norm == "local":
            record.update(embed_on_every_rank(engine, ctx))
        if precision != "fp32":
            record.update(beta_against_masters(engine, labels, ids))
        results[stage] = record
    return results


def embed_on_every_rank(engine, ctx) -> dict:
    """Each rank embeds the same images in eval mode, before and after the trainer's broadcast of rank
    0's BatchNorm statistics: {"before": [per-rank embeddings], "after": [...]}."""
    from dist_dml.train.trainer import share_norm_statistics

    x = torch.randn(6, IN_DIM, generator=torch.Generator().manual_seed(99))
    model = engine.module.model
    out = {}
    for when in ("before", "after"):
        if when == "after":
            share_norm_statistics(model, "local", ctx)
        model.eval()
        with torch.no_grad():
            out[when] = list(ctx.all_gather_no_grad(model(x).unsqueeze(0)).cpu())
        model.train()
    return out


def beta_against_masters(engine, labels, ids) -> dict:
    """The beta the loss uses for a batch; the same from the optimizer's fp32 masters (DeepSpeed's own
    accessor) and from the low-precision parameters."""
    from deepspeed.utils import safe_get_full_fp32_param

    beta = engine.module.loss.beta
    masters = {name: safe_get_full_fp32_param(p).float().reshape(p.shape) for name, p in beta.named_parameters()}
    params = {name: p.detach().float() for name, p in beta.named_parameters()}
    combine = lambda t: t["global_beta"][torch.zeros_like(labels)] + t["class_beta"][labels] + t["image_beta"][ids]
    with torch.no_grad():
        used = beta(labels, ids).float()
    return {"used": used.cpu(), "from_masters": combine(masters).cpu(), "from_params": combine(params).cpu(),
            "param_dtype": str(beta.class_beta.dtype)}


def run_job(zero: list[int], steps: int = 3, scenario: str = "normal", norm: str = "sync", precision: str = "fp32",
            backbone: str = "linear", device: str = "cpu", memory: int = 0, chunks: list[int] = (1,),
            sampler: str = "distance_weighted", proxy: str = "") -> dict:
    """run() per chunks value: keyed by stage, or by (stage, chunks) where several chunks are compared."""
    results = {}
    for n in chunks:
        found = run(zero, steps, scenario, norm, precision, backbone, device, memory, n, sampler, proxy)
        results.update(found if list(chunks) == [1] else {(stage, n): r for stage, r in found.items()})
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--zero", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--scenario", default="normal", choices=["normal", "lonely"])
    parser.add_argument("--norm", default="sync", choices=["sync", "local", "frozen"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--backbone", default="linear", help="linear, or timm:NAME")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: NCCL (benchmarks/bench_gpu.py)")
    parser.add_argument("--memory", type=int, default=0, help="a cross-batch memory of this many embeddings")
    parser.add_argument("--chunks", type=int, nargs="+", default=[1], help="train.embedding_chunks (one run each)")
    parser.add_argument("--jobs", help="JSON {name: {run_job's arguments}}: several problems in one launch, "
                                       "saved as {name: results} (the other options are then ignored)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.jobs:
        results = {name: run_job(**job) for name, job in json.loads(args.jobs).items()}
    else:
        results = run_job(args.zero, args.steps, args.scenario, args.norm, args.precision, args.backbone, args.device,
                          args.memory, args.chunks)
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save(results, args.out)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    leave(0)  # without the interpreter's teardown, which can abort a finished rank (see dist_dml.cli.leave)


if __name__ == "__main__":
    main()
