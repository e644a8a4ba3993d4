"""The class centres of a run (the `proxy` section): a run part holding this rank's shard of the centres
(dist_dml.method.proxies, ceil(C / W) rows), their own optimizer, and their own checkpoint files.

Why not DeepSpeed's: the engine averages every parameter's gradient over the ranks, which would mix one rank's shard
with the others' rows. The centres' gradient is this rank's alone and exact (proxies._ShardedCrossEntropy); the
engine's backward scales each rank's loss share by W (TrainEngine.backward), so the part divides by W before its
optimizer's step. The optimizer is the run's (optimizer.name, weight decay), at proxy.lr_factor times the embedding
head's rate at that step (its schedule, warm-up and lr_scaling included); a skipped step (a non-finite loss) moves
nothing.

A checkpoint keeps the centres by shard: every rank writes its rows (with its optimizer's state) into the checkpoint
folder as ``centres/rows_START_END.pt`` before rank 0 writes the index, so the index lists and sizes them. A resume
reads the files its rows overlap, at any world size: the shards are cut afresh.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from dist_dml.infra.distributed import DistContext
from dist_dml.infra.errors import as_write_error
from dist_dml.method.proxies import CentreLoss, ProxyConfig
from dist_dml.train.parts import RunPart

FOLDER = "centres"
_FILE = re.compile(r"rows_(\d{10})_(\d{10})\.pt")


class ClassCentres(RunPart):
    """This rank's centres, their optimizer, and the weighted loss against them (``term``, the objective's
    ``centres``). ``rate(step)``: the embedding head's learning rate at a step (TrainEngine.rate_at)."""

    def __init__(self, config: ProxyConfig, num_classes: int, dim: int, ctx: DistContext, optimizer,
                 rate: Callable[[int], float]):
        from dist_dml.train.engine import new_optimizer

        self.config, self.ctx, self.rate, self.num_classes, self.dim = config, ctx, rate, num_classes, dim
        self.loss = CentreLoss(config.loss_config(), num_classes, dim, ctx).to(ctx.device)
        self.optimizer = new_optimizer(optimizer, [self.loss.centres], lr=rate(0) * config.rate_factor(),
                                       weight_decay=optimizer.weight_decay)
        self.shares: list[float] = []  # this rank's shares of the centre loss over the log window

    @property
    def rows(self) -> tuple[int, int]:
        return self.loss.start, self.loss.end

    def term(self, embeddings: Tensor, labels: Tensor, step: int) -> Tensor:
        """This rank's share of proxy.weight x the centre loss over the global batch (all-gathered with gradient)."""
        return self.config.weight * self.loss(embeddings, labels.to(embeddings.device), step)

    __call__ = term

    def parameters(self) -> list[torch.nn.Parameter]:
        """What the loss's gradient reaches besides the engine's parameters (dist_dml.train.step's chunked path)."""
        return [self.loss.centres]

    def objective_options(self) -> dict:
        return {"centres": self}

    def after_step(self, result, batch: dict, step: int, taken: bool) -> None:
        centres = self.loss.centres
        if taken and centres.grad is not None:
            centres.grad.div_(self.ctx.world_size)  # the engine's backward took the share x W
            for group in self.optimizer.param_groups:
                group["lr"] = self.rate(step) * self.config.rate_factor()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if result is not None and result.centres is not None:
            self.shares.append(float(result.centres))

    def on_log(self, tracker, step: int) -> None:
        """The centre loss over the window (every rank: a collective), logged as proxy_loss."""
        window = torch.tensor([sum(self.shares), len(self.shares)], dtype=torch.float64, device=self.ctx.device)
        total = self.ctx.all_reduce(window, "sum")
        self.shares = []
        if self.ctx.is_main and total[1] > 0:
            tracker.log_metrics({"proxy_loss": float(total[0] / (total[1] / self.ctx.world_size))}, step)

    def state_dict(self) -> dict:
        """What rank 0's part of the checkpoint (and its index) says of the centres; their rows are in files."""
        return {"kind": self.config.kind, "num_classes": self.num_classes, "dim": self.dim,
                "world_size": self.ctx.world_size}

    def load_state_dict(self, state: dict) -> None:
        if (state.get("num_classes"), state.get("dim")) != (self.num_classes, self.dim):
            raise ValueError(f"the checkpoint holds {state.get('num_classes')} centres of {state.get('dim')} "
                             f"dimensions, this run {self.num_classes} of {self.dim} (proxy.num_classes, "
                             "model.embedding_dim)")
        if state.get("kind") != self.config.kind:
            raise ValueError(f"the checkpoint's centres were trained for proxy.kind={state.get('kind')}, this run "
                             f"is {self.config.kind}")

    def save_files(self, folder: Path) -> list[tuple[str, OSError]]:
        """Every rank: its rows and their optimizer state into ``folder``/centres (a rank with no rows writes
        nothing). Returns the writes that failed, as (path, error)."""
        start, end = self.rows
        if start == end:
            return []
        path = Path(folder) / FOLDER / f"rows_{start:010d}_{end:010d}.pt"
        state = self.optimizer.state.get(self.loss.centres, {})
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"centres": self.loss.centres.detach().cpu(),
                        "state": {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in state.items()}}, path)
        except (OSError, RuntimeError) as exc:
            return [(str(path), as_write_error(path, exc))]
        return []

    @torch.no_grad()
    def load_files(self, folder: Path) -> None:
        """This rank's rows (and their optimizer state) from the shards of ``folder``/centres, whatever world size
        wrote them. A ValueError where the files do not cover the rows."""
        start, end = self.rows
        found = sorted((int(m[1]), int(m[2]), p) for p in (Path(folder) / FOLDER).glob("rows_*.pt")
                       if (m := _FILE.fullmatch(p.name)))
        pieces, covered = [], start
        for first, last, path in found:
            if last <= covered or first >= end:
                continue
            if first > covered:
                break
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if tuple(saved["centres"].shape) != (last - first, self.dim):
                raise ValueError(f"{path} holds {tuple(saved['centres'].shape)}, not rows {first}-{last} of "
                                 f"{self.dim} dimensions")
            lo, hi = covered - first, min(end, last) - first
            pieces.append((saved["centres"][lo:hi], {k: v[lo:hi] if torch.is_tensor(v) and v.dim() else v
                                                     for k, v in saved["state"].items()}))
            covered = min(end, last)
        if covered < end:
            raise ValueError(f"{Path(folder) / FOLDER} has no centres for classes {covered}-{end} (of "
                             f"{self.num_classes}); its files: {[p.name for _, _, p in found] or 'none'}")
        if start == end:
            return
        centres = self.loss.centres
        centres.copy_(torch.cat([rows for rows, _ in pieces]).to(centres.device, centres.dtype))
        states = [state for _, state in pieces]
        if not states[0]:
            self.optimizer.state.pop(centres, None)
            return
        self.optimizer.state[centres] = {
            key: (torch.cat([s[key] for s in states]).to(centres.device) if torch.is_tensor(value) and value.dim()
                  else value) for key, value in states[0].items()}


def centres_part(cfg, stream, ctx, engine) -> ClassCentres:
    """The run's centres (proxy.kind not none): one per class of the training split (or proxy.num_classes), in the
    embedding's dimension, learning at proxy.lr_factor x the head's rate."""
    classes = cfg.proxy.num_classes or stream.num_classes
    return ClassCentres(cfg.proxy, classes, cfg.model.embedding_dim, ctx, cfg.optimizer,
                        lambda step: engine.rate_at("head", step))
