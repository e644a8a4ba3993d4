"""A shard folder's manifest.json (docs/SHARDS.md): splits, their shards, record and image counts."""
from __future__ import annotations

import os
from pathlib import Path

from dist_dml.data.format import FORMAT, MANIFEST, VERSION, is_plain_name
from dist_dml.data.opener import TooLarge, is_local, join, read_bytes
from dist_dml.infra.errors import UserError, one_line
from dist_dml.infra.files import parse_json

MAX_MANIFEST_MB = 256.0  # data.max_manifest_mb's default: a million classes' class_table is about 40 MB
MEMBER_BYTES = 1024  # the least a tar member takes: its 512-byte header and one block of data
POSITION_BYTES = 12  # a training stream's position per record: two int32 draw counts and a flag (and slack)
TABLE_BYTES = 16  # a per-class beta row with its Adam moments (float32)


def memory_bytes() -> int:
    """This machine's physical memory."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 1 << 40


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


class ManifestError(UserError, ValueError):
    """A manifest that is missing, unreadable, of another schema, or without the split asked for."""


class Manifest:
    """A shard folder's manifest.json (docs/SHARDS.md), schema-checked on load."""

    def __init__(self, root: str | Path, max_mb: float = MAX_MANIFEST_MB):
        self.root = str(root)  # a folder or a URL prefix (dist_dml.data.opener)
        self.path = path = join(self.root, MANIFEST)
        try:
            self.data = parse_json(read_bytes(path, int(max_mb * 2**20)) or b"null")
        except FileNotFoundError:
            raise ManifestError(f"{path}: no manifest (write shards with `dist-dml prep`)") from None
        except IsADirectoryError:
            raise ManifestError(f"{path}: a folder, not a manifest file") from None
        except TooLarge as exc:
            raise ManifestError(f"{path}: {exc}, more than a manifest may (data.max_manifest_mb)") from None
        except OSError as exc:  # a remote root: the command or the server failed
            raise ManifestError(f"{path}: cannot be read ({one_line(exc)})") from None
        except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, nesting beyond the parser
            raise ManifestError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(self.data, dict) or self.data.get("format") != FORMAT or self.data.get("version") != VERSION:
            got = self.data if not isinstance(self.data, dict) else self.data.get("format"), \
                None if not isinstance(self.data, dict) else self.data.get("version")
            raise ManifestError(f"{path}: format {got[0]!r} version {got[1]!r}, expected {FORMAT!r} version {VERSION}")
        self._check_schema()

    def _check_schema(self) -> None:
        """Every field a reader relies on, with its type, and the counts against each other and against the
        shards' sizes (a reader allocates from them): one message naming the first that is wrong."""
        splits = self.data.get("splits")
        self._need(isinstance(splits, dict), "splits", "an object of splits")
        for name, split in splits.items():
            self._need(isinstance(split, dict), f"splits.{name}", "an object")
            for key in ("classes", "images"):
                self._need(_count(split.get(key)), f"splits.{name}.{key}", "a count (an integer >= 0)")
            self._need(isinstance(split.get("shards"), list), f"splits.{name}.shards", "a list")
            seen = set()
            for i, shard in enumerate(split["shards"]):
                self._check_shard(shard, f"splits.{name}.shards[{i}]")
                if shard["name"] in seen:
                    raise ManifestError(f"{self.path}: splits.{name}.shards[{i}] lists {shard['name']} again: each "
                                        "shard once (its records would be drawn twice an epoch)")
                seen.add(shard["name"])
            self._check_counts(name, split)

    def _need(self, ok: bool, where: str, what: str) -> None:
        if not ok:
            raise ManifestError(f"{self.path}: {where} must be {what} (docs/SHARDS.md)")

    def _check_shard(self, shard, where: str) -> None:
        self._need(isinstance(shard, dict), where, "an object")
        name = shard.get("name")
        if not is_plain_name(name):
            raise ManifestError(f"{self.path}: {where}.name {name!r} is not a plain relative file name (letters, "
                                "digits, '.', '_', '-' and '/' between parts; no '..', no absolute path, no shell "
                                "character): refused")
        for key in ("records", "images"):
            self._need(_count(shard.get(key)), f"{where}.{key}", "a count (an integer >= 0)")
        if "bytes" in shard:
            self._need(_count(shard["bytes"]), f"{where}.bytes", "a count (an integer >= 0)")
        records, images = shard["records"], shard["images"]
        if records > images:
            raise ManifestError(f"{self.path}: {where} ({name}) declares {records} records but only {images} images "
                                "(every record holds at least one)")
        size = self._shard_size(shard, where)
        if (records + images) * MEMBER_BYTES > size:
            raise ManifestError(f"{self.path}: {where} ({name}) declares {records} records of {images} images, more "
                                f"than its {size:,} bytes can hold (each member takes at least {MEMBER_BYTES} bytes)")

    def _shard_size(self, shard: dict, where: str) -> int:
        """The bytes a shard's counts are checked against: the manifest's, else a local file's own size (a
        truncated shard keeps its counts: the reader reports and skips its damage)."""
        if "bytes" in shard:
            return shard["bytes"]
        location = join(self.root, shard["name"])
        if is_local(location) and os.path.isfile(location):
            return os.stat(location).st_size
        raise ManifestError(f"{self.path}: {where}.bytes is needed for {location} (a remote or missing shard): "
                            "the counts are checked against it before anything is read")

    def _check_counts(self, name: str, split: dict) -> None:
        records = sum(s["records"] for s in split["shards"])
        images = sum(s["images"] for s in split["shards"])
        if images != split["images"]:
            raise ManifestError(f"{self.path}: splits.{name}.images is {split['images']}, but its shards hold {images}")
        if "records" in split and split["records"] != records:
            raise ManifestError(f"{self.path}: splits.{name}.records is {split['records']}, but its shards hold "
                                f"{records}")
        if split["classes"] > records or (records and not split["classes"]):
            raise ManifestError(f"{self.path}: splits.{name} declares {split['classes']} classes in {records} records "
                                "(every class has at least one record, every record a class)")
        need = records * POSITION_BYTES + split["classes"] * TABLE_BYTES
        if need > memory_bytes() / 2:
            raise ManifestError(f"{self.path}: splits.{name} declares {records:,} records of {images:,} images in "
                                f"{split['classes']:,} classes: a reader would need {need / 2**30:,.1f} GB for its "
                                f"position and tables alone, more than half of this machine's "
                                f"{memory_bytes() / 2**30:,.0f} GB")

    def split(self, name: str) -> dict:
        splits = self.data["splits"]
        if name not in splits:
            raise ManifestError(f"{self.path}: no split {name!r}; it has {sorted(splits)}")
        if not any(s["records"] for s in splits[name]["shards"]):
            raise ManifestError(f"{self.path}: split {name!r} has no records (no shard of it holds any)")
        return splits[name]

    def single_image_records(self, split: str) -> int:
        """The fewest records of fewer than 2 images that the counts of ``split`` allow: a shard of R records
        and I < 2R images holds at least 2R - I of them (exact where every record holds one or two)."""
        return sum(max(0, 2 * s["records"] - s["images"]) for s in self.split(split)["shards"])

    def records(self, split: str) -> int:
        return sum(s["records"] for s in self.split(split)["shards"])

    def shard_paths(self, split: str) -> list[str]:
        """Each shard's location: a path under a local root, else a URL or command (opener.join)."""
        return [join(self.root, s["name"]) for s in self.split(split)["shards"]]

    def sizes(self, split: str) -> dict[str, int]:
        """{shard location: bytes} for the shards of ``split`` (0 where the manifest has no size)."""
        return {join(self.root, s["name"]): s.get("bytes", 0) for s in self.split(split)["shards"]}

    def checksums(self, split: str) -> dict[str, str]:
        """{shard location: sha256} for the shards of ``split`` whose manifest entry has one."""
        return {join(self.root, s["name"]): s["sha256"] for s in self.split(split)["shards"]
                if isinstance(s.get("sha256"), str)}
