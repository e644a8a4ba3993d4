"""What every stream of a split shares: the read policy its workers read with, the cache of remote shards, the
job-wide sha256 check before any worker forks, and the DataLoader whose workers die with their process."""
from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys

from torch.utils.data import DataLoader, IterableDataset

from dist_dml.data.config import DataConfig
from dist_dml.data.faults import ReadPolicy
from dist_dml.data.images import import_decoders
from dist_dml.data.opener import ShardCache, is_local
from dist_dml.data.snapshots import PREFETCH
from dist_dml.data.verify import Verdicts, verify_shards


def read_policy(cfg: DataConfig, checksums: dict[str, str] | None, classes: int | None = None,
                images: int | None = None, verdicts: Verdicts | None = None) -> ReadPolicy:
    """How a split's shards are read: the config's member limit and retries, the split's ranges, (data.verify_sha256)
    its checksums and the job's verdicts on them, and (data.cache_dir) local copies of remote shards."""
    return ReadPolicy(int(cfg.max_member_mb * 2**20), classes, images, retries=cfg.read_retries,
                      backoff_s=cfg.retry_backoff_s, checksums=checksums, cache=shard_cache(cfg),
                      verdicts=verdicts if verdicts is not None else Verdicts())


def shard_cache(cfg: DataConfig) -> ShardCache | None:
    """data.cache_dir's cache of remote shards (None for a local root or without one)."""
    if not cfg.cache_dir or is_local(str(cfg.root)):
        return None
    return ShardCache(cfg.cache_dir, int(cfg.cache_gb * 2**30))


def verify(stream, ctx, what: str) -> None:
    """data.verify_sha256: the stream's shards checked once for the job, over ctx's ranks, before a loader
    forks the workers that read them (verify.verify_shards), into the stream's verdicts. Call on every rank."""
    if stream.checksums:
        verify_shards(stream.checksums, stream.sizes, ctx, what, stream.verdicts, cache=shard_cache(stream.cfg))


def loader(dataset: IterableDataset, workers: int) -> DataLoader:
    """A DataLoader over a stream that yields whole batches; its workers die with this process and start with
    the decoders imported (import_decoders)."""
    if workers and getattr(dataset, "decode_images", True):
        import_decoders()
    return DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=False,
                      prefetch_factor=PREFETCH if workers else None,
                      worker_init_fn=functools.partial(_die_with_parent, os.getpid()) if workers else None)


def _die_with_parent(parent: int, worker_id: int) -> None:
    """A DataLoader worker_init_fn. torch's worker watchdog compares getppid() with the parent pid the
    worker saw when it started, so a rank SIGKILLed (OOM killer, a failing node, the kill/resume
    test) while a worker starts leaves that worker alive for good, holding the launcher's stdout
    and shared memory. Here the kernel kills the worker with its parent (PR_SET_PDEATHSIG), and a
    worker whose parent is already gone exits at once."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)
