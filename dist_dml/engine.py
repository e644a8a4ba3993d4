"""The one module that imports DeepSpeed: engine, parameter groups, precision, ZeRO 0-2.

Parameter groups: the backbone, the embedding head, and beta (the loss's parameters), each with its
own learning rate; beta never gets weight decay. The learning-rate schedule is a torch LambdaLR
multiplier, so each group keeps its own rate (DeepSpeed's WarmupLR with a scalar warmup_max_lr
would overwrite every group's rate, beta's included).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from dist_dml.distributed import DistContext

os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
import deepspeed  # noqa: E402
from deepspeed.utils import safe_get_full_grad  # noqa: E402

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
}
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class EngineConfig:
    """The `optimizer` and `deepspeed` knobs the engine needs."""

    optimizer: str = "adam"  # a key of OPTIMIZERS
    lr: float = 1e-4  # backbone
    head_lr: float | None = None  # embedding head; None: lr
    beta_lr: float = 1e-2
    weight_decay: float = 1e-4  # backbone and head; never beta
    momentum: float = 0.9  # sgd only
    zero_stage: int = 0  # 0, 1 or 2 (ZeRO-3 partitions beta, which the loss reads outside forward)
    precision: str = "fp32"  # fp32, bf16 or fp16
    gradient_clipping: float = 0.0  # global norm; 0 disables

    def validate(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer.name: unknown optimizer {self.optimizer!r}; known: {sorted(OPTIMIZERS)}")
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"deepspeed.zero_stage must be 0, 1 or 2, got {self.zero_stage}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"deepspeed.precision must be one of {PRECISIONS}, got {self.precision!r}")
        for key in ("lr", "beta_lr"):
            if getattr(self, key) <= 0:
                raise ValueError(f"optimizer.{key} must be positive, got {getattr(self, key)}")


def param_groups(module: nn.Module, config: EngineConfig) -> list[dict]:
    """backbone / head / beta groups of a TrainModule: `loss.*` is beta, `model.head.*` the head."""
    groups: dict[str, list[nn.Parameter]] = {"backbone": [], "head": [], "beta": []}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("loss."):
            groups["beta"].append(param)
        elif name.startswith("model.head."):
            groups["head"].append(param)
        else:
            groups["backbone"].append(param)
    settings = {
        "backbone": dict(lr=config.lr, weight_decay=config.weight_decay),
        "head": dict(lr=config.head_lr or config.lr, weight_decay=config.weight_decay),
        "beta": dict(lr=config.beta_lr, weight_decay=0.0),
    }
    return [dict(params=params, name=name, **settings[name]) for name, params in groups.items() if params]


def deepspeed_config(config: EngineConfig, micro_batch: int) -> dict:
    ds = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 1 << 30,
        "zero_optimization": {"stage": config.zero_stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": config.gradient_clipping,
        "bf16": {"enabled": config.precision == "bf16"},
        "fp16": {"enabled": config.precision == "fp16", "initial_scale_power": 16},
    }
    return ds


class TrainEngine:
    """DeepSpeed around a TrainModule (model + loss): forward, backward with the gradient contract, step."""

    def __init__(
        self,
        module: nn.Module,
        ctx: DistContext,
        config: EngineConfig,
        micro_batch: int,
        lr_lambda: Callable[[int], float] | None = None,
    ):
        config.validate()
        self.ctx = ctx
        self.config = config
        ctx.init_process_group()
        deepspeed.init_distributed(dist_backend=ctx.backend, auto_mpi_discovery=False, verbose=False)
        kwargs = {"momentum": config.momentum} if config.optimizer == "sgd" else {}
        optimizer = OPTIMIZERS[config.optimizer](param_groups(module, config), **kwargs)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda) if lr_lambda else None
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module.to(ctx.device),
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(config, micro_batch),
            dist_init_required=False,
        )

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    def __call__(self, x: Tensor) -> Tensor:
        return self.engine(x)

    def backward(self, loss_share: Tensor) -> None:
        # loss_share sums over ranks to the global loss; DeepSpeed averages gradients over ranks.
        self.engine.backward(loss_share * self.ctx.world_size)

    def step(self) -> None:
        self.engine.step()

    def full_gradients(self) -> dict[str, Tensor]:
        """Each parameter's reduced (rank-independent) fp32 gradient, between backward and step."""
        grads = {}
        for name, param in self.engine.module.named_parameters():
            grad = safe_get_full_grad(param)
            if grad is not None:
                grads[name] = grad.detach().float().cpu().clone()
        return grads

    def learning_rates(self) -> dict[str, float]:
        return {group.get("name", str(i)): group["lr"] for i, group in enumerate(self.optimizer.param_groups)}
