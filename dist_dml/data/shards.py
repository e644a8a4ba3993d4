"""Reading shards: the tar parser, records grouped by KEY, the faults met (counted, never fatal), and the
windows and segments of records that the training stream cuts an epoch into. Only json and image
members are read; nothing is unpickled. A truncated or corrupt shard is logged by name, skipped from
the point of damage, and counted."""
from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import time
from typing import Callable, Iterator

import numpy as np

from dist_dml.data.opener import ShardCache, close_quietly, is_local, open_stream

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
log = logging.getLogger("dist_dml.data")


FAULTS = ("corrupt_shards", "bad_records", "unknown_members", "bad_labels", "bad_images", "dropped_records",
          "single_image_records")
LOGGED_PER_KIND = 5  # faults of one kind logged one by one per worker; the rest only counted


class ReadErrors:
    """Per-worker counts of what could not be read; reported with every batch as a delta (FAULTS).

    corrupt_shards: shards skipped from a point of damage on (not a tar, NUL bytes, a truncated or
    oversized member); bad_records: records without a readable json or with images missing;
    unknown_members: members that are neither json nor an image (never read); bad_labels: records whose
    label or image ids lie outside the split's (per the manifest); bad_images: images that do not decode
    (the record keeps its others); dropped_records: records left with fewer than 2 decodable images;
    single_image_records: training records of fewer than 2 images, skipped (no positive pair) unless
    data.self_pairs trains them as two crops of one image.
    """

    def __init__(self, max_member_bytes: int = 256 << 20, classes: int | None = None, images: int | None = None,
                 retries: int = 0, backoff_s: float = 1.0, checksums: dict[str, str] | None = None,
                 cache: ShardCache | None = None):
        self.max_member_bytes = max_member_bytes  # a member declaring more makes its shard corrupt
        self.classes, self.images = classes, images  # the split's: labels and image ids must lie below
        self.retries, self.backoff_s = retries, backoff_s  # a remote shard's read is tried again this often
        self.checksums = checksums  # {shard: sha256} to verify each shard against before reading it
        self.cache = cache  # remote shards are read from local copies there (data.cache_dir)
        self.corrupt_shards: set[str] = set()
        self.bad_records = self.unknown_members = self.bad_labels = self.bad_images = self.dropped_records = 0
        self.single_image_records = 0
        self._logged_per_kind: dict[str, int] = {}
        self._reported = (0,) * len(FAULTS)
        self._logged: set[str] = set()

    def fault(self, kind: str, what: str, message: str, *args) -> None:
        """Count (``kind``, one of FAULTS) and log a fault once per ``what`` (a record or image): a window
        read again (its slot's last batch) meets the same faults without counting them twice."""
        if what not in self._logged:
            self._logged.add(what)
            self.tally(kind, message, *args)

    def tally(self, kind: str, message: str, *args) -> None:
        """Count a fault of ``kind``; log it if fewer than LOGGED_PER_KIND of its kind were logged here."""
        setattr(self, kind, getattr(self, kind) + 1)
        logged = self._logged_per_kind.get(kind, 0)
        self._logged_per_kind[kind] = logged + 1
        if logged < LOGGED_PER_KIND:
            log.warning(message, *args)
        elif logged == LOGGED_PER_KIND:
            log.warning("more %s in this worker: counted, not logged one by one", kind)

    def check_range(self, record: dict, key: str) -> bool:
        """Whether the record's label and image ids lie in the split's ranges; counted and logged if not."""
        label_ok = self.classes is None or 0 <= record["label"] < self.classes
        ids_ok = self.images is None or all(0 <= i < self.images for i in record["image_ids"])
        if label_ok and ids_ok:
            return True
        what = (f"label {record['label']} (the split has {self.classes} classes)" if not label_ok else
                f"image ids {record['image_ids']} (the split has {self.images} images)")
        self.fault("bad_labels", f"{record['shard']}#{key}", "skipping record %s in shard %s: %s", key,
                   record["shard"], what)
        return False

    def corrupt(self, shard: str, exc: Exception) -> None:
        """Log once and count a shard whose rest is skipped."""
        if shard not in self.corrupt_shards:
            log.warning("skipping the rest of shard %s: %s", shard, exc)
        self.corrupt_shards.add(shard)

    def keep(self, name: str) -> bool:
        """Only json and image members are read; any other is counted, skipped unread, never decoded."""
        ext = name.rsplit(".", 1)[-1].lower()
        if ext == "json" or ext in IMAGE_EXTENSIONS:
            return True
        self.unknown_members += 1
        return False

    def delta_pending(self) -> tuple[int, ...]:
        """The counts not yet reported by delta()."""
        now = (len(self.corrupt_shards), self.bad_records, self.unknown_members, self.bad_labels, self.bad_images,
               self.dropped_records, self.single_image_records)
        return tuple(a - b for a, b in zip(now, self._reported))

    def delta(self) -> dict[str, int]:
        """The counts since the previous call."""
        pending = self.delta_pending()
        self._reported = tuple(a + b for a, b in zip(self._reported, pending))
        return dict(zip(FAULTS, pending))


