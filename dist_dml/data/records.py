"""Records of class-grouped shards: {label, image_ids, images, shard, class, items}, read as a ReadPolicy says
(with retries from a remote shard's last record on, checked against the split's ranges); damage is logged,
counted by a FaultCounter and skipped (dist_dml.data.faults), never fatal."""
from __future__ import annotations

import logging
import time
from typing import Iterator

from dist_dml.data.faults import FaultCounter, ReadPolicy
from dist_dml.data.format import IMAGE_EXTENSIONS
from dist_dml.data.opener import is_local
from dist_dml.data.plan import Segment
from dist_dml.data.tar import ShardError, _key_suffix, _samples, tar_members
from dist_dml.data.verify import ChecksumError
from dist_dml.infra.errors import one_line
from dist_dml.infra.files import parse_json

log = logging.getLogger("dist_dml.data")


def read_records(shards: list[str], policy: ReadPolicy | None = None,
                 faults: FaultCounter | None = None) -> Iterator[dict]:
    """Valid records of ``shards`` in order: {label, image_ids, images: [(ext, bytes)], shard, class, items}.

    A damaged shard is logged, counted and skipped from the damage on (its last, incomplete record
    included); unknown members are counted and never read.
    """
    policy, faults = policy or ReadPolicy(), faults if faults is not None else FaultCounter()
    for shard in shards:
        yield from shard_records(shard, policy, faults)


def shard_records(shard: str, policy: ReadPolicy, faults: FaultCounter, skip: int = 0) -> Iterator[dict]:
    """The valid records of one shard after its first ``skip`` records, which are passed over without
    reading their members (only their tar headers). Each record carries its ``index`` in the shard (its
    KEY's ordinal: malformed or skipped records count too).

    A remote shard (a URL or command) whose read fails is opened again after a back-off (policy.retries
    times, doubling policy.backoff_s), from the record after the last one read; then, like a local shard
    that is damaged, it is logged, counted corrupt and left. With policy.checksums, a shard is first
    read whole against its sha256, unless policy.verdicts holds its verdict already (verify_shards, run once
    for the job before the loaders fork their workers, or an earlier read here)."""
    attempt, start = 0, skip
    while True:
        counter = _KeyCounter(start, faults)
        try:
            if policy.checksums is not None and shard in policy.checksums:
                policy.verdicts.check(shard, policy.checksums[shard], policy.cache)
            will_retry = not is_local(shard) and attempt < policy.retries  # a cut read goes on from its last record
            members = tar_members(shard, counter.keep, policy.max_member_bytes, policy.cache)
            for key, sample in _samples(members, last_on_damage=not will_retry):
                index = counter.ordinals.pop(key, None)
                if index is not None:
                    start = index + 1
                record = _parse_record(sample, shard) if index is not None else None
                if record is None:
                    faults.fault("bad_records", f"{shard}#{key}", "skipping malformed record %s in shard %s", key,
                                 shard)
                    continue
                record["index"] = index
                problem = policy.range_problem(record)
                if problem:
                    faults.fault("bad_labels", f"{shard}#{key}", "skipping record %s in shard %s: %s", key, shard,
                                 problem)
                    continue
                yield record
            return
        except (ShardError, OSError, ValueError, UnicodeDecodeError) as exc:
            if is_local(shard) or attempt >= policy.retries or isinstance(exc, ChecksumError):
                faults.corrupt(shard, exc)
                if policy.cache is not None and not is_local(shard):
                    policy.cache.forget(shard)  # a damaged copy is fetched anew next time
                return
            attempt += 1
            delay = policy.backoff_s * 2 ** (attempt - 1)
            log.warning("reading shard %s failed (%s); retry %d of %d from record %d in %.0f s", shard,
                        one_line(exc, 200), attempt, policy.retries, start, delay)
            time.sleep(delay)


class _KeyCounter:
    """A tar_members ``keep`` that numbers the records (runs of members with one KEY, as _samples groups
    them) and passes over every member of the first ``skip``; the rest are kept as ``faults.keep`` says."""

    def __init__(self, skip: int, faults: FaultCounter):
        self.skip, self.faults = skip, faults
        self.key, self.count = None, 0
        self.ordinals: dict[str, int] = {}  # KEY -> its ordinal, until its sample is read

    def keep(self, name: str) -> bool:
        key = _key_suffix(name)[0]
        if key != self.key:
            self.key, self.count = key, self.count + 1
            if self.count > self.skip:
                while len(self.ordinals) > 64:  # the oldest: keys none of whose members were kept, never read
                    self.ordinals.pop(next(iter(self.ordinals)))
                self.ordinals[key] = self.count - 1
        return self.count > self.skip and self.faults.keep(name)


def read_segments(segments: list[Segment], policy: ReadPolicy | None = None,
                  faults: FaultCounter | None = None) -> Iterator[dict]:
    """The records of each (shard, skip, take) in turn: those whose index in the shard lies in
    [skip, skip + take), a contiguous part of it (a malformed record in it is not made up for from beyond)."""
    policy, faults = policy or ReadPolicy(), faults if faults is not None else FaultCounter()
    for shard, skip, take in segments:
        records = shard_records(shard, policy, faults, skip)
        try:
            for record in records:
                if record["index"] >= skip + take:
                    break
                yield record
        finally:
            records.close()


def _parse_record(sample: dict, shard: str) -> dict | None:
    try:
        meta = parse_json(sample["json"])
        label, ids = int(meta["label"]), [int(i) for i in meta["image_ids"]]
    except (KeyError, ValueError, TypeError):
        return None
    images = []
    for i in range(len(ids)):
        found = [(ext, sample[f"{i}.{ext}"]) for ext in IMAGE_EXTENSIONS if f"{i}.{ext}" in sample]
        if len(found) != 1:
            return None
        images.append(found[0])
    if not images:
        return None
    items = meta.get("items") if isinstance(meta.get("items"), list) and len(meta["items"]) == len(ids) else None
    return {"label": label, "image_ids": ids, "images": images, "shard": shard, "class": str(meta.get("class", label)),
            "items": [str(i) for i in items] if items else [f"{shard}#{i}" for i in ids]}
