"""Tailing a guest's log file for the lines written since a mark."""

from __future__ import annotations

import os
from typing import (
    IO,
    List,
    Optional,
    Tuple,
)

from serrinj.errors import FileError


class _LogReader:
    """Follows a growing text file from a byte offset, yielding whole new lines."""

    def __init__(self, path: str, offset: int) -> None:
        self.path = path
        self.offset = offset
        self.partial = b""
        self.count = 0
        self.exists = False
        self.lineno: Optional[int] = None  # the line number of the next line

    def lines(self, *, final: bool = False) -> List[Tuple[int, str]]:
        from serrinj.host import privilege

        try:
            # with the caller's rights: a refusal (PermissionDenied) ends the step
            f = privilege.open_file(self.path, "rb", "guest log")
        except FileError:
            return []  # a missing file is not an error here
        self.exists = True
        with f:
            size = os.fstat(f.fileno()).st_size
            if size < self.offset:  # truncated or rotated: start over
                self.offset, self.partial, self.lineno = 0, b"", None
            if self.lineno is None:
                self.lineno = _count_lines(f, self.offset) + 1
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        chunks = (self.partial + data).split(b"\n")
        self.partial = chunks.pop()
        if final and self.partial:
            chunks.append(self.partial)
            self.partial = b""
        out = []
        for raw in chunks:
            out.append((self.lineno, raw.decode("utf-8", errors="replace").rstrip("\r")))
            self.lineno += 1
        self.count += len(out)
        return out


def _count_lines(f: IO[bytes], end: int) -> int:
    f.seek(0)
    n = 0
    left = end
    while left > 0:
        block = f.read(min(left, 1 << 20))
        if not block:
            break
        n += block.count(b"\n")
        left -= len(block)
    return n
