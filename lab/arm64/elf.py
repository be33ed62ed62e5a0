"""Shared-library closure of ELF programs, computed without running them.

The lab's programs are arm64 binaries that this (x86_64) host cannot execute,
so ``ldd`` is out. Instead each file's dynamic section is read (what
``aarch64-linux-gnu-readelf -d`` prints: NEEDED, RUNPATH/RPATH, SONAME) and the
loader's search is replayed over the unpacked Debian packages.

Everything here is pure: :func:`read_elf` parses bytes, :func:`closure` works on
plain mappings, so both are unit-tested on the host.
"""

from __future__ import annotations

import os
import posixpath
import struct
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

EM_AARCH64 = 183
EM_X86_64 = 62

_PT_LOAD = 1
_PT_DYNAMIC = 2
_PT_INTERP = 3
_DT_NULL = 0
_DT_NEEDED = 1
_DT_STRTAB = 5
_DT_SONAME = 14
_DT_RPATH = 15
_DT_RUNPATH = 29


class ElfError(ValueError):
    """The bytes are not a 64-bit little-endian ELF file this module understands."""


@dataclass(frozen=True)
class ElfInfo:
    """The dynamic-linking facts of one ELF file."""

    machine: int
    interp: Optional[str] = None
    needed: Tuple[str, ...] = ()
    soname: Optional[str] = None
    #: RUNPATH entries, or RPATH when there is no RUNPATH (the loader's rule)
    runpath: Tuple[str, ...] = ()


def is_elf(head: bytes) -> bool:
    """Whether ``head`` (the first bytes of a file) starts an ELF image."""
    return head[:4] == b"\x7fELF"


def read_elf(raw: bytes) -> ElfInfo:
    """Parse the program headers and dynamic section of a 64-bit little-endian ELF."""
    if not is_elf(raw) or len(raw) < 64:
        raise ElfError("not an ELF file")
    if raw[4] != 2 or raw[5] != 1:
        raise ElfError("only 64-bit little-endian ELF is supported")
    (machine,) = struct.unpack_from("<H", raw, 18)
    phoff, phentsize, phnum = (
        struct.unpack_from("<Q", raw, 32)[0],
        *struct.unpack_from("<HH", raw, 54),
    )
    loads: List[Tuple[int, int, int]] = []  # (vaddr, offset, filesz)
    dynamic: Optional[Tuple[int, int]] = None
    interp: Optional[str] = None
    for i in range(phnum):
        base = phoff + i * phentsize
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", raw, base
        )
        if p_type == _PT_LOAD:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == _PT_DYNAMIC:
            dynamic = (p_offset, p_filesz)
        elif p_type == _PT_INTERP:
            interp = raw[p_offset : p_offset + p_filesz].split(b"\0", 1)[0].decode()
    if dynamic is None:
        return ElfInfo(machine=machine, interp=interp)  # static: nothing to load

    entries: List[Tuple[int, int]] = []
    off, size = dynamic
    for pos in range(off, off + size, 16):
        tag, val = struct.unpack_from("<qQ", raw, pos)
        if tag == _DT_NULL:
            break
        entries.append((tag, val))
    strtab_vaddr = next((v for t, v in entries if t == _DT_STRTAB), None)
    if strtab_vaddr is None:
        raise ElfError("dynamic section without DT_STRTAB")
    strtab = _vaddr_to_offset(strtab_vaddr, loads)

    def string(index: int) -> str:
        start = strtab + index
        return raw[start : raw.index(b"\0", start)].decode()

    needed = tuple(string(v) for t, v in entries if t == _DT_NEEDED)
    soname = next((string(v) for t, v in entries if t == _DT_SONAME), None)
    runpath = [string(v) for t, v in entries if t == _DT_RUNPATH]
    if not runpath:
        runpath = [string(v) for t, v in entries if t == _DT_RPATH]
    dirs = tuple(d for item in runpath for d in item.split(":") if d)
    return ElfInfo(machine=machine, interp=interp, needed=needed, soname=soname, runpath=dirs)


