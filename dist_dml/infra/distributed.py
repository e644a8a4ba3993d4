"""The one module that knows about ranks: environment to context, process group, collectives.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT; srun
with one task per process sets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID / SLURM_NTASKS_PER_NODE
and the job's node list. torchrun's variables win where both exist (torchrun started by srun).
Everything else in dist_dml is handed a :class:`DistContext` and never reads these variables.

Gradient contract. Every rank holds the same global batch, gathered in rank order with the
autograd-aware all-gather, whose backward is a reduce-scatter *sum*: each rank's local embeddings
receive the gradient of the sum of all ranks' losses. Each rank's loss is its share of the global
loss (its anchors' terms over the global non-zero count), so the sum over ranks is the
single-process loss, and the gradients summed over ranks are the single-process gradients.
DeepSpeed *averages* gradients over ranks, so the engine back-propagates ``world_size * loss``
(see :func:`dist_dml.train.engine.TrainEngine.backward`). tests/test_equivalence.py checks this for the
model and for every beta part.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import re
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from dist_dml.infra.errors import UserError
from dist_dml.infra.patches import forget_deepspeed_groups

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str = "gloo"
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def node_rank(self) -> int:
        return self.rank // max(self.local_world_size, 1)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, device: str = "auto") -> "DistContext":
        """Read torchrun's or SLURM's variables (or none: one process). ``device``: auto, cpu or cuda."""
        env = os.environ if env is None else env
        if "RANK" in env and "WORLD_SIZE" in env:
            rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
            local_rank = int(env.get("LOCAL_RANK", rank))
            local_world = int(env.get("LOCAL_WORLD_SIZE", world))
            addr = env.get("MASTER_ADDR", "127.0.0.1")
            port = int(env.get("MASTER_PORT", 29500))
        elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
            rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
            local_rank = int(env.get("SLURM_LOCALID", 0))
            local_world = _slurm_tasks_per_node(env)
            addr = env.get("MASTER_ADDR") or _first_slurm_host(env)
            port = int(env.get("MASTER_PORT") or 20000 + int(env.get("SLURM_JOB_ID", 0)) % 20000)
        else:
            rank, world, local_rank, local_world = 0, 1, 0, 1
            addr, port = "127.0.0.1", int(env.get("MASTER_PORT", 0)) or free_port()
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside world size {world} (check RANK / WORLD_SIZE or SLURM_PROCID / SLURM_NTASKS)")
        use_cuda = _want_cuda(device, env)
        dev = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1)) if use_cuda else torch.device("cpu")
        return cls(rank, world, local_rank, local_world, dev, "nccl" if use_cuda else "gloo", addr, port)

    def export_env(self) -> None:
        """Make the context visible to libraries that read the environment (DeepSpeed, DataLoader workers)."""
        os.environ.update(
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK=str(self.local_rank),
            LOCAL_WORLD_SIZE=str(self.local_world_size),
            MASTER_ADDR=self.master_addr,
            MASTER_PORT=str(self.master_port),
        )

    def init_process_group(self, timeout_minutes: float = 30.0) -> None:
        """Start the process group (also for one process: DeepSpeed needs one)."""
        if dist.is_initialized():
            return
        self.export_env()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if self.world_size == 1:
            store = dist.HashStore()
            dist.init_process_group(self.backend, store=store, rank=0, world_size=1, timeout=timeout)
        else:
            url = f"tcp://{self.master_addr}:{self.master_port}?rank={self.rank}&world_size={self.world_size}"
            store, _, _ = next(dist.rendezvous(url, timeout=timeout))
            # torchrun keeps its store across restarts: keys of a failed attempt (a dead rank's
            # address) must not be read by the next one.
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            store = dist.PrefixStore(f"dist_dml/attempt{attempt}", store)
            dist.init_process_group(self.backend, store=store, rank=self.rank, world_size=self.world_size,
                                    timeout=timeout)

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
        forget_deepspeed_groups()  # DeepSpeed's cached copies of the group, dead now

    # Collectives. With one process they are identities; a context of several ranks needs its process group.

    def _active(self) -> bool:
        if self.world_size == 1:
            return False
        if not dist.is_initialized():
            raise RuntimeError(f"rank {self.rank} of {self.world_size} has no process group: a collective here would "
                               "return this rank's own value as every rank's; enter "
                               "dist_dml.infra.distributed.process_group(ctx) first")
        if dist.get_world_size() != self.world_size:
            raise RuntimeError(f"this context has {self.world_size} ranks, but the process group "
                               f"{dist.get_world_size()}")
        return True

    def decide(self, decision: Callable[[], T], refusals: tuple[type[BaseException], ...] = (UserError,)) -> T:
        """Rank 0 takes a decision that every rank must take alike (which checkpoint, whether the folder may be
        used, the tracking run) and every rank gets it: ``decision()``'s value on every rank, or the refusal it
        raised (one of ``refusals``) raised on every rank alike. Any other exception of rank 0 is raised there
        and reaches the others as a refusal naming it, so no rank waits for a decision that never comes.
        Call on every rank; ``decision`` runs on rank 0 only (its value: small and picklable)."""
        outcome = None
        if self.is_main:
            try:
                outcome = (decision(), None)
            except refusals as exc:
                outcome = (None, exc)
            except Exception as exc:  # noqa: BLE001 -- raised here, and told to the other ranks
                if self._active():
                    self.broadcast_object((None, UserError(f"rank 0 failed while deciding: {type(exc).__name__}: "
                                                           f"{exc}")))
                raise
        value, refused = self.broadcast_object(outcome)
        if refused is not None:
            raise refused
        return value

    def all_gather_with_grad(self, local: Tensor) -> Tensor:
        """Every rank gets all ranks' ``local`` (equal shapes) concatenated in rank order along dim 0;
        autograd-aware: the backward sums every rank's gradient into the owner's ``local``."""
        if not self._active():
            return local
        return _all_gather_autograd(local.contiguous())

    def all_gather_no_grad(self, local: Tensor) -> Tensor:
        """As :meth:`all_gather_with_grad`, without gradient (labels, ids)."""
        if not self._active():
            return local
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts)

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        return self.all_reduce(tensor, "sum")

    def all_reduce(self, tensor: Tensor, op: str = "sum") -> Tensor:
        """sum, min or max over ranks (no gradient)."""
        if not self._active():
            return tensor
        out = tensor.detach().clone()
        dist.all_reduce(out, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
        return out

    def all_gather_uneven(self, local: Tensor) -> Tensor:
        """Every rank gets all ranks' ``local`` concatenated in rank order along dim 0; lengths may differ
        (no gradient)."""
        if not self._active():
            return local
        sizes = self.all_gather_no_grad(torch.tensor([local.shape[0]], device=local.device))
        longest = int(sizes.max())
        padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=local.device)
        padded[: local.shape[0]] = local
        parts = self.all_gather_no_grad(padded).split(longest)
        return torch.cat([part[: int(n)] for part, n in zip(parts, sizes)])

    def broadcast_(self, tensor: Tensor, src: int = 0) -> Tensor:
        """Rank ``src``'s ``tensor`` copied into ``tensor`` on every rank (in place)."""
        if self._active():
            dist.broadcast(tensor, src=src)
        return tensor

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank (small, picklable values between our own processes)."""
        if not self._active():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank (small, picklable values between our own
        processes)."""
        if not self._active():
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self._active():
            dist.barrier()


