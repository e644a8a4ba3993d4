"""Folders published whole, one writer and many readers: an export of embeddings, an index.

A writer writes a new version into a fresh folder beside the current one (:func:`new_version`), then makes it
current with one atomic rename of the folder's meta file (:func:`publish`), which names the version and each of
its files with its size. The last :data:`KEPT` versions stay, so a reader that read the meta file a moment ago
still finds the version it names after further publishes; older ones are removed.

A reader (:func:`open_published`) reads the meta file, checks it, and opens every file the meta lists before it
reads any: an open file stays readable even if a later publish removes its folder, so what it reads is one
version whole. Where the version is gone before its files could be opened (more than KEPT - 1 publishes in that
moment), it reads the meta file once more, says so, and opens the new version; it never mixes two. A file that
the meta does not list is never read.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import uuid
from pathlib import Path
from typing import Callable

from dist_dml.infra.errors import UserError
from dist_dml.infra.files import parse_json, read_json_object, read_regular, write_atomically

VERSION_PREFIX = "v-"
KEPT = 3  # versions a folder keeps: the current one and the two before it


def new_version(folder: str | Path) -> Path:
    """A fresh, empty version folder inside ``folder`` (made if missing), to write a new export or index into
    before :func:`publish` makes it the folder's current one."""
    path = Path(folder) / f"{VERSION_PREFIX}{uuid.uuid4().hex[:12]}"
    path.mkdir(parents=True)
    return path


def publish(folder: str | Path, meta_name: str, meta: dict, version: Path, legacy: tuple[str, ...] = ()) -> None:
    """Make ``version`` (a folder made by :func:`new_version` and written whole) the current content of ``folder``:
    its meta file (``meta_name``: ``meta`` with the version, each file's size and the versions kept before it)
    replaced atomically in one rename. Versions beyond the last KEPT, and the files that the layout before versions
    kept directly in ``folder`` (those of the version's names, and ``legacy`` glob patterns), are removed."""
    folder = Path(folder)
    try:
        old = parse_json(read_regular(folder / meta_name))
        before = [old["version"], *old.get("previous", [])] if isinstance(old, dict) and old.get("version") else []
    except (OSError, ValueError, TypeError, AttributeError):
        before = []
    previous = [v for v in before if _a_version_name(v) and (folder / v).is_dir()][:KEPT - 1]
    files = {p.name: p.stat().st_size for p in sorted(version.iterdir()) if p.is_file()}
    write_atomically(folder / meta_name, json.dumps({**meta, "version": version.name, "previous": previous,
                                                     "files": files}, indent=1))
    for old_version in folder.glob(f"{VERSION_PREFIX}*"):
        if old_version.is_dir() and old_version.name not in (version.name, *previous):
            shutil.rmtree(old_version, ignore_errors=True)
    stale = [folder / name for name in files] + [p for pattern in legacy for p in folder.glob(pattern)]
    for path in stale:
        if path.is_file():
            path.unlink()


def _a_version_name(value) -> bool:
    return isinstance(value, str) and value.startswith(VERSION_PREFIX) and "/" not in value and value not in (".", "..")


def listed_files(meta: dict) -> dict[str, int]:
    """The files a published meta lists, {name: size}: a ValueError where its record is damaged (not a mapping of
    plain file names to whole numbers)."""
    files = meta.get("files")
    if not isinstance(files, dict):
        raise ValueError(f"its files are {type(files).__name__}, not a mapping of names to sizes")
    for name, size in files.items():
        if not isinstance(name, str) or "/" in name or name in ("", ".", ".."):
            raise ValueError(f"it lists {name!r}, not a file name")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"the size it records for {name} is {size!r}, not a number of bytes")
    return files


def published(folder: str | Path, meta: dict) -> Path:
    """The folder holding the content ``meta`` (a published meta file's contents) describes: its version folder,
    checked against the sizes it records, or ``folder`` itself for content written before versions. A
    ValueError says what is wrong."""
    folder = Path(folder)
    version = meta.get("version")
    if not version:
        return folder
    if not _a_version_name(version):
        raise ValueError(f"its meta names no version folder ({version!r})")
    files = listed_files(meta)
    base = folder / version
    if not base.is_dir():
        raise ValueError(f"{base}, the version its meta names, is not there")
    for name, size in files.items():
        path = base / name
        if not path.is_file():
            raise ValueError(f"{path} is missing")
        if path.stat().st_size != size:
            raise ValueError(f"{path} has {path.stat().st_size} bytes, its meta says {size}")
    return base


class Replaced(Exception):
    """The version a meta file named was removed before its files could be opened."""


class Damaged(Exception):
    """A file of a version is not what its meta records (another size, not a regular file)."""


def open_published(folder: str | Path, meta_name: str, remedy: str, what: str = "the content",
                   say: Callable[[str], None] = print) -> tuple[dict, dict]:
    """(meta, {file name: an open binary file}) of the content current in ``folder``: every file its meta lists,
    opened before any is read and checked against the size recorded (see the module's docstring). A damaged
    meta, or ``what`` it describes damaged, is a UserError ending in ``remedy`` (what rebuilds it); a version removed before its files
    were opened is read once more from the meta file (``say`` tells), and a meta that names the same missing
    version again is damaged. Content written before versions (no version in its meta) is opened from ``folder``
    itself. The caller closes the files."""
    folder = Path(folder)
    tried = None
    while True:
        meta = read_json_object(folder / meta_name, remedy)
        try:
            return meta, _open_version(folder, meta)
        except Replaced as gone:
            if tried == meta.get("version"):
                raise UserError(f"{folder / meta_name}: damaged ({gone}); {remedy}") from None
            if tried is not None:
                raise UserError(f"{folder} was replaced again while it was read (a writer publishing without "
                                "pause): read it again once the writer is done") from None
            tried = meta.get("version")
            say(f"{folder} was replaced while it was read: reading the new content")
        except Damaged as exc:
            raise UserError(f"{folder}: {what} is damaged ({exc}); {remedy}") from None
        except ValueError as exc:
            raise UserError(f"{folder / meta_name}: damaged ({exc}); {remedy}") from None


def _open_version(folder: Path, meta: dict) -> dict:
    version = meta.get("version")
    if not version:  # before versions: the files in the folder, as they are
        names = [p.name for p in folder.iterdir() if p.is_file() and p.suffix in (".npy", ".faiss", ".parquet")]
        return {name: open(folder / name, "rb") for name in names}
    if not _a_version_name(version):
        raise ValueError(f"its version is {version!r}, not a version folder's name")
    files = listed_files(meta)
    try:
        directory = os.open(folder / version, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        raise Replaced(f"{folder / version}, the version its meta names, is not there") from None
    opened: dict = {}
    try:
        for name, size in files.items():
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK, dir_fd=directory)
            except FileNotFoundError:
                raise Replaced(f"{folder / version / name}, a file its meta lists, is not there") from None
            handle = os.fdopen(fd, "rb")
            opened[name] = handle
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise Damaged(f"{version}/{name} is not a regular file")
            if info.st_size != size:
                raise Damaged(f"{version}/{name} has {info.st_size} bytes, its meta records {size}")
        return opened
    except BaseException:
        for handle in opened.values():
            handle.close()
        raise
    finally:
        os.close(directory)
