"""Find an existing syscall instruction in the target's executable mappings.

The engine never writes code into a VMM: its other threads keep running and
could execute a half-written instruction. Instead the thread's pc is pointed
at a syscall instruction that is already there, in libc (or, for a static
VMM, in its own text). Results are cached per process and re-validated with a
2-byte (4-byte) read before each use.

A fresh serrinj process (each CLI run) would otherwise scan the VMM's libc
again for every sequence (milliseconds: ``__restore_rt`` lies deep in it), so
hits in a mapped file are also kept on disk, as the file offset keyed by the
file's identity (device and inode, as /proc/PID/maps shows them) and the
pattern: ``$XDG_CACHE_HOME/serrinj/gadgets.json`` (``~/.cache/...``). A disk
entry is only a hint: it is used when it falls inside a readable executable
mapping of that file in the target, aligned, not avoided, and the target's
bytes there are the pattern (read afresh), which is what a scan would accept.

When serrinj runs with root's rights for another user (sudo, set-uid), the
cache is root's own (root's home from the password database): the caller's
``$XDG_CACHE_HOME`` or ``$HOME`` must not choose where root writes. The file is
written through a new temporary file (``O_EXCL | O_NOFOLLOW``, mode 0600) and
read only when it is a regular file reached without a symlink.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import stat
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from serrinj import _native
from serrinj.errors import SerrinjError
from serrinj.host import privilege, procfs
from serrinj.remote.arch import Arch

_CHUNK = 1 << 20
#: libc's first syscall instruction is usually within its first pages: a small
#: first read keeps a fresh process (every CLI run) from copying a whole MiB
_FIRST_WINDOW = 1 << 16
_cache: Dict[Tuple[int, int, Tuple[bytes, ...]], int] = {}
_EXCLUDED = ("[vsyscall]", "[vectors]", "[uprobes]")


def _rank(m: procfs.Mapping, exe: str) -> int:
    base = m.path.rsplit("/", 1)[-1]
    if base.startswith("libc.so") or base.startswith("libc-") or base.startswith("ld-musl"):
        return 0
    if m.path == exe:
        return 1
    if m.path.startswith("/"):
        return 2
    return 3  # [vdso] and anonymous executable memory last


def _candidates(pid: int, maps: Optional[Sequence[procfs.Mapping]] = None) -> List[procfs.Mapping]:
    exe = procfs.exe(pid) or ""
    if maps is None:
        maps = procfs.maps(pid)
    found = [m for m in maps if m.readable and m.executable and m.path not in _EXCLUDED]
    return sorted(found, key=lambda m: _rank(m, exe))


def _scan(
    pid: int, m: procfs.Mapping, patterns: Sequence[bytes], align: int, avoid: Iterable[int]
) -> int:
    avoid = set(avoid)
    overlap = max(len(p) for p in patterns) - 1
    addr = m.start
    window = _FIRST_WINDOW
    while addr < m.end:
        size = min(window, m.end - addr)
        try:
            data = _native.process_vm_read(pid, addr, size)
        except OSError:
            return 0
        best = 0
        for insn in patterns:
            pos = data.find(insn)
            while pos >= 0:
                hit = addr + pos
                if hit % align == 0 and hit not in avoid:
                    best = hit if not best else min(best, hit)
                    break
                pos = data.find(insn, pos + 1)
        if best:
            return best
        if addr + size >= m.end:
            break
        # windows overlap, so an instruction split across two is found in the next
        addr += size - overlap
        window = _CHUNK
    return 0


def _disk_path() -> str:
    if privilege.current().elevated:
        base = os.path.join(pwd.getpwuid(os.geteuid()).pw_dir, ".cache")
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "serrinj", "gadgets.json")


def _read_disk(path: str) -> object:
    # O_NONBLOCK: a FIFO in its place must not hang the seize
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, encoding="utf-8") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return json.load(f)


_disk: Optional[Dict[str, int]] = None


def _disk_entries() -> Dict[str, int]:
    global _disk
    if _disk is None:
        try:
            raw = _read_disk(_disk_path())
            _disk = {str(k): int(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
        except (OSError, ValueError, TypeError):
            _disk = {}
    return _disk


def _disk_key(m: procfs.Mapping, patterns: Sequence[bytes]) -> Optional[str]:
    if not m.inode or not m.path.startswith("/"):
        return None  # anonymous memory, [vdso]...: nothing stable to key on
    return f"{m.dev}:{m.inode}:{'/'.join(p.hex() for p in patterns)}"


def _remember(m: procfs.Mapping, patterns: Sequence[bytes], hit: int) -> None:
    """Keep a scan's hit in a mapped file on disk (best effort: never an error)."""
    key = _disk_key(m, patterns)
    if key is None:
        return
    entries = _disk_entries()
    offset = hit - m.start + m.offset
    if entries.get(key) == offset:
        return
    if len(entries) >= 256:
        entries.clear()
    entries[key] = offset
    target = _disk_path()
    tmp = f"{target}.{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with os.fdopen(os.open(tmp, flags, 0o600), "w", encoding="utf-8") as f:
            json.dump(entries, f)
        os.replace(tmp, target)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _from_disk(
    pid: int,
    candidates: Sequence[procfs.Mapping],
    patterns: Sequence[bytes],
    align: int,
    avoid: Iterable[int],
) -> int:
    """A remembered hit that holds in this process now (see the module docstring), or 0."""
    entries = _disk_entries()
    if not entries:
        return 0
    avoid = set(avoid)
    size = max(len(p) for p in patterns)
    for m in candidates:
        key = _disk_key(m, patterns)
        offset = entries.get(key) if key else None
        if offset is None:
            continue
        addr = m.start + offset - m.offset
        if (
            m.contains(addr, size)
            and addr % align == 0
            and addr not in avoid
            and _still_valid(pid, addr, patterns)
        ):
            return addr
    return 0


