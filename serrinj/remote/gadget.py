"""Find an existing syscall instruction in the target's executable mappings.

The engine never writes code into a VMM: its other threads keep running and
could execute a half-written instruction. Instead the thread's pc is pointed
at a syscall instruction that is already there, in libc (or, for a static
VMM, in its own text). Results are cached per process and re-validated with a
2-byte (4-byte) read before each use.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

from serrinj import _native, procfs
from serrinj.errors import SerrinjError
from serrinj.remote.arch import Arch

_CHUNK = 1 << 20
_cache: Dict[Tuple[int, int], int] = {}
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


def _candidates(pid: int) -> List[procfs.Mapping]:
    exe = procfs.exe(pid) or ""
    maps = [m for m in procfs.maps(pid) if m.readable and m.executable and m.path not in _EXCLUDED]
    return sorted(maps, key=lambda m: _rank(m, exe))


def _scan(pid: int, m: procfs.Mapping, arch: Arch, avoid: Iterable[int]) -> int:
    insn = arch.syscall_insn
    avoid = set(avoid)
    addr = m.start
    while addr < m.end:
        size = min(_CHUNK, m.end - addr)
        try:
            data = _native.process_vm_read(pid, addr, size)
        except OSError:
            return 0
        pos = data.find(insn)
        while pos >= 0:
            hit = addr + pos
            if hit % arch.insn_align == 0 and hit not in avoid:
                return hit
            pos = data.find(insn, pos + 1)
        # an instruction split across chunks is simply found in the next window
        addr += size - (len(insn) - 1) if size == _CHUNK else size
    return 0


def _still_valid(pid: int, addr: int, arch: Arch) -> bool:
    try:
        return _native.process_vm_read(pid, addr, len(arch.syscall_insn)) == arch.syscall_insn
    except OSError:
        return False


def find_syscall_gadget(
    pid: int, arch: Arch, avoid: Iterable[int] = (), starttime: Optional[int] = None
) -> int:
    """The address of a syscall instruction in an executable mapping of ``pid``.

    ``avoid`` lists addresses that must not be used (on aarch64, the
    instruction the thread will restart at: the kernel treats a pc equal to
    its restart address specially). ``starttime`` is the process's start time
    when the caller already read it (with a pidfd pinning the process); it
    keys the cache against pid reuse.
    """
    avoid = tuple(avoid)
    if starttime is None:
        starttime = procfs.stat(pid).starttime
    key = (pid, starttime)
    cached = _cache.get(key)
    if cached and cached not in avoid and _still_valid(pid, cached, arch):
        return cached
    for m in _candidates(pid):
        hit = _scan(pid, m, arch, avoid)
        if hit:
            _cache[key] = hit
            return hit
    raise SerrinjError(
        f"process {pid} has no readable executable mapping with a syscall instruction",
        hint="serrinj borrows an existing syscall instruction and never writes code",
    )