@contextlib.contextmanager
def process_group(ctx: DistContext, timeout_minutes: float = 30.0) -> Iterator[DistContext]:
    """The one owner of a process's process group: ``ctx``'s group (DistContext.from_env) opened with
    ``timeout_minutes`` for every collective, and closed on the way out however the block ends. Everything
    inside receives the live context and never starts, stops or re-reads the world."""
    ctx.init_process_group(timeout_minutes=timeout_minutes)
    try:
        yield ctx
    finally:
        ctx.shutdown()


def die_with_launcher(env: Mapping[str, str] | None = None, every_s: float = 1.0) -> bool:
    """In a rank that torchrun's agent started (TORCHELASTIC_RUN_ID in its environment): a watchdog thread that
    ends this process, and so the DataLoader workers that die with it, once the agent is gone (``kill -9`` of the
    launcher left its ranks training to the end, holding the output folder's lock). It compares the parent's pid
    with the one at start every ``every_s`` seconds: a parent-death signal would fire when the agent's thread that
    started the rank ends, not the agent. Whether it started one."""
    env = os.environ if env is None else env
    if "TORCHELASTIC_RUN_ID" not in env:
        return False
    import signal
    import sys
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        print(f"[launch] rank {env_rank(env)}: its launcher (pid {parent}) is gone: stopping", file=sys.stderr,
              flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="dist-dml-launcher-watch", daemon=True).start()
    return True


def env_rank(env: Mapping[str, str] | None = None) -> int:
    """This process's rank per torchrun's or SLURM's environment (0 outside them), without a process group:
    for a message printed before or after one exists."""
    env = os.environ if env is None else env
    return int(env.get("RANK") or env.get("SLURM_PROCID") or 0)


def _all_gather_autograd(tensor: Tensor) -> Tensor:
    # torch.distributed.nn.functional.all_gather is deprecated; the functional collective's
    # backward is a reduce-scatter sum (the contract of this module's docstring).
    from torch.distributed import _functional_collectives as fc

    gather = getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd
    out = gather(tensor, gather_dim=0, group=dist.group.WORLD)
    return fc.wait_tensor(out) if isinstance(out, fc.AsyncCollectiveTensor) else out


def _want_cuda(device: str, env: Mapping[str, str]) -> bool:
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "cpu" or env.get("DS_ACCELERATOR") == "cpu":
        return False
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but no CUDA device is visible")
    return torch.cuda.is_available()


def _slurm_tasks_per_node(env: Mapping[str, str]) -> int:
    # SLURM_NTASKS_PER_NODE is set only with --ntasks-per-node; SLURM_STEP_TASKS_PER_NODE looks like "4(x2)".
    for key in ("SLURM_NTASKS_PER_NODE", "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if env.get(key):
            return int(env[key].split("(")[0].split(",")[0])
    return 1


def _first_slurm_host(env: Mapping[str, str]) -> str:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        # "node[03-06,9],gpu1" -> "node03": the prefix and the first number of its range.
        match = re.match(r"([^,\[]+)(?:\[([^\],-]+))?", nodelist)
        return match.group(1) + (match.group(2) or "") if match else "127.0.0.1"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a rendezvous started right after), chosen below the kernel's range of
    ephemeral ports where it can: a port the kernel handed out could be handed again, to one of the many outgoing
    connections gloo opens, before the rendezvous binds it (EADDRINUSE under a busy machine's other trainings)."""
    import random

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    # The system's randomness, not the module's generator: a process that seeded it (a test, a benchmark) would draw
    # the same ports as another that did.
    candidates = random.SystemRandom().sample(range(20000, low), min(50, max(low - 20000, 0)))
    for port in [*candidates, 0]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise OSError("no free TCP port on 127.0.0.1")