def _still_valid(pid: int, addr: int, patterns: Sequence[bytes]) -> bool:
    try:
        data = _native.process_vm_read(pid, addr, max(len(p) for p in patterns))
    except OSError:
        return False
    return any(data.startswith(p) for p in patterns)


def find_syscall_gadget(
    pid: int,
    arch: Arch,
    avoid: Iterable[int] = (),
    starttime: Optional[int] = None,
    maps: Optional[Sequence[procfs.Mapping]] = None,
) -> int:
    """The address of a syscall instruction in an executable mapping of ``pid``.

    ``avoid`` lists addresses that must not be used (on aarch64, the
    instruction the thread will restart at: the kernel treats a pc equal to
    its restart address specially). ``starttime`` is the process's start time
    when the caller already read it (with a pidfd pinning the process); it
    keys the cache against pid reuse. ``maps`` is a /proc/PID/maps the caller
    has just read (only used when the cache has no answer).
    """
    return find_sequence(
        pid, arch, (arch.syscall_insn,), avoid=avoid, starttime=starttime, maps=maps
    )


def find_sequence(
    pid: int,
    arch: Arch,
    patterns: Sequence[bytes],
    avoid: Iterable[int] = (),
    starttime: Optional[int] = None,
    maps: Optional[Sequence[procfs.Mapping]] = None,
    what: str = "a syscall instruction",
) -> int:
    """The address of one of the byte ``patterns`` (machine code the engine will
    run: a syscall instruction, ``syscall; ret``, an ``rt_sigreturn`` sequence)
    in an executable mapping of ``pid``, libc first. See
    :func:`find_syscall_gadget` for the other arguments."""
    patterns = tuple(patterns)
    avoid = tuple(avoid)
    if starttime is None:
        starttime = procfs.stat(pid).starttime
    key = (pid, starttime, patterns)
    cached = _cache.get(key)
    if cached and cached not in avoid and _still_valid(pid, cached, patterns):
        return cached
    candidates = _candidates(pid, maps)
    hit = _from_disk(pid, candidates, patterns, arch.insn_align, avoid)
    for m in [] if hit else candidates:
        hit = _scan(pid, m, patterns, arch.insn_align, avoid)
        if hit:
            _remember(m, patterns, hit)
            break
    if hit:
        if len(_cache) >= 4096:
            _cache.clear()
        _cache[key] = hit
        return hit
    raise SerrinjError(
        f"process {pid} has no readable executable mapping with {what}",
        hint="serrinj borrows existing machine code and never writes code",
    )
