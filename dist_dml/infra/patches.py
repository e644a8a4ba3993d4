"""Every place where dist-dml changes or reaches into another library's internals, in one module.

Each patch says why it is needed, what internal it relies on, and the versions it was checked on; the internals
are checked by :func:`internals_changed` (tests/test_patches.py), so that a dependency upgrade that moves one
fails a test, not a user's run. Checked on torch 2.14.1, DeepSpeed 0.19.8, MLflow 3.17 and Python 3.11's
argparse. This module imports neither DeepSpeed nor MLflow: the objects it patches are handed to it.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

CHECKED_ON = {"torch": "2.14.1", "deepspeed": "0.19.8", "mlflow": "3.17"}


# --- torch ------------------------------------------------------------------------------------------

@contextlib.contextmanager
def weights_only_torch_load(safe_globals: list) -> Iterator[None]:
    """Every ``torch.load`` in the block with ``weights_only=True`` and ``safe_globals`` allowed. Why: DeepSpeed's
    universal-checkpoint converter (ds_to_universal) and loader call ``torch.load(weights_only=False)`` with no
    way to ask otherwise, and a checkpoint copied from elsewhere must never run code. Relies on: those callers
    looking ``torch.load`` up at call time (``torch.load(...)``, not a name bound at import)."""
    real = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(safe_globals):
            return real(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = real


def extension_build_dir(name: str) -> Path:
    """Where torch's cpp_extension builds (and finds) the JIT op ``name``. Why: to say before DeepSpeed's first
    start that its CPU op is about to be built, and whether another process holds the build's lock. Relies on:
    the private ``torch.utils.cpp_extension._get_build_directory(name, verbose)``."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, verbose=False))


def torchrun_stops_restarting_on(exit_code: int, say: str) -> None:
    """torchrun's local agent, told that a worker group in which a rank exited ``exit_code`` has no restarts
    left (so it stops instead of starting the same mistake again); ``say`` is printed when it does. Why: torchrun
    restarts on any failure, and a rank of dist-dml that exits 2 met a mistake a restart would meet again.
    Relies on: ``LocalElasticAgent._monitor_workers(self, worker_group)`` returning a RunResult with
    ``is_failed()`` and ``failures`` ({rank: ProcessFailure with ``exitcode``}), and the agent's
    ``_remaining_restarts`` counter, read after each monitoring pass."""
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    monitor = LocalElasticAgent._monitor_workers
    if getattr(monitor, "dist_dml", False):
        return

    def monitor_workers(self, worker_group):
        result = monitor(self, worker_group)
        if result.is_failed() and self._remaining_restarts > 0 and \
                any(f.exitcode == exit_code for f in result.failures.values()):
            print(say, file=sys.stderr, flush=True)
            self._remaining_restarts = 0
        return result

    monitor_workers.dist_dml = True
    LocalElasticAgent._monitor_workers = monitor_workers


# --- imports ------------------------------------------------------------------------------------------

@contextlib.contextmanager
def hidden_module(name: str) -> Iterator[None]:
    """An import of ``name`` fails (ImportError) inside the block, and works again after it, where this process
    has not imported it yet. Why: DeepSpeed's autotuner, which dist-dml does not use, imports MLflow whenever it
    is installed (``try: import mlflow``): seconds of DeepSpeed's import, in every rank of every launch.
    Relies on: Python's rule that a None in ``sys.modules`` makes the import raise ImportError, and on the
    autotuner catching it."""
    if name in sys.modules:
        yield
        return
    sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if name in sys.modules and sys.modules[name] is None:
            del sys.modules[name]


# --- DeepSpeed ------------------------------------------------------------------------------------------

