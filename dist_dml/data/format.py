"""The class-grouped shard format (docs/SHARDS.md), stated once for the writer (data_prep) and the reader
(dist_dml.data) alike: neither imports the other; both import this.

A record is a class chunk: ``KEY.json`` (label, class, chunk, image_ids, items, source) and its images
``KEY.0.EXT`` ... ``KEY.{n-1}.EXT``; a split's shards are ``SPLIT-NNNNNN.tar``, listed with their counts in
``manifest.json``.
"""
from __future__ import annotations

import re

FORMAT, VERSION = "dist-dml/class-shards", 1
MANIFEST = "manifest.json"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # the image members a reader decodes
# A shard name as a manifest may give it: plain relative path parts of letters, digits, '.', '_' and '-',
# none starting with '.' or '-' (no '..', no option to a command), no shell metacharacter, no space.
PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*")


def is_plain_name(name) -> bool:
    """Whether ``name`` is a plain relative file name (PLAIN_NAME, at most 255 characters)."""
    return isinstance(name, str) and len(name) <= 255 and PLAIN_NAME.fullmatch(name) is not None


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def image_member(key: str, index: int, ext: str) -> str:
    return f"{key}.{index}.{ext}"
