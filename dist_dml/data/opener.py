"""Where shard bytes come from: a local folder, or a URL prefix read through webdataset's opener.

`data.root` is a folder, or a prefix a shard's manifest name is appended to:

- ``http://host/path`` / ``https://…``: each shard through ``curl`` (webdataset's ``pipe:`` handler),
  which gives up on a connection that stalls (no byte for STALL_S seconds) instead of hanging;
- ``pipe:CMD``: a command that writes the shard to stdout; ``{shard}`` in it is replaced by the shard's
  name, else the name is appended (``pipe:cat /data/shards/``, ``pipe:aws s3 cp s3://b/shards/{shard} -``,
  ``pipe:gsutil cat gs://b/shards/{shard}``);
- ``s3://bucket/prefix`` (through ``aws s3 cp … -``) and ``gs://bucket/prefix`` (webdataset's gsutil
  handler), where those tools are installed.

A local file is read with seeks (members the reader does not keep are passed over unread); a stream is
read front to back and never held whole in memory. With a :class:`ShardCache` (``data.cache_dir``), a
remote shard is downloaded whole once per machine (webdataset's FileCache, one process at a time per
shard) and then read from the local copy, with seeks.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shlex
from pathlib import Path
from typing import BinaryIO

from dist_dml.infra.files import open_regular

log = logging.getLogger("dist_dml.data")

STALL_S = 60  # curl gives up on a transfer that delivers no byte for this long
BUFFER = 1 << 20


def is_local(location: str) -> bool:
    return not location.startswith("pipe:") and "://" not in location


def join(root: str, name: str) -> str:
    """The location of ``name`` (a manifest's shard name, or manifest.json) under ``root``. In a ``pipe:``
    command the name is quoted for the shell: a manifest is data, and must never add to a command."""
    root = str(root)
    if root.startswith("pipe:"):
        name = shlex.quote(name)
        return root.replace("{shard}", name) if "{shard}" in root else root + name
    if "://" in root:
        return root.rstrip("/") + "/" + name
    return str(Path(root) / name)


def _command(location: str) -> str:
    """The webdataset gopen location that reads ``location``."""
    if location.startswith(("http://", "https://")):
        return ("pipe:curl --fail --silent --show-error --location --connect-timeout 10 "
                f"--speed-limit 1 --speed-time {STALL_S} {shlex.quote(location)}")
    if location.startswith("s3://"):
        return f"pipe:aws s3 cp --only-show-errors {shlex.quote(location)} -"
    return location  # pipe:…, gs://… and webdataset's other schemes as they are


class ShardCache:
    """Remote shards kept on local disk under ``folder`` (``data.cache_dir``), at most ``max_bytes`` in all (0:
    no limit; the least recently fetched go first), through webdataset's FileCache. A copy is named by the
    digest of its location, so shards of the same name from two datasets never mix; it is written to a
    temporary file and renamed, so a reader never sees half of one. The processes of a machine that want
    the same shard at once wait for the one that fetches it (a lock file beside it) rather than each
    fetching it."""

    def __init__(self, folder: str, max_bytes: int = 0):
        from webdataset.cache import FileCache

        self.folder = str(folder)
        self._files = FileCache(self.folder, url_to_name=self.name, validator=None, cache_size=max_bytes or -1,
                                cache_cleanup_interval=30)

    @staticmethod
    def name(command: str) -> str:
        tail = command.rstrip("/").rsplit("/", 1)[-1].split()[-1] if command.strip() else "shard"
        tail = "".join(c if c.isalnum() or c in "._-" else "_" for c in tail)[-80:]
        return hashlib.sha256(command.encode()).hexdigest()[:20] + "-" + tail

    def path(self, location: str) -> str:
        """The local copy of ``location``, fetched first if this machine has none yet."""
        command = _command(location)
        dest = os.path.join(self.folder, self.name(command))
        if os.path.exists(dest):
            return dest
        os.makedirs(self.folder, exist_ok=True)
        with open(dest + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process of this machine may be fetching it
            try:
                if not os.path.exists(dest):
                    log.info("caching shard %s in %s", location, dest)
                    try:
                        self._files.get_file(command)
                    finally:  # a fetch that failed leaves webdataset's temporary file behind
                        for name in os.listdir(self.folder):
                            if name.startswith(os.path.basename(dest) + ".temp"):
                                os.remove(os.path.join(self.folder, name))
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return dest

    def forget(self, location: str) -> None:
        """Remove the local copy of ``location`` (it did not match the manifest's hash)."""
        try:
            os.remove(os.path.join(self.folder, self.name(_command(location))))
        except FileNotFoundError:
            pass


def open_stream(location: str, cache: ShardCache | None = None) -> tuple[BinaryIO, bool]:
    """(binary stream, whether it can seek) of a shard or manifest; a remote one from ``cache`` if given."""
    if is_local(location):
        return open_regular(location, buffering=BUFFER), True
    if cache is not None:
        return open_regular(cache.path(location), buffering=BUFFER), True
    from webdataset.gopen import gopen

    return gopen(_command(location), "rb", bufsize=BUFFER), False


def close_quietly(stream) -> None:
    """Close a stream read partly: a command whose output was not read to the end exits on a broken pipe,
    which webdataset reports as an error on closing."""
    try:
        stream.close()
    except OSError:
        pass


class TooLarge(ValueError):
    """A small file (manifest.json) that holds more than it may."""


def read_bytes(location: str, limit: int) -> bytes:
    """All of a small file (manifest.json), local or remote, of at most ``limit`` bytes: never more is
    read (a manifest that is /dev/zero, or a server that does not stop)."""
    stream, _ = open_stream(location)
    try:
        data = stream.read(limit + 1)
    finally:
        close_quietly(stream)
    if len(data) > limit:
        raise TooLarge(f"holds more than {limit / 2**20:,.0f} MB")
    return data