def use_checkpoint_engine(ds_engine, checkpoint_engine) -> None:
    """``checkpoint_engine`` as a DeepSpeed engine's, for its checkpoints' files and for the copy of its recovery
    script (zero_to_fp32.py), which rank 0 writes outside the checkpoint engine. Why: weights-only loading, and
    writes that fail (a full disk) recorded by ``checkpoint_engine.guarded`` instead of raised on one rank
    before the barrier that ends DeepSpeed's save (the others would wait forever). Relies on:
    ``DeepSpeedEngine.checkpoint_engine`` (an attribute its save and load use) and
    ``DeepSpeedEngine._copy_recovery_script(self, save_path)``."""
    ds_engine.checkpoint_engine = checkpoint_engine
    copy_script = ds_engine._copy_recovery_script
    ds_engine._copy_recovery_script = lambda path: checkpoint_engine.guarded(path, copy_script, path)


def universal_load_past_trailing_empty_groups(zero) -> None:
    """DeepSpeed 0.19's universal loading of ZeRO-1/2 state fails (IndexError in
    ``load_hp_checkpoint_state_from_checkpoint_dir``) on a rank that holds no element of a param group: the
    global beta (one number) at 2 or more processes, whose partition on every rank but the first is padding
    alone. Such groups, last in our order, are left out of that load on that rank: nothing of them is there to
    load (the padding's optimizer state starts afresh). A group empty on a rank before one it holds is refused
    (train.resume_checks.resume_problem refuses that world size before any process starts). Relies on: the ZeRO
    optimizer's ``bit16_groups`` (or ``bf16_groups``), ``optimizer.param_groups``, each parameter's
    ``_hp_mapping`` (None where the rank holds none of it) and ``_load_universal_checkpoint``."""
    lp_groups = getattr(zero, "bit16_groups", None) or getattr(zero, "bf16_groups", None)
    original = getattr(zero, "_load_universal_checkpoint", None)
    if lp_groups is None or original is None:
        return

    def load(*args, **kwargs):
        groups = zero.optimizer.param_groups
        empty = [not any(getattr(p, "_hp_mapping", None) is not None for p in group) for group in lp_groups]
        keep = len(groups)
        while keep and empty[keep - 1]:
            keep -= 1
        if any(empty[:keep]):
            raise RuntimeError(f"param group {empty.index(True)} has no element on rank {torch.distributed.get_rank()}: "
                               "a universal checkpoint cannot be loaded at this world size")
        saved = list(groups)
        groups[:] = saved[:keep]
        try:
            return original(*args, **kwargs)
        finally:
            groups[:] = saved

    zero._load_universal_checkpoint = load


DEEPSPEED_GROUPS = ("_WORLD_GROUP", "_DATA_PARALLEL_GROUP", "_MODEL_PARALLEL_GROUP", "_TENSOR_MODEL_PARALLEL_GROUP",
                    "_ZERO_PARAM_INTRA_PARALLEL_GROUP")
DEEPSPEED_GROUP_TABLES = ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                          "_EXPERT_DATA_PARALLEL_GROUP_RANKS", "_ALL_TO_ALL_GROUP")


def forget_deepspeed_groups() -> None:
    """DeepSpeed caches a clone of the world group (and the groups made from it) in module globals of
    ``deepspeed.utils.groups``; after the process group is destroyed they name a dead group, and the next engine
    in this process (a grid cell, a test, a notebook) fails in ``get_global_rank``. Forget them with the group.
    Relies on: those globals' names (DEEPSPEED_GROUPS: a group or None; DEEPSPEED_GROUP_TABLES: dicts)."""
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is None:
        return
    for name in DEEPSPEED_GROUPS:
        if hasattr(groups, name):
            setattr(groups, name, None)
    for name in DEEPSPEED_GROUP_TABLES:
        if isinstance(getattr(groups, name, None), dict):
            getattr(groups, name).clear()


# --- argparse ------------------------------------------------------------------------------------------