class ShardError(Exception):
    """A tar that cannot be read on from this point: bad header checksum, or cut short."""


_BLOCK = 512


def _number(field: bytes) -> int:
    if field[:1] == b"\x80":  # GNU base-256, for members over 8 GiB
        return int.from_bytes(field[1:], "big")
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _pax(data: bytes) -> dict[str, str]:
    """Records "LEN key=value\\n" of a pax extended header."""
    out, i = {}, 0
    while i < len(data):
        length = int(data[i:data.index(b" ", i)])
        key, _, value = data[data.index(b" ", i) + 1:i + length - 1].partition(b"=")
        out[key.decode()] = value.decode("utf-8", "surrogateescape")
        i += length
    return out


def tar_members(path: str, keep: Callable[[str], bool], max_member: int = 256 << 20,
                cache: ShardCache | None = None) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular files of the POSIX tar at ``path`` that ``keep`` accepts, in order.

    ustar headers with pax and GNU long names, as tarfile writes them. webdataset's tar path reads
    every header through Python's tarfile (~60 us a stored image on bench_data's shards); this
    reads the 512-byte header itself (~8 us), checks its checksum, and seeks over members it does
    not keep without reading them. Raises ShardError where the tar is damaged: a bad checksum, a
    member cut short, or no end-of-archive block (tarfile ends quietly there, but every tar writer
    writes one, so a shard cut at a member boundary is reported too), a file that starts with an
    end-of-archive block (empty, or all NUL bytes: tarfile reads it as an empty tar), or a member or
    extended header that declares more than ``max_member`` bytes (a pax header can declare any size:
    it would be read into memory); the members before the damage have been yielded.
    """
    f, seekable = open_stream(path, cache)
    end = os.fstat(f.fileno()).st_size if seekable else None

    def skip(n: int) -> None:  # a local file seeks; a stream reads and drops
        if seekable:
            f.seek(n, 1)
            return
        while n > 0:
            chunk = f.read(min(n, 1 << 20))
            if not chunk:
                return
            n -= len(chunk)

    try:
        extended: dict[str, str] = {}
        offset = 0
        while True:
            header = f.read(_BLOCK)
            if not header:
                raise ShardError(f"cut short: no end-of-archive block after byte {offset if end is None else min(offset, end)}"
                                 + (" (a member runs past the end of the file)" if end is not None and offset > end else ""))
            if not header.strip(b"\0"):
                if offset == 0:
                    raise ShardError("no member at all: the file starts with an end-of-archive block "
                                     "(empty, or all NUL bytes)")
                return  # the end-of-archive blocks
            if len(header) < _BLOCK:
                raise ShardError(f"cut short in the header at byte {offset}")
            if _number(header[148:156]) != sum(header[:148]) + 8 * 32 + sum(header[156:]):
                raise ShardError(f"bad header checksum at byte {offset}")
            kind, size = header[156:157], _number(header[124:136])
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if header[257:262] == b"ustar" and header[345:346] != b"\0":
                name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape") + "/" + name
            name, size = extended.pop("path", name), int(extended.pop("size", size))
            extended.clear()
            padded = size + (-size) % _BLOCK
            kept = kind in (b"0", b"\0") and keep(name)
            if size > max_member and (kept or kind in (b"x", b"L")):
                raise ShardError(f"member {name} at byte {offset} declares {size} bytes, more than the "
                                 f"{max_member} a member may have (data.max_member_mb)")
            if kind in (b"x", b"L"):  # pax extended header / GNU long name: they describe the next member
                data = f.read(size)
                if len(data) < size:
                    raise ShardError(f"cut short in an extended header at byte {offset}")
                extended = _pax(data) if kind == b"x" else {"path": data.rstrip(b"\0").decode("utf-8", "surrogateescape")}
                skip(padded - size)
            elif kept:
                data = f.read(size)
                if len(data) < size:
                    raise ShardError(f"cut short in member {name} at byte {offset}")
                skip(padded - size)
                yield name, data
            else:  # directories, links, pax globals, members we do not read
                skip(padded)
            offset += _BLOCK + padded
    finally:
        close_quietly(f)


def _key_suffix(name: str) -> tuple[str, str]:
    """A member name's record KEY and SUFFIX, as webdataset splits them: at the first dot of the base name."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return (name[:dot], name[dot + 1:]) if dot >= 0 else (name, "")