def _vaddr_to_offset(vaddr: int, loads: Iterable[Tuple[int, int, int]]) -> int:
    for seg_vaddr, seg_offset, seg_filesz in loads:
        if seg_vaddr <= vaddr < seg_vaddr + seg_filesz:
            return vaddr - seg_vaddr + seg_offset
    raise ElfError(f"address {vaddr:#x} is in no PT_LOAD segment")


def read_elf_file(path: str) -> Optional[ElfInfo]:
    """:func:`read_elf` of a host file, or ``None`` when it is not ELF."""
    with open(path, "rb") as fh:
        if not is_elf(fh.read(4)):
            return None
        fh.seek(0)
        return read_elf(fh.read())


@dataclass
class Closure:
    """What :func:`closure` found."""

    #: system sonames to install, each with the first file that needed it
    libraries: Dict[str, str] = field(default_factory=dict)
    #: ELF interpreters named by PT_INTERP (e.g. ``/lib/ld-linux-aarch64.so.1``)
    interpreters: set[str] = field(default_factory=set)
    #: (file, soname) pairs the loader could not satisfy
    unresolved: List[Tuple[str, str]] = field(default_factory=list)


def closure(
    payload: Mapping[str, ElfInfo],
    system: Mapping[str, ElfInfo],
    extra: Iterable[str] = (),
) -> Closure:
    """The system libraries needed by the ELF files of ``payload``.

    ``payload`` maps archive paths (``usr/bin/python3.11``) to their ELF facts;
    a NEEDED name is first looked for along the file's RUNPATH (with
    ``$ORIGIN`` expanded, so a wheel's bundled ``foo.libs/`` is found in the
    payload itself), then in ``system``, which maps sonames to the libraries in
    the loader's default directories. ``extra`` names sonames that are loaded
    with ``dlopen`` (invisible in NEEDED) and must be present anyway.
    """
    result = Closure()
    queue: List[Tuple[str, str, ElfInfo]] = []  # (requester, its archive path or "", info)
    for path, info in sorted(payload.items()):
        queue.append((path, path, info))
    for name in extra:
        if name in system:
            result.libraries.setdefault(name, "(dlopen)")
            queue.append((f"(dlopen) {name}", "", system[name]))
        else:
            result.unresolved.append(("(dlopen)", name))
    seen_payload = set(payload)
    while queue:
        requester, path, info = queue.pop(0)
        if info.interp:
            result.interpreters.add(info.interp)
        for name in info.needed:
            local = _along_runpath(path, info.runpath, name, payload)
            if local is not None:
                if local not in seen_payload:
                    seen_payload.add(local)
                    queue.append((local, local, payload[local]))
                continue
            if name in result.libraries:
                continue
            lib = system.get(name)
            if lib is None:
                result.unresolved.append((requester, name))
                continue
            result.libraries[name] = requester
            queue.append((name, "", lib))
    return result


def _along_runpath(
    path: str, runpath: Tuple[str, ...], name: str, payload: Mapping[str, ElfInfo]
) -> Optional[str]:
    if not path:
        return None
    origin = posixpath.dirname(path)
    for entry in runpath:
        expanded = entry.replace("${ORIGIN}", "$ORIGIN").replace("$ORIGIN", "/" + origin)
        candidate = posixpath.normpath(posixpath.join(expanded, name)).lstrip("/")
        if candidate in payload:
            return candidate
    return None


def scan_tree(root: str) -> Dict[str, ElfInfo]:
    """Every regular ELF file under host directory ``root``, by path relative to it."""
    found: Dict[str, ElfInfo] = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            full = os.path.join(dirpath, name)
            if os.path.islink(full) or not os.path.isfile(full):
                continue
            info = read_elf_file(full)
            if info is not None:
                found[os.path.relpath(full, root)] = info
    return found