def subcommands_with_parents(subparsers, parents: list[argparse.ArgumentParser]) -> None:
    """Every subcommand added to ``subparsers`` from now on inherits ``parents``' options (``--debug`` after the
    subcommand's name). Why: argparse has no option common to all subcommands. Relies on:
    ``_SubParsersAction.add_parser(name, **kwargs)`` passing ``parents`` on to ArgumentParser."""
    add_parser = subparsers.add_parser
    subparsers.add_parser = lambda *args, **kwargs: add_parser(*args, parents=parents, **kwargs)


# --- the internals, checked ------------------------------------------------------------------------------

def internals_changed() -> list[str]:
    """What no longer holds of the internals the patches above rely on, on the installed versions ([] when all
    hold). Imports DeepSpeed (with MLflow hidden, as dist_dml.train.engine does)."""
    problems: list[str] = []

    def expect(ok: bool, what: str) -> None:
        if not ok:
            problems.append(what)

    def params(fn: Callable) -> list[str]:
        return list(inspect.signature(fn).parameters)

    expect("weights_only" in params(torch.load), "torch.load takes weights_only")
    from torch.utils import cpp_extension

    expect(params(getattr(cpp_extension, "_get_build_directory", lambda: None))[:2] == ["name", "verbose"],
           "torch.utils.cpp_extension._get_build_directory(name, verbose)")
    from torch.distributed.elastic.agent.server import api as agent_api
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    monitor = getattr(LocalElasticAgent._monitor_workers, "__wrapped__", LocalElasticAgent._monitor_workers)
    expect(getattr(LocalElasticAgent._monitor_workers, "dist_dml", False) or params(monitor) == ["self", "worker_group"],
           "LocalElasticAgent._monitor_workers(self, worker_group)")
    agent_source = inspect.getsource(agent_api)
    expect("self._remaining_restarts" in agent_source and "_monitor_workers(self._worker_group)" in agent_source,
           "SimpleElasticAgent reads _remaining_restarts after _monitor_workers(self._worker_group)")
    expect("is_failed" in dir(agent_api.RunResult) and "failures" in agent_api.RunResult.__dataclass_fields__,
           "torchrun's RunResult.is_failed() and .failures")

    with hidden_module("mlflow"):
        import deepspeed
        from deepspeed.autotuning import autotuner
        from deepspeed.runtime.engine import DeepSpeedEngine
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
        from deepspeed.utils import groups as ds_groups, mixed_precision_linkage
    expect(deepspeed.__version__.startswith("0.19."), f"DeepSpeed 0.19 (installed: {deepspeed.__version__})")
    expect(params(DeepSpeedEngine._copy_recovery_script) == ["self", "save_path"],
           "DeepSpeedEngine._copy_recovery_script(self, save_path)")
    expect("self.checkpoint_engine.save(" in inspect.getsource(DeepSpeedEngine),
           "DeepSpeedEngine saves through self.checkpoint_engine")
    zero_source = inspect.getsource(DeepSpeedZeroOptimizer)
    expect(hasattr(DeepSpeedZeroOptimizer, "_load_universal_checkpoint") and "self.bit16_groups" in zero_source
           and "lp_param._hp_mapping = " in inspect.getsource(mixed_precision_linkage),
           "DeepSpeedZeroOptimizer._load_universal_checkpoint, .bit16_groups and parameters' _hp_mapping")
    expect(all(hasattr(ds_groups, name) for name in DEEPSPEED_GROUPS + DEEPSPEED_GROUP_TABLES),
           "deepspeed.utils.groups' cached groups: " + ", ".join(DEEPSPEED_GROUPS + DEEPSPEED_GROUP_TABLES))
    expect("import mlflow" in inspect.getsource(autotuner), "DeepSpeed's autotuner imports mlflow (else hiding it is no longer needed)")

    expect("parents" in params(argparse.ArgumentParser) and params(argparse._SubParsersAction.add_parser)[:2] ==
           ["self", "name"], "argparse's _SubParsersAction.add_parser(name, **kwargs) passes parents on")
    return problems