def _samples(members: Iterator[tuple[str, bytes]], last_on_damage: bool = True) -> Iterator[tuple[str, dict[str, bytes]]]:
    """webdataset's grouping: consecutive members KEY.SUFFIX with the same KEY make one sample. Where the tar
    is damaged, the sample read so far is yielded before the ShardError (``last_on_damage``), or not (a read
    that will be tried again from that sample on)."""
    key, sample = None, {}
    try:
        for name, data in members:
            k, suffix = _key_suffix(name)
            if k != key and sample:
                yield key, sample
                sample = {}
            key = k
            sample[suffix] = data
    except ShardError:
        if sample and last_on_damage:  # the damage may come right after a whole record: the caller checks it is whole
            yield key, sample
        raise
    if sample:
        yield key, sample


def read_records(shards: list[str], errors: ReadErrors) -> Iterator[dict]:
    """Valid records of ``shards`` in order: {label, image_ids, images: [(ext, bytes)], shard, class, items}.

    A damaged shard is logged, counted and skipped from the damage on (its last, incomplete record
    included); unknown members are counted and never read.
    """
    for shard in shards:
        yield from shard_records(shard, errors)


def shard_records(shard: str, errors: ReadErrors, skip: int = 0) -> Iterator[dict]:
    """The valid records of one shard after its first ``skip`` records, which are passed over without
    reading their members (only their tar headers). Each record carries its ``index`` in the shard (its
    KEY's ordinal: malformed or skipped records count too).

    A remote shard (a URL or command) whose read fails is opened again after a back-off (errors.retries
    times, doubling errors.backoff_s), from the record after the last one read; then, like a local shard
    that is damaged, it is logged, counted corrupt and left. With errors.checksums, a shard is first
    read whole against its sha256, unless this process knows its verdict already (verify_shards, run once
    for the job before the loaders fork their workers, or an earlier read here)."""
    attempt, start = 0, skip
    while True:
        counter = _KeyCounter(start, errors)
        try:
            if errors.checksums is not None and shard in errors.checksums and shard not in _VERIFIED:
                if shard in _FAILED:
                    raise _FAILED[shard]
                _verify(shard, errors.checksums[shard], errors.cache)
            will_retry = not is_local(shard) and attempt < errors.retries  # a cut read goes on from its last record
            members = tar_members(shard, counter.keep, errors.max_member_bytes, errors.cache)
            for key, sample in _samples(members, last_on_damage=not will_retry):
                index = counter.ordinals.pop(key, None)
                if index is not None:
                    start = index + 1
                record = _parse_record(sample, shard) if index is not None else None
                if record is None:
                    errors.fault("bad_records", f"{shard}#{key}", "skipping malformed record %s in shard %s", key,
                                 shard)
                    continue
                record["index"] = index
                if errors.check_range(record, key):
                    yield record
            return
        except (ShardError, OSError, ValueError, UnicodeDecodeError) as exc:
            if is_local(shard) or attempt >= errors.retries or isinstance(exc, ChecksumError):
                errors.corrupt(shard, exc)
                if errors.cache is not None and not is_local(shard):
                    errors.cache.forget(shard)  # a damaged copy is fetched anew next time
                return
            attempt += 1
            delay = errors.backoff_s * 2 ** (attempt - 1)
            log.warning("reading shard %s failed (%s); retry %d of %d from record %d in %.0f s", shard,
                        " ".join(str(exc).split())[:200], attempt, errors.retries, start, delay)
            time.sleep(delay)


