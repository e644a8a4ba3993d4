"""data.verify_sha256: each shard read whole against the manifest's sha256, once for the whole job.

The verdicts live in a :class:`Verdicts` object that a job holds (the trainer for its training and
evaluation streams, a command for its own): every rank checks its share before the loaders fork their
workers, the verdicts are gathered to every rank, and a worker (forked with the stream that holds the
object) reads a shard whole again only where no verdict exists yet.
"""
from __future__ import annotations

import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

from dist_dml.data.opener import ShardCache, close_quietly, is_local, open_stream
from dist_dml.data.tar import ShardError

log = logging.getLogger("dist_dml.data")


class ChecksumError(ShardError):
    pass


class Verdicts:
    """Which shards matched the manifest's sha256 (``verified``), which did not (``failed``: never read, counted
    corrupt wherever met), and which a job-wide check has handled (``offered``: the same on every rank, which
    that check's collective relies on)."""

    def __init__(self):
        self.verified: set[str] = set()
        self.failed: dict[str, str] = {}  # shard -> why
        self.offered: set[str] = set()

    def check(self, shard: str, expected: str, cache: ShardCache | None = None) -> None:
        """The shard's verdict, reading it whole (streaming, or its local copy in ``cache``) if it has none: a
        ChecksumError where it does not match (a copy that does not is removed from the cache)."""
        if shard in self.verified:
            return
        if shard not in self.failed:
            self.failed.pop(shard, None)
            problem = _mismatch(shard, expected, cache)
            if problem is None:
                self.verified.add(shard)
                return
            self.failed[shard] = problem
        raise ChecksumError(self.failed[shard])


def _mismatch(shard: str, expected: str, cache: ShardCache | None) -> str | None:
    digest = hashlib.sha256()
    stream, _ = open_stream(shard, cache)
    try:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    finally:
        close_quietly(stream)
    if digest.hexdigest() == expected:
        return None
    if cache is not None and not is_local(shard):
        cache.forget(shard)
    return (f"its sha256 {digest.hexdigest()[:16]}… is not the manifest's {expected[:16]}… (modified or damaged "
            "since dist-dml prep wrote it)")


def verify_shards(checksums: dict[str, str], sizes: dict[str, int], ctx, what: str, verdicts: Verdicts,
                  threads: int = 4, cache: ShardCache | None = None) -> None:
    """Check the sha256 of every shard in ``checksums`` once for the whole job: each of the ctx's ranks reads
    its share (``threads`` at a time) and the verdicts are gathered into every rank's ``verdicts``, so no
    worker reads a shard whole again (left to itself, every worker process that meets a shard would). A
    shard that does not match is logged here and counted corrupt, unread, wherever it is met. A shard that
    could not be read now (the network) is left for its reader to verify, with its retries. Call on every
    rank."""
    todo = sorted(s for s in checksums if s not in verdicts.offered)
    if not todo:
        return
    verdicts.offered.update(todo)
    mine = todo[ctx.rank::ctx.world_size]
    total_mb, mine_mb = (sum(sizes.get(s, 0) for s in part) / 2**20 for part in (todo, mine))
    if ctx.is_main:
        print(f"[data] data.verify_sha256: reading the {len(todo)} {what} shards ({total_mb:,.0f} MB) whole once, "
              f"split over {ctx.world_size} rank(s), before they are read", flush=True)
    found: dict[str, str | None] = {}
    start = last = time.monotonic()
    done_mb = 0.0
    with ThreadPoolExecutor(max(1, min(threads, len(mine)))) as pool:
        futures = {pool.submit(_mismatch, shard, checksums[shard], cache): shard for shard in mine}
        for i, future in enumerate(as_completed(futures), 1):
            shard = futures[future]
            try:
                found[shard] = future.result()
            except Exception as exc:  # noqa: BLE001 -- the network, a command that fails: the reader tries again
                log.warning("could not verify shard %s now (%s): its reader will", shard, exc)
            done_mb += sizes.get(shard, 0) / 2**20
            now = time.monotonic()
            if ctx.is_main and (now - last > 10 or i == len(mine)):
                rate = done_mb / max(now - start, 1e-9)
                print(f"[data] sha256: {i}/{len(mine)} shards of rank 0 ({done_mb:,.0f}/{mine_mb:,.0f} MB, "
                      f"{rate:,.0f} MB/s, about {(mine_mb - done_mb) / max(rate, 1e-9):,.0f} s left)", flush=True)
                last = now
    failed = 0
    for part in ctx.all_gather_object(found):
        for shard, problem in part.items():
            if problem is None:
                verdicts.verified.add(shard)
                continue
            verdicts.failed[shard] = problem
            failed += 1
            if ctx.is_main:
                log.warning("shard %s does not match the manifest: %s; it will be counted corrupt and skipped",
                            shard, problem)
    if ctx.is_main:
        print(f"[data] sha256: {len(todo) - failed} of {len(todo)} {what} shards match the manifest in "
              f"{time.monotonic() - start:.0f} s" + (f"; {failed} do not and are skipped" if failed else ""), flush=True)
