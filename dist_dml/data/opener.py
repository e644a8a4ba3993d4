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
read front to back and never held whole in memory.
"""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import BinaryIO

STALL_S = 60  # curl gives up on a transfer that delivers no byte for this long
BUFFER = 1 << 20


def is_local(location: str) -> bool:
    return not location.startswith("pipe:") and "://" not in location


def join(root: str, name: str) -> str:
    """The location of ``name`` (a manifest's shard name, or manifest.json) under ``root``."""
    root = str(root)
    if root.startswith("pipe:"):
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


def open_stream(location: str) -> tuple[BinaryIO, bool]:
    """(binary stream, whether it can seek) of a shard or manifest."""
    if is_local(location):
        return open(location, "rb", buffering=BUFFER), True
    from webdataset.gopen import gopen

    return gopen(_command(location), "rb", bufsize=BUFFER), False


def close_quietly(stream) -> None:
    """Close a stream read partly: a command whose output was not read to the end exits on a broken pipe,
    which webdataset reports as an error on closing."""
    try:
        stream.close()
    except OSError:
        pass


def read_bytes(location: str) -> bytes:
    """All of a small file (manifest.json), local or remote."""
    stream, _ = open_stream(location)
    try:
        return stream.read()
    finally:
        close_quietly(stream)
