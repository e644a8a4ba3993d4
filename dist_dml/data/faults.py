"""What a reader could not read, counted per worker and reported with every batch; never fatal."""
from __future__ import annotations

import logging

from dist_dml.data.format import IMAGE_EXTENSIONS
from dist_dml.data.opener import ShardCache
from dist_dml.data.verify import Verdicts

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
                 cache: ShardCache | None = None, verdicts=None):
        self.max_member_bytes = max_member_bytes  # a member declaring more makes its shard corrupt
        self.classes, self.images = classes, images  # the split's: labels and image ids must lie below
        self.retries, self.backoff_s = retries, backoff_s  # a remote shard's read is tried again this often
        self.checksums = checksums  # {shard: sha256} to verify each shard against before reading it
        self.verdicts = verdicts if verdicts is not None else Verdicts()  # the job's sha256 verdicts
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
