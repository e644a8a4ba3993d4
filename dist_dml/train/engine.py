"""The one module that imports DeepSpeed: engine, parameter groups, precision, ZeRO 0-2. The process
must be prepared for it first (dist_dml.infra.accelerator.configure) and its process group live
(dist_dml.infra.distributed.process_group).

Parameter groups: the backbone, the embedding head, and beta (the loss's parameters), each with its
own learning rate; beta never gets weight decay. The learning-rate schedule is a torch LambdaLR
multiplier, so each group keeps its own rate (DeepSpeed's WarmupLR with a scalar warmup_max_lr
would overwrite every group's rate, beta's included).
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from dist_dml.infra import patches
from dist_dml.infra.accelerator import deepspeed_import, on_cpu
from dist_dml.infra.distributed import DistContext
from dist_dml.config.optimizer import DeepSpeedConfig, OptimizerConfig
from dist_dml.infra.errors import as_write_error

with deepspeed_import():  # without MLflow, which DeepSpeed's autotuner would import on every rank
    import deepspeed
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad, safe_set_full_fp32_param
    from deepspeed.utils.tensor_fragment import fragment_address



OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
}


COMM_OP_BUILD = "about a minute, a few minutes on a busy machine"
_QUIET = []  # set once quiet_deepspeed has run in this process


def quiet_deepspeed() -> None:
    """Keep out of the log what says nothing to act on (once per process, when an engine is built)."""
    if _QUIET:
        return
    _QUIET.append(True)
    # DeepSpeed's ZeRO calls torch's all_gather_into_tensor, deprecated in torch 2.14: one FutureWarning per
    # rank and run that the user can do nothing about.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)
    # Our optimizer is torch's own with the lazy beta rows (lazy_rows): DeepSpeed calls every client
    # optimizer under ZeRO "untested" at every start.
    deepspeed.utils.logger.addFilter(lambda record: "untested optimizer" not in record.getMessage())
    # Loading a universal checkpoint without tensor parallelism (ours): "setting tp size to 1", once per rank.
    deepspeed.utils.logger.addFilter(lambda record: "MPU is not provided" not in record.getMessage())


def prepare_comm_op(announce: bool = True) -> None:
    """Build DeepSpeed's CPU shared-memory communication op now if this environment lacks it, saying so
    first (DeepSpeed would build it silently inside the first training's start-up). CPU only; the
    build lands in TORCH_EXTENSIONS_DIR. Processes that find another one building it wait, and say so."""
    if not on_cpu():
        return
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return
    folder = patches.extension_build_dir(builder.NAME)
    busy = _locked(folder / "lock")
    if (folder / f"{builder.NAME}.so").is_file() and not busy:
        return
    if announce:
        busy = " (another process is building it: waiting for it)" if busy else ""
        print(f"[dist-dml] building DeepSpeed's CPU communication op into {folder}{busy}: once per environment, "
              f"{COMM_OP_BUILD}", flush=True)
    start = time.time()
    builder.load(verbose=False)
    if announce:
        print(f"[dist-dml] DeepSpeed's CPU communication op is ready ({time.time() - start:.0f}s)", flush=True)


@contextlib.contextmanager
def _without_lines(text: str):
    """Python-level stdout of the block, less the lines that contain ``text``."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        kept = [line for line in buffer.getvalue().splitlines(keepends=True) if text not in line]
        sys.stdout.write("".join(kept))
        sys.stdout.flush()


def _locked(path: Path) -> bool:
    """Whether another process holds torch's build lock (an advisory lock on a file that stays)."""
    import fcntl

    try:
        with open(path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(f, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, loading with ``weights_only=True``.

    DeepSpeed's own engine unpickles freely; ZeRO checkpoints hold exactly three DeepSpeed
    classes besides tensors and containers, and only those are allowed.
    """

    SAFE_GLOBALS = [fragment_address, LossScaler, ZeroStageEnum]

    def __init__(self, config_params=None):
        super().__init__(config_params)
        self.failures: list[tuple[str, OSError]] = []  # writes that failed since the last save() began

    def save(self, state_dict, path: str):
        """A write that fails (a full disk) is recorded, not raised: DeepSpeed's save_checkpoint ends in a
        barrier that the other ranks would wait in forever. The caller checks ``failures`` on every rank."""
        self.guarded(path, super().save, state_dict, path)

    def makedirs(self, path, exist_ok=False):
        self.guarded(path, super().makedirs, path, exist_ok=exist_ok)

    def guarded(self, path: str, write, *args, **kwargs) -> None:
        """``write(*args, **kwargs)``; a failure is recorded as an OSError (torch.save reports a full disk as
        a RuntimeError, "basic_ios::clear: iostream error")."""
        try:
            write(*args, **kwargs)
        except (OSError, RuntimeError) as exc:
            self.failures.append((str(path), as_write_error(path, exc)))

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(self.SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)


def weights_only_loads():
    """Every torch.load in the block with ``weights_only=True`` (and the three DeepSpeed classes ZeRO
    checkpoints hold). DeepSpeed's universal-checkpoint converter and loader unpickle freely; a checkpoint
    copied from elsewhere must never run code."""
    return patches.weights_only_torch_load(WeightsOnlyCheckpointEngine.SAFE_GLOBALS)


def to_universal(source: Path, dest: Path) -> None:
    """Convert a ZeRO-1/2 checkpoint folder into DeepSpeed's universal checkpoint at ``dest``: per
    parameter, its fp32 master and optimizer moments, whole, which a run at any world size partitions
    afresh on loading (TrainEngine(universal=True)). Written to ``dest``.tmp, renamed when complete."""
    import argparse
    import shutil

    from deepspeed.checkpoint import ds_to_universal

    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(source), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    with weights_only_loads(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ds_to_universal.main(args)  # its own model-agnostic state (injected) is all our checkpoints lack
    os.replace(tmp, dest)


def lazy_rows(optimizer_class: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """``optimizer_class`` with one change: in param groups marked ``lazy``, an element whose gradient
    is exactly zero in a step keeps its value and its optimizer state (momentum, second moment) in
    that step. For the beta tables: a per-class or per-image row that no anchor of the global batch
    used gets a zero gradient, and would otherwise still move on stale momentum under Adam. Works
    element-wise, so it holds for DeepSpeed's flat ZeRO partitions of the group as for the tables."""

    class LazyRows(optimizer_class):
        @torch.no_grad()
        def step(self, closure=None):
            kept = []
            for group in self.param_groups:
                if not group.get("lazy"):
                    continue
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    idle = p.grad == 0
                    if not bool(idle.any()):
                        continue
                    state = {k: v.clone() for k, v in self.state.get(p, {}).items()
                             if torch.is_tensor(v) and v.shape == p.shape}
                    kept.append((p, idle, p.detach().clone(), state))
            loss = super().step(closure)
            for p, idle, value, state in kept:
                p.copy_(torch.where(idle, value, p))
                for key, old in state.items():
                    self.state[p][key].copy_(torch.where(idle, old, self.state[p][key]))
            return loss

    LazyRows.__name__ = LazyRows.__qualname__ = f"LazyRows{optimizer_class.__name__}"
    return LazyRows


def new_optimizer(config: OptimizerConfig, params, lazy: bool = False, **defaults) -> torch.optim.Optimizer:
    """torch's optimizer named by optimizer.name (SGD with optimizer.momentum) over ``params`` (tensors or param
    groups), with ``defaults`` (lr, weight_decay); ``lazy``: groups marked lazy keep rows without gradient
    (lazy_rows)."""
    kwargs = {"momentum": config.momentum} if config.name == "sgd" else {}
    optimizer_class = lazy_rows(OPTIMIZERS[config.name]) if lazy else OPTIMIZERS[config.name]
    return optimizer_class(params, **kwargs, **defaults)


def build_optimizer(module: nn.Module, config: OptimizerConfig) -> torch.optim.Optimizer:
    """The torch optimizer of a TrainModule: its param groups, beta's lazy (rows unused in a step stay)."""
    return new_optimizer(config, param_groups(module, config), lazy=True)


def param_groups(module: nn.Module, config: OptimizerConfig) -> list[dict]:
    """backbone / head / beta groups of a TrainModule: `loss.*` is beta (lazy: see lazy_rows), `model.head.*` the
    head. With optimizer.layer_decay below 1 the backbone is one group per layer, "backbone.N" (N from 0 at the
    input, models.backbones.layer_ids), at lr x layer_decay^(layers - N): the layer nearest the head learns at
    lr x layer_decay, the head at its own rate."""
    from dist_dml.models.backbones import layer_ids

    model = getattr(module, "model", None)
    spec = getattr(model, "backbone_spec", None)
    layers = layer_ids(spec, model.backbone) if spec is not None and config.layer_decay < 1 else None
    count = max(layers.values()) + 1 if layers else 0
    groups: dict[str, list[nn.Parameter]] = {"backbone": [], "head": [], "beta": []}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("loss."):
            groups["beta"].append(param)
        elif name.startswith("model.head."):
            groups["head"].append(param)
        elif layers is not None and name.startswith("model.backbone."):
            groups.setdefault(f"backbone.{layers[name[len('model.backbone.'):]]:03d}", []).append(param)
        else:
            groups["backbone"].append(param)
    backbone = dict(lr=config.lr, weight_decay=config.weight_decay)
    settings = {"backbone": backbone, "head": dict(lr=config.head_lr or config.lr, weight_decay=config.weight_decay),
                "beta": dict(lr=config.beta_lr, weight_decay=0.0, lazy=True)}
    for name in groups:
        if name.startswith("backbone."):
            settings[name] = dict(backbone, lr=config.lr * config.layer_decay ** (count - int(name.split(".")[1])))
    order = ["backbone", *sorted(n for n in groups if n.startswith("backbone.")), "head", "beta"]
    return [dict(params=groups[name], name=name, **settings[name]) for name in order if groups[name]]


def deepspeed_config(config: DeepSpeedConfig, micro_batch: int, universal: bool = False,
                     accumulation: int = 1) -> dict:
    return {
        "checkpoint": {"load_universal": universal},
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "steps_per_print": 1 << 30,
        "zero_optimization": {"stage": config.zero_stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": config.gradient_clipping,
        "bf16": {"enabled": config.precision == "bf16"},
        "fp16": {"enabled": config.precision == "fp16", "initial_scale_power": 16},
    }


class TrainEngine:
    """DeepSpeed around a TrainModule (model + loss): forward, backward with the gradient contract, step."""

    def __init__(
        self,
        module: nn.Module,
        ctx: DistContext,
        optimizer: OptimizerConfig,
        config: DeepSpeedConfig,
        micro_batch: int,
        lr_lambda: Callable[[int], float] | None = None,
        universal: bool = False,
        accumulation: int = 1,
    ):
        """``lr_lambda``: the learning-rate multiplier at a step, or an object whose ``for_group(name)`` gives each
        param group's. ``universal``: the checkpoint this engine will load is a universal one (see to_universal).
        ``accumulation``: DeepSpeed's gradient-accumulation steps per optimizer step (train.embedding_chunks);
        ``micro_batch`` is then the size of one of them."""
        optimizer.validate()
        config.validate()
        self.ctx = ctx
        if not torch.distributed.is_initialized():
            raise RuntimeError("TrainEngine needs a live process group: enter distributed.process_group first")
        quiet_deepspeed()
        prepare_comm_op(announce=ctx.local_rank == 0)
        # DeepSpeed's comm layer over the live group (not a group of its own), less its line per rank on
        # loading its CPU op.
        with _without_lines("built successfully"):
            deepspeed.init_distributed(dist_backend=ctx.backend, auto_mpi_discovery=False, verbose=False)
        # beta's exact values: under bf16/fp16 DeepSpeed casts the module before it makes the fp32 masters, which then
        # start rounded (bf16 holds beta_init 1.2 as 1.203125: every margin term's boundary 0.26% off).
        loss = getattr(module, "loss", None)
        exact_beta = {} if loss is None else {name: p.detach().float().clone() for name, p in loss.named_parameters()}
        torch_optimizer = build_optimizer(module, optimizer)
        # Each param group's elements, in the optimizer's order: what ZeRO partitions over the ranks (a checkpoint's
        # index keeps them, for the launch check of a resume at another world size).
        self.group_sizes = {group["name"]: sum(p.numel() for p in group["params"])
                            for group in torch_optimizer.param_groups}
        if hasattr(lr_lambda, "for_group"):  # a multiplier per param group, by its name
            lr_lambda = [lr_lambda.for_group(group["name"]) for group in torch_optimizer.param_groups]
        multipliers = lr_lambda if isinstance(lr_lambda, list) else [lr_lambda] * len(torch_optimizer.param_groups)
        self._rates = {group["name"]: (group["lr"], fn) for group, fn in zip(torch_optimizer.param_groups, multipliers)}
        scheduler = torch.optim.lr_scheduler.LambdaLR(torch_optimizer, lr_lambda) if lr_lambda else None
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module.to(ctx.device),
            optimizer=torch_optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(config, micro_batch, universal, accumulation),
            dist_init_required=False,
        )
        patches.use_checkpoint_engine(self.engine, WeightsOnlyCheckpointEngine(self.engine._config))
        self.low_precision = config.precision != "fp32"
        self.universal = universal
        if universal:
            patches.universal_load_past_trailing_empty_groups(self.engine.optimizer)
        if self.low_precision:  # the masters start at beta's exact initial values (a checkpoint loaded later wins)
            for name, param in self.engine.module.loss.named_parameters() if exact_beta else ():
                safe_set_full_fp32_param(param, exact_beta[name].to(param.device))
        self._share_beta_masters()

    def _share_beta_masters(self) -> None:
        """Under bf16/fp16: the optimizer's fp32 masters of beta to the loss, which computes with them
        (every rank: assembling a ZeRO-partitioned master is a collective)."""
        beta = getattr(getattr(self.engine.module, "loss", None), "beta", None)
        if not self.low_precision or beta is None:
            return
        masters = {}
        for name, param in beta.named_parameters():
            full = safe_get_full_fp32_param(param)
            if full is not None:
                masters[name] = full.detach().float().reshape(param.shape)
        beta.use_masters(masters)

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    def __call__(self, x: Tensor) -> Tensor:
        return self.engine(x)

    def backward(self, loss_share: Tensor, accumulate: bool = False) -> None:
        """``accumulate``: one of the gradient-accumulation passes of a step whose parts each carry their own
        full share (dist_dml.train.step's chunks): DeepSpeed must not divide it by the accumulation steps."""
        # loss_share sums over ranks to the global loss; DeepSpeed averages gradients over ranks.
        self.engine.backward(loss_share * self.ctx.world_size, scale_wrt_gas=not accumulate)

    def step(self) -> None:
        """DeepSpeed's step: the optimizer's at an accumulation boundary (every call without accumulation)."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        if boundary:
            self._share_beta_masters()

    def skip_step(self) -> None:
        """A step skipped on every rank (a non-finite loss): no update, but the learning-rate schedule moves on
        with the trainer's step, as DeepSpeed's step would have moved it: the rate at step s is the schedule's
        at s however many steps before it were skipped, and a run of train.steps ends where its schedule does."""
        if self.scheduler is not None:
            with warnings.catch_warnings():  # torch's "scheduler.step() before optimizer.step()": meant, here
                warnings.simplefilter("ignore", UserWarning)
                self.scheduler.step()

    def full_gradients(self) -> dict[str, Tensor]:
        """Each parameter's reduced (rank-independent) fp32 gradient, between backward and step."""
        grads = {}
        for name, param in self.engine.module.named_parameters():
            grad = safe_get_full_grad(param)
            if grad is not None:
                grads[name] = grad.detach().float().cpu().clone()
        return grads

    def rate_at(self, group: str, step: int) -> float:
        """The learning rate of param group ``group`` (its name) at trainer step ``step``: its base rate times its
        schedule's multiplier there, what the engine's optimizer steps with at that step."""
        base, multiplier = self._rates[group]
        return base * (multiplier(step) if multiplier is not None else 1.0)

    def learning_rates(self) -> dict[str, float]:
        return {group.get("name", str(i)): group["lr"] for i, group in enumerate(self.optimizer.param_groups)}

    def save(self, directory: Path, tag: str, client_state: dict) -> list[tuple[str, OSError]]:
        """DeepSpeed's checkpoint of model, optimizer and scheduler; call on every rank. Returns this rank's
        failed writes (path, error): every rank returns from it either way."""
        self.engine.checkpoint_engine.failures = []
        try:
            self.engine.save_checkpoint(str(directory), tag=tag, client_state=client_state, save_latest=False)
        except OSError as exc:  # outside the files (a folder that cannot be made): raised on this rank alone
            self.engine.checkpoint_engine.failures.append((str(exc.filename or directory / tag), exc))
        return list(self.engine.checkpoint_engine.failures)

    def load(self, directory: Path, tag: str) -> dict:
        """Restore a checkpoint written by :meth:`save` (a universal one if the engine was built for it);
        returns its client state."""
        with weights_only_loads() if self.universal else contextlib.nullcontext():
            path, client_state = self.engine.load_checkpoint(str(directory), tag=tag)
        if path is None:
            raise FileNotFoundError(f"{directory / tag}: no DeepSpeed checkpoint there")
        self._share_beta_masters()  # the loaded masters, not the initial ones
        return client_state or {}
