"""A shard folder's manifest.json (docs/SHARDS.md): splits, their shards, record and image counts."""
from __future__ import annotations

import json
from pathlib import Path

from dist_dml.data.opener import join, read_bytes
from dist_dml.errors import UserError

FORMAT, VERSION = "dist-dml/class-shards", 1


class ManifestError(UserError, ValueError):
    """A manifest that is missing, unreadable, of another schema, or without the split asked for."""


class Manifest:
    """A shard folder's manifest.json (docs/SHARDS.md), schema-checked on load."""

    def __init__(self, root: str | Path):
        self.root = str(root)  # a folder or a URL prefix (dist_dml.data.opener)
        self.path = path = join(self.root, "manifest.json")
        try:
            self.data = json.loads(read_bytes(path) or b"null")
        except FileNotFoundError:
            raise ManifestError(f"{path}: no manifest (write shards with `dist-dml prep`)") from None
        except OSError as exc:  # a remote root: the command or the server failed
            raise ManifestError(f"{path}: cannot be read ({' '.join(str(exc).split())[:300]})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ManifestError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(self.data, dict) or self.data.get("format") != FORMAT or self.data.get("version") != VERSION:
            got = self.data if not isinstance(self.data, dict) else self.data.get("format"), \
                None if not isinstance(self.data, dict) else self.data.get("version")
            raise ManifestError(f"{path}: format {got[0]!r} version {got[1]!r}, expected {FORMAT!r} version {VERSION}")
        self._check_schema()

    def _check_schema(self) -> None:
        """Every field a reader relies on, with its type: one message naming the first that is wrong."""
        def need(ok: bool, where: str, what: str) -> None:
            if not ok:
                raise ManifestError(f"{self.path}: {where} must be {what} (docs/SHARDS.md)")

        splits = self.data.get("splits")
        need(isinstance(splits, dict), "splits", "an object of splits")
        count = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0
        for name, split in splits.items():
            need(isinstance(split, dict), f"splits.{name}", "an object")
            for key in ("classes", "images"):
                need(count(split.get(key)), f"splits.{name}.{key}", "a count (an integer >= 0)")
            need(isinstance(split.get("shards"), list), f"splits.{name}.shards", "a list")
            for i, shard in enumerate(split["shards"]):
                where = f"splits.{name}.shards[{i}]"
                need(isinstance(shard, dict), where, "an object")
                file = shard.get("name")
                need(isinstance(file, str) and file != "" and not Path(file).is_absolute()
                     and ".." not in Path(file).parts, f"{where}.name", "a file name inside the shard folder")
                for key in ("records", "images"):
                    need(count(shard.get(key)), f"{where}.{key}", "a count (an integer >= 0)")

    def split(self, name: str) -> dict:
        splits = self.data["splits"]
        if name not in splits:
            raise ManifestError(f"{self.path}: no split {name!r}; it has {sorted(splits)}")
        return splits[name]

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
