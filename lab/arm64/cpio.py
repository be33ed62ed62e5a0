"""A deterministic writer for the kernel's initramfs format (cpio "newc").

Written in Python rather than driving ``cpio(1)`` so that an archive can hold
root-owned entries and device nodes without privileges, and so that the same
inputs always give the same bytes (the lab caches images by content).

The format (Documentation/driver-api/early-userspace/buffer-format.rst): each
entry is a 110-byte ASCII header (``070701`` and 13 eight-digit hex fields),
the NUL-terminated name padded to 4 bytes, then the data padded to 4 bytes. The
archive ends with an entry named ``TRAILER!!!``. Archives may be concatenated;
the kernel unpacks them in order, and a later entry replaces an earlier one.
"""

from __future__ import annotations

import gzip
import os
import stat
from dataclasses import dataclass
from typing import BinaryIO, Dict, Iterator, Optional, Union

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
#: a fixed timestamp for every entry: the image must not depend on checkout times
FIXED_MTIME = 1577836800  # 2020-01-01


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


@dataclass(frozen=True)
class Entry:
    """One archive member. ``data`` holds bytes, or ``source`` names a host file to copy."""

    mode: int
    data: bytes = b""
    source: Optional[str] = None
    rdev: tuple[int, int] = (0, 0)

    @property
    def kind(self) -> int:
        return stat.S_IFMT(self.mode)


class Tree:
    """An archive under construction: archive path -> entry, parents made on demand.

    Paths are relative (``usr/bin/python3``). Adding a path that exists replaces
    it, mirroring what the kernel does with a later entry of the same name.
    """

    def __init__(self) -> None:
        self._entries: Dict[str, Entry] = {}

    @staticmethod
    def _norm(path: str) -> str:
        norm = os.path.normpath(path.lstrip("/"))
        if norm in (".", "") or norm.startswith(".."):
            raise ValueError(f"bad archive path {path!r}")
        return norm

    def _parents(self, path: str) -> None:
        parent = os.path.dirname(path)
        while parent:
            existing = self._entries.get(parent)
            if existing is None:
                self._entries[parent] = Entry(stat.S_IFDIR | 0o755)
            elif existing.kind == stat.S_IFLNK:
                # e.g. "lib" -> "usr/lib": the kernel would follow it; the
                # builder must write through the real directory instead.
                raise ValueError(f"{path!r} would be created through the symlink {parent!r}")
            elif existing.kind != stat.S_IFDIR:
                raise ValueError(f"{parent!r} is not a directory (needed for {path!r})")
            parent = os.path.dirname(parent)

    def _put(self, path: str, entry: Entry) -> str:
        norm = self._norm(path)
        self._parents(norm)
        self._entries[norm] = entry
        return norm

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        self._put(path, Entry(stat.S_IFDIR | (mode & 0o7777)))

    def add_bytes(self, path: str, data: Union[bytes, str], mode: int = 0o644) -> None:
        raw = data.encode() if isinstance(data, str) else data
        self._put(path, Entry(stat.S_IFREG | (mode & 0o7777), data=raw))

    def add_file(self, path: str, source: str, mode: Optional[int] = None) -> None:
        """Copy host file ``source`` (symlinks dereferenced); mode defaults to the source's."""
        st = os.stat(source)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{source} is not a regular file")
        perm = stat.S_IMODE(st.st_mode) if mode is None else mode
        self._put(path, Entry(stat.S_IFREG | (perm & 0o7777), source=source))

    def add_symlink(self, path: str, target: str) -> None:
        self._put(path, Entry(stat.S_IFLNK | 0o777, data=target.encode()))

    def add_chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._put(path, Entry(stat.S_IFCHR | (mode & 0o7777), rdev=(major, minor)))

    def get(self, path: str) -> Optional[Entry]:
        return self._entries.get(self._norm(path))

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and self._norm(path) in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def paths(self) -> Iterator[str]:
        """Archive paths in write order: sorted, so every parent precedes its children."""
        return iter(sorted(self._entries))

    def items(self) -> Iterator[tuple[str, Entry]]:
        for path in self.paths():
            yield path, self._entries[path]


def _header(
    ino: int, mode: int, nlink: int, size: int, rdev: tuple[int, int], namesize: int
) -> bytes:
    fields = (ino, mode, 0, 0, nlink, FIXED_MTIME, size, 0, 0, rdev[0], rdev[1], namesize, 0)
    return MAGIC + b"".join(b"%08X" % f for f in fields)


def _write_entry(
    out: BinaryIO, ino: int, name: str, mode: int, data: bytes, rdev: tuple[int, int] = (0, 0)
) -> None:
    raw_name = name.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(mode) else 1
    out.write(_header(ino, mode, nlink, len(data), rdev, len(raw_name)))
    out.write(raw_name + b"\0" * _pad4(110 + len(raw_name)))
    out.write(data + b"\0" * _pad4(len(data)))


def write(tree: Tree, out: BinaryIO) -> None:
    """Write ``tree`` as one newc archive (with its trailer) to ``out``."""
    ino = 1
    for path, entry in tree.items():
        data = entry.data
        if entry.source is not None:
            with open(entry.source, "rb") as src:
                data = src.read()
        _write_entry(out, ino, path, entry.mode, data, entry.rdev)
        ino += 1
    _write_entry(out, 0, TRAILER, 0, b"")


def write_file(tree: Tree, path: str, compress: bool) -> None:
    """Write ``tree`` to ``path`` atomically, gzip-compressed or not."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as raw:
            if compress:
                # mtime=0 keeps the gzip header, and so the cache key, stable
                with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz:
                    write(tree, gz)  # type: ignore[arg-type]
            else:
                write(tree, raw)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@dataclass(frozen=True)
class Member:
    """One entry read back from an archive (for tests and inspection)."""

    name: str
    mode: int
    data: bytes
    rdev: tuple[int, int]


def read(raw: bytes) -> Iterator[Member]:
    """Parse every newc archive concatenated in ``raw`` (trailers are not yielded)."""
    pos = 0
    while pos < len(raw):
        if raw[pos : pos + 6] != MAGIC:
            if raw[pos:].strip(b"\0") == b"":
                return  # padding after the last trailer
            raise ValueError(f"bad cpio magic at offset {pos}")
        fields = [int(raw[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, namesize = fields[1], fields[6], fields[9], fields[10], fields[11]
        name_start = pos + 110
        name = raw[name_start : name_start + namesize - 1].decode()
        data_start = name_start + namesize + _pad4(110 + namesize)
        data = raw[data_start : data_start + size]
        pos = data_start + size + _pad4(size)
        if name != TRAILER:
            yield Member(name, mode, data, (rmaj, rmin))