_VERIFIED: set[str] = set()  # shards whose sha256 matched (checked here, or by any rank in verify_shards)
_FAILED: dict[str, "ChecksumError"] = {}  # shards whose sha256 did not match: never read
_OFFERED: set[str] = set()  # shards verify_shards has handled: the same on every rank (its collective depends on it)


class ChecksumError(ShardError):
    pass


def _verify(shard: str, expected: str, cache: ShardCache | None = None) -> None:
    """Read ``shard`` whole (streaming, or its local copy in ``cache``) and compare its sha256 with the
    manifest's; a copy that does not match is removed from the cache."""
    digest = hashlib.sha256()
    stream, _ = open_stream(shard, cache)
    try:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    finally:
        close_quietly(stream)
    if digest.hexdigest() != expected:
        if cache is not None and not is_local(shard):
            cache.forget(shard)
        _FAILED[shard] = ChecksumError(f"its sha256 {digest.hexdigest()[:16]}… is not the manifest's {expected[:16]}… "
                                       "(modified or damaged since dist-dml prep wrote it)")
        raise _FAILED[shard]
    _VERIFIED.add(shard)


def verify_shards(checksums: dict[str, str], sizes: dict[str, int], ctx, what: str, threads: int = 4,
                  cache: ShardCache | None = None) -> None:
    """Check the sha256 of every shard in ``checksums`` once for the whole job: each of the ctx's ranks reads
    its share (``threads`` at a time) and the verdicts are gathered to every rank, so no worker reads a
    shard whole again (left to itself, every worker process that meets a shard would). A shard that does
    not match is logged here and counted corrupt, unread, wherever it is met. A shard that could not be
    read now (the network) is left for its reader to verify, with its retries. Call on every rank."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    todo = sorted(s for s in checksums if s not in _OFFERED)
    if not todo:
        return
    _OFFERED.update(todo)
    mine = todo[ctx.rank::ctx.world_size]
    total_mb, mine_mb = (sum(sizes.get(s, 0) for s in part) / 2**20 for part in (todo, mine))
    if ctx.is_main:
        print(f"[data] data.verify_sha256: reading the {len(todo)} {what} shards ({total_mb:,.0f} MB) whole once, "
              f"split over {ctx.world_size} rank(s), before they are read", flush=True)
    verdicts: dict[str, str | None] = {}
    start = last = time.monotonic()
    done_mb = 0.0
    with ThreadPoolExecutor(max(1, min(threads, len(mine)))) as pool:
        futures = {pool.submit(_verify, shard, checksums[shard], cache): shard for shard in mine}
        for i, future in enumerate(as_completed(futures), 1):
            shard = futures[future]
            try:
                future.result()
                verdicts[shard] = None
            except ChecksumError as exc:
                verdicts[shard] = str(exc)
            except Exception as exc:  # the network, a command that fails: the reader tries again, with retries
                log.warning("could not verify shard %s now (%s): its reader will", shard, exc)
            done_mb += sizes.get(shard, 0) / 2**20
            now = time.monotonic()
            if ctx.is_main and (now - last > 10 or i == len(mine)):
                rate = done_mb / max(now - start, 1e-9)
                print(f"[data] sha256: {i}/{len(mine)} shards of rank 0 ({done_mb:,.0f}/{mine_mb:,.0f} MB, "
                      f"{rate:,.0f} MB/s, about {(mine_mb - done_mb) / max(rate, 1e-9):,.0f} s left)", flush=True)
                last = now
    failed = 0
    for part in ctx.all_gather_object(verdicts):
        for shard, problem in part.items():
            if problem is None:
                _VERIFIED.add(shard)
            else:
                _FAILED[shard] = ChecksumError(problem)
                failed += 1
                if ctx.is_main:
                    log.warning("shard %s does not match the manifest: %s; it will be counted corrupt and skipped",
                                shard, problem)
    if ctx.is_main:
        print(f"[data] sha256: {len(todo) - failed} of {len(todo)} {what} shards match the manifest in "
              f"{time.monotonic() - start:.0f} s" + (f"; {failed} do not and are skipped" if failed else ""), flush=True)


class _KeyCounter:
    """A tar_members ``keep`` that numbers the records (runs of members with one KEY, as _samples groups
    them) and passes over every member of the first ``skip``; the rest are kept as ``errors.keep`` says."""

    def __init__(self, skip: int, errors: ReadErrors):
        self.skip, self.errors = skip, errors
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
        return self.count > self.skip and self.errors.keep(name)


Segment = tuple[str, int, int]  # (shard, records to skip, records to take)


def read_segments(segments: list[Segment], errors: ReadErrors) -> Iterator[dict]:
    """The records of each (shard, skip, take) in turn: those whose index in the shard lies in
    [skip, skip + take), a contiguous part of it (a malformed record in it is not made up for from beyond)."""
    for shard, skip, take in segments:
        records = shard_records(shard, errors, skip)
        try:
            for record in records:
                if record["index"] >= skip + take:
                    break
                yield record
        finally:
            records.close()


def record_windows(counts: list[int], slots: int, least: int) -> list[tuple[int, int]]:
    """Each slot's window [start, end) of the records of an epoch, numbered over the epoch's shard order.

    Contiguous, disjoint and of nearly equal length (R // slots or one more), so every record falls in
    exactly one window and every shard is read about once in all; a slot reads at most two shards in
    part. Where the split has fewer than ``least`` (P) records per slot, windows are widened to
    ``least`` records (wrapping around), so a batch still holds distinct records: slots then share them.
    """
    total = sum(counts)
    windows = [(slot * total // slots, (slot + 1) * total // slots) for slot in range(slots)]
    want = min(least, total)
    return [(a, max(b, a + want)) for a, b in windows]


def window_segments(order: list[str], counts: list[int], window: tuple[int, int],
                    firsts: list[int] | None = None) -> list[Segment]:
    """The (shard, skip, take) parts of ``order`` that hold the records of ``window`` (end may pass the
    total: it wraps around to the first shard). With ``firsts``, entry i is the run of ``counts[i]``
    records of shard ``order[i]`` from its record ``firsts[i]`` on (a shard may then appear in several runs)."""
    total = sum(counts)
    firsts = firsts or [0] * len(order)
    starts = [0]
    for n in counts:
        starts.append(starts[-1] + n)
    segments, pos, end = [], window[0], window[1]
    while pos < end and total:
        at = pos % total
        i = bisect.bisect_right(starts, at) - 1  # the last run starting at or before `at` (never an empty one)
        take = min(counts[i] - (at - starts[i]), end - pos)
        segments.append((order[i], firsts[i] + at - starts[i], take))
        pos += take
    return segments


def undrawn_runs(order: list[str], counts: list[int], drawn: np.ndarray) -> tuple[list[str], list[int], list[int]]:
    """(shards, counts, firsts): the runs of records of an epoch (numbered over ``order``) that ``drawn``
    marks False, in order: what is left of the epoch for a resumed layout."""
    shards, lengths, firsts = [], [], []
    start = 0
    for shard, n in zip(order, counts):
        left = ~drawn[start:start + n]
        if left.any():
            edges = np.flatnonzero(np.diff(np.concatenate([[0], left.astype(np.int8), [0]])))
            for a, b in zip(edges[::2], edges[1::2]):
                shards.append(shard)
                firsts.append(int(a))
                lengths.append(int(b - a))
        start += n
    return shards, lengths, firsts


def _parse_record(sample: dict, shard: str) -> dict | None:
    try:
        meta = json.loads(sample["json"])
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
