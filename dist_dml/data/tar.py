"""The tar parser of the shards: (name, bytes) of the members a reader keeps, and webdataset's grouping of
members into samples. Only regular files are read; a damaged tar raises ShardError where the damage is."""
from __future__ import annotations

import os
from typing import Callable, Iterator

from dist_dml.data.opener import ShardCache, close_quietly, open_stream


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
            parsed = _header(f.read(_BLOCK), offset, end)
            if parsed is None:
                return  # the end-of-archive blocks
            kind, size, name = parsed
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


def _header(header: bytes, offset: int, end: int | None) -> tuple[bytes, int, str] | None:
    """(type flag, size, name) of the 512-byte header at ``offset``; None at the end-of-archive block. A
    ShardError where there is no block (the tar is cut), or it is short or its checksum is wrong."""
    if not header:
        raise ShardError(f"cut short: no end-of-archive block after byte {offset if end is None else min(offset, end)}"
                         + (" (a member runs past the end of the file)" if end is not None and offset > end else ""))
    if not header.strip(b"\0"):
        if offset == 0:
            raise ShardError("no member at all: the file starts with an end-of-archive block (empty, or all NUL bytes)")
        return None
    if len(header) < _BLOCK:
        raise ShardError(f"cut short in the header at byte {offset}")
    if _number(header[148:156]) != sum(header[:148]) + 8 * 32 + sum(header[156:]):
        raise ShardError(f"bad header checksum at byte {offset}")
    name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    if header[257:262] == b"ustar" and header[345:346] != b"\0":
        name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape") + "/" + name
    return header[156:157], _number(header[124:136]), name


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
