"""How shards are read (:class:`ReadPolicy`: limits, ranges, retries, checksums, the cache) and what could not be
read (:class:`FaultCounter`: counted per worker, logged a few at a time, reported with every batch); a fault is
never fatal."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from dist_dml.data.format import IMAGE_EXTENSIONS
from dist_dml.data.opener import ShardCache
from dist_dml.data.verify import Verdicts

log = logging.getLogger("dist_dml.data")


FAULTS = ("corrupt_shards", "bad_records", "unknown_members", "bad_labels", "bad_images", "dropped_records",
          "single_image_records")
LOGGED_PER_KIND = 5  # faults of one kind logged one by one per worker; the rest only counted


@dataclass
class ReadPolicy:
    """How a reader reads a split's shards: read-only, shared by a stream's workers."""

    max_member_bytes: int = 256 << 20  # a member declaring more makes its shard corrupt
    classes: int | None = None  # the split's: a record's label must lie below
    images: int | None = None  # the split's: a record's image ids must lie below
    retries: int = 0  # a remote shard's read is tried again this often
    backoff_s: float = 1.0  # after the first failure; doubling
    checksums: dict[str, str] | None = None  # {shard: sha256} to verify each shard against before reading it
    cache: ShardCache | None = None  # remote shards are read from local copies there (data.cache_dir)
    verdicts: Verdicts = field(default_factory=Verdicts)  # the job's sha256 verdicts

    def range_problem(self, record: dict) -> str | None:
        """What lies outside the split's ranges in the record (its label, or its image ids), None if nothing."""
        if self.classes is not None and not 0 <= record["label"] < self.classes:
            return f"label {record['label']} (the split has {self.classes} classes)"
        if self.images is not None and not all(0 <= i < self.images for i in record["image_ids"]):
            return f"image ids {record['image_ids']} (the split has {self.images} images)"
        return None


class FaultCounter:
    """Per-worker counts of what could not be read; reported with every batch as a delta (FAULTS).

    corrupt_shards: shards skipped from a point of damage on (not a tar, NUL bytes, a truncated or
    oversized member); bad_records: records without a readable json or with images missing;
    unknown_members: members that are neither json nor an image (never read); bad_labels: records whose
    label or image ids lie outside the split's (per the manifest); bad_images: images that do not decode
    (the record keeps its others); dropped_records: records left with fewer than 2 decodable images;
    single_image_records: training records of fewer than 2 images, skipped (no positive pair) unless
    data.self_pairs trains them as two crops of one image.
    """

    def __init__(self):
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
