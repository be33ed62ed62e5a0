"""The lab's initramfs, in three concatenated pieces.

``base``
    busybox, Python with its stdlib, the wheels (site-packages), and the shared
    libraries these need: the ELF closure of every binary and extension module,
    resolved over the unpacked Debian packages. Cached by a key of its inputs.
``nested``
    the inner VMM (Debian's arm64 ``qemu-system-aarch64``) with the libraries it
    needs beyond the base's, plus a kernel and a tiny initramfs for a nested
    Linux guest. Cached, optional (``--no-qemu``).
``project``
    serrinj from the working tree, the in-lab runner and suite, and ``/init``.
    Rebuilt on every run (it is small); its ``/init`` overrides the base's.

The kernel unpacks concatenated archives in order, a later entry replacing an
earlier one (BRIEF section 9), so the expensive pieces never need rebuilding
for a change to serrinj or to a test.

Python files are compiled ahead of time with the host's CPython when it is the
lab's version (bytecode does not depend on the architecture): importing
pytest from source under emulation would cost seconds on every boot.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import marshal
import os
import posixpath
import stat
import sys
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

from lab.arm64 import config, cpio, elf, wheels
from lab.arm64.config import say
from lab.arm64.debian import Package, unpack

SITE = "usr/lib/python3/dist-packages"
STDLIB = f"usr/lib/python{config.PYTHON_VERSION}"
LIBDIR = "usr/lib/aarch64-linux-gnu"
PROJECT = "opt/serrinj"
NESTED = "opt/lab/nested"
#: read by lab.guest.runner
RUN_SETTINGS = "etc/lab/run.json"
#: where the loader looks without an ld.so.cache (Debian's multiarch defaults)
LOADER_DIRS = ("lib/aarch64-linux-gnu", "usr/lib/aarch64-linux-gnu", "lib", "usr/lib")

_HERE = os.path.dirname(os.path.abspath(__file__))
_GUEST = os.path.join(os.path.dirname(_HERE), "guest")

BASE_INIT = """#!/bin/sh
# The base image alone: the project piece (with the real /init) was not appended.
/bin/busybox mount -t proc proc /proc
echo "@@LAB@@ ERROR the project initramfs piece is missing (base image booted alone)"
/bin/busybox poweroff -f
"""

ETC_PASSWD = "root:x:0:0:root:/root:/bin/sh\n"
ETC_GROUP = "root:x:0:\n"


class BuildError(RuntimeError):
    """The initramfs could not be assembled."""


@dataclass(frozen=True)
class Userland:
    """The resolved, downloaded arm64 userland packages."""

    packages: Mapping[str, Package]
    debs: Mapping[str, str]
    unpack_dir: str

    def root(self, name: str) -> str:
        """The unpacked tree of package ``name`` (unpacking it on first use)."""
        pkg = self.packages[name]
        return unpack(self.debs[name], os.path.join(self.unpack_dir, pkg.stem))

    def roots(self) -> List[str]:
        return [self.root(n) for n in sorted(self.packages)]


# --- paths ------------------------------------------------------------------------


def usr_merged(path: str) -> str:
    """The archive path of a package path in the image's merged-/usr layout."""
    rel = path.lstrip("/")
    top = rel.split("/", 1)[0]
    return "usr/" + rel if top in ("bin", "sbin", "lib") else rel


def resolve_in_root(root: str, rel: str, hops: int = 40) -> Optional[str]:
    """The regular file ``rel`` names inside the unpacked tree ``root``, symlinks followed
    within that tree (an absolute link means the tree's root, not the host's)."""
    parts = [p for p in rel.strip("/").split("/") if p]
    done: List[str] = []
    while parts:
        part = parts.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        if part == ".":
            continue
        candidate = os.path.join(root, *done, part)
        if os.path.islink(candidate):
            hops -= 1
            if hops < 0:
                return None
            target = os.readlink(candidate)
            if target.startswith("/"):
                done = []
            parts = [p for p in target.strip("/").split("/") if p] + parts
            continue
        done.append(part)
    full = os.path.join(root, *done)
    return full if os.path.isfile(full) else None


# --- building blocks --------------------------------------------------------------


def skeleton(tree: cpio.Tree) -> None:
    """Directories, the merged-/usr links and the few files every boot needs."""
    for d in ("usr/bin", "usr/sbin", LIBDIR, "proc", "sys", "dev", "run", "root", "etc", "mnt"):
        tree.mkdir(d)
    tree.mkdir("tmp", 0o1777)
    for link in ("bin", "sbin", "lib"):
        tree.add_symlink(link, f"usr/{link}")
    # /dev/console must exist before devtmpfs is mounted, for init's stdio
    tree.add_chardev("dev/console", 5, 1)
    tree.add_bytes("etc/passwd", ETC_PASSWD)
    tree.add_bytes("etc/group", ETC_GROUP)


def add_payload(
    tree: cpio.Tree,
    root: str,
    prefixes: Sequence[str],
    prune: Sequence[str] = (),
) -> int:
    """Copy the files of an unpacked package under ``prefixes`` (symlinks dereferenced)."""
    count = 0
    for prefix in prefixes:
        start = os.path.join(root, prefix)
        if os.path.isfile(start) or os.path.islink(start):
            walk: Iterable[Tuple[str, List[str], List[str]]] = [
                (os.path.dirname(start), [], [os.path.basename(start)])
            ]
        elif os.path.isdir(start):
            walk = os.walk(start)
        else:
            raise BuildError(f"{os.path.basename(root)} has no {prefix}")
        for dirpath, dirs, files in walk:
            rel_dir = os.path.relpath(dirpath, root)
            dirs[:] = [
                d for d in dirs if d != "__pycache__" and posixpath.join(rel_dir, d) not in prune
            ]
            for name in files:
                rel = os.path.normpath(os.path.join(rel_dir, name))
                real = resolve_in_root(root, rel)
                if real is None:
                    continue  # a link out of this package (e.g. to /etc): not needed
                tree.add_file(usr_merged(rel), real)
                count += 1
    return count


def system_index(roots: Iterable[str]) -> Dict[str, Tuple[str, elf.ElfInfo]]:
    """soname -> (host file, ELF facts) for every library in the loader's default dirs."""
    index: Dict[str, Tuple[str, elf.ElfInfo]] = {}
    for root in roots:
        for d in LOADER_DIRS:
            full = os.path.join(root, d)
            if not os.path.isdir(full):
                continue
            for name in sorted(os.listdir(full)):
                if ".so" not in name or name in index:
                    continue
                real = resolve_in_root(root, posixpath.join(d, name))
                if real is None:
                    continue
                info = elf.read_elf_file(real)
                if info is not None:
                    index[name] = (real, info)
    return index


def tree_elves(tree: cpio.Tree) -> Dict[str, elf.ElfInfo]:
    """Every ELF file in ``tree``, by archive path."""
    found: Dict[str, elf.ElfInfo] = {}
    for path, entry in tree.items():
        if entry.kind != stat.S_IFREG:
            continue
        if entry.source is not None:
            info = elf.read_elf_file(entry.source)
        elif elf.is_elf(entry.data):
            info = elf.read_elf(entry.data)
        else:
            info = None
        if info is not None:
            if info.machine != elf.EM_AARCH64:
                raise BuildError(f"{path} is not an arm64 ELF (e_machine {info.machine})")
            found[path] = info
    return found


def add_closure(
    tree: cpio.Tree,
    index: Mapping[str, Tuple[str, elf.ElfInfo]],
    already: Set[str] = frozenset(),  # type: ignore[assignment]
    extra: Sequence[str] = (),
) -> Set[str]:
    """Add the libraries the tree's ELF files need; returns the sonames the tree relies on."""
    found = elf.closure(tree_elves(tree), {k: v[1] for k, v in index.items()}, extra)
    if found.unresolved:
        lines = ", ".join(f"{who} needs {name}" for who, name in found.unresolved[:12])
        raise BuildError(f"unresolved shared libraries: {lines}")
    for soname in sorted(found.libraries):
        if soname not in already:
            tree.add_file(posixpath.join(LIBDIR, soname), index[soname][0], mode=0o755)
    for interp in sorted(found.interpreters):
        name = posixpath.basename(interp)
        if name in already:
            continue
        if name not in index:
            raise BuildError(f"no package provides the ELF interpreter {interp}")
        if usr_merged(interp) not in tree:
            tree.add_file(usr_merged(interp), index[name][0], mode=0o755)
    return set(found.libraries) | {posixpath.basename(i) for i in found.interpreters}


def can_precompile() -> bool:
    """Whether this interpreter writes bytecode the lab's Python can load."""
    return sys.implementation.name == "cpython" and (
        f"{sys.version_info[0]}.{sys.version_info[1]}" == config.PYTHON_VERSION
    )


def pyc_bytes(source: bytes, display_path: str, checked: bool) -> Optional[bytes]:
    """A hash-based .pyc (PEP 552) of ``source``; ``None`` when it does not compile."""
    try:
        code = compile(source, display_path, "exec", dont_inherit=True, optimize=0)
    except (SyntaxError, ValueError):
        return None
    flags = 0b01 | (0b10 if checked else 0)
    header = importlib.util.MAGIC_NUMBER + flags.to_bytes(4, "little")
    return header + importlib.util.source_hash(source) + marshal.dumps(code)


def precompile(tree: cpio.Tree, prefixes: Sequence[str], checked: bool) -> int:
    """Add ``__pycache__/*.pyc`` for every .py under ``prefixes``.

    ``checked=False`` (unchecked-hash) for the immutable base; ``True`` for the
    project, which a developer may edit in place in ``lab-shell``.
    """
    if not can_precompile():
        return 0
    tag = sys.implementation.cache_tag
    count = 0
    for path, entry in list(tree.items()):
        if not path.endswith(".py") or not any(path.startswith(p) for p in prefixes):
            continue
        if entry.kind != stat.S_IFREG:
            continue
        if entry.source is not None:
            with open(entry.source, "rb") as fh:
                source = fh.read()
        else:
            source = entry.data
        data = pyc_bytes(source, "/" + path, checked)
        if data is None:
            continue
        head, name = posixpath.split(path)
        tree.add_bytes(posixpath.join(head, "__pycache__", f"{name[:-3]}.{tag}.pyc"), data)
        count += 1
    return count


# --- the pieces ---------------------------------------------------------------------


def fingerprint(parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _source_digest(paths: Iterable[str]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        with open(p, "rb") as fh:
            h.update(os.path.basename(p).encode() + b"\0" + fh.read())
    return h.hexdigest()[:16]


def builder_digest() -> str:
    """Changes whenever the code that decides an image's content changes."""
    names = ("config.py", "cpio.py", "debian.py", "elf.py", "initramfs.py", "wheels.py")
    return _source_digest(os.path.join(_HERE, n) for n in names)


def base_key(userland: Userland, wheel_files: Sequence[str]) -> str:
    return fingerprint(
        {
            "debs": sorted((p.name, p.version, p.sha256) for p in userland.packages.values()),
            "wheels": [os.path.basename(w) for w in wheel_files],
            "builder": builder_digest(),
            "pyc": sys.implementation.cache_tag if can_precompile() else None,
        }
    )


def build_base(userland: Userland, wheel_files: Sequence[str], out: str) -> Set[str]:
    """Assemble and write the base piece; returns the sonames it provides."""
    tree = cpio.Tree()
    skeleton(tree)
    say("base: unpacking packages")
    roots = userland.roots()
    for name, prefixes in config.BASE_PAYLOAD.items():
        if name not in userland.packages:
            raise BuildError(f"{name} is not in the resolved userland")
        prune = [posixpath.join(STDLIB, p) for p in config.PYTHON_PRUNE]
        add_payload(tree, userland.root(name), prefixes, prune)
    tree.add_symlink("usr/bin/python3", f"python{config.PYTHON_VERSION}")
    # /init is a script: /bin/sh must exist before busybox installs its applets
    tree.add_symlink("usr/bin/sh", "busybox")
    for wheel in wheel_files:
        wheels.install(wheel, tree, SITE)
    sonames = add_closure(tree, system_index(roots), extra=config.DLOPEN_EXTRA)
    tree.add_bytes("init", BASE_INIT, mode=0o755)
    n = precompile(tree, (STDLIB, SITE), checked=False)
    say(f"base: {len(tree)} entries, {len(sonames)} shared libraries, {n} modules precompiled")
    cpio.write_file(tree, out, compress=True)
    return sonames


def build_nested_initrd(busybox: str) -> bytes:
    """The nested guest's initramfs: static busybox and an /init that prints a marker."""
    tree = cpio.Tree()
    for d in ("proc", "sys", "dev", "tmp"):
        tree.mkdir(d)
    tree.mkdir("bin")
    tree.add_file("bin/busybox", busybox, mode=0o755)
    tree.add_symlink("bin/sh", "busybox")
    tree.add_chardev("dev/console", 5, 1)
    with open(os.path.join(_GUEST, "nested_init.sh"), "rb") as fh:
        tree.add_bytes("init", fh.read(), mode=0o755)
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
        cpio.write(tree, gz)  # type: ignore[arg-type]
    return buf.getvalue()


def nested_key(base: str, kernel: Package) -> str:
    init = _source_digest([os.path.join(_GUEST, "nested_init.sh")])
    return fingerprint({"base": base, "kernel": kernel.sha256, "init": init})


def build_nested(userland: Userland, base_sonames: Set[str], kernel_image: str, out: str) -> None:
    """The inner VMM and a nested guest (kernel + initramfs), on top of the base."""
    tree = cpio.Tree()
    roots = userland.roots()
    for name, prefixes in config.NESTED_PAYLOAD.items():
        add_payload(tree, userland.root(name), prefixes)
    elves = set(tree_elves(tree))
    added = add_closure(tree, system_index(roots), already=base_sonames)
    busybox = resolve_in_root(userland.root("busybox-static"), "bin/busybox")
    if busybox is None:
        raise BuildError("busybox-static has no bin/busybox")
    tree.add_file(posixpath.join(NESTED, "Image"), kernel_image, mode=0o644)
    tree.add_bytes(posixpath.join(NESTED, "initrd.cpio.gz"), build_nested_initrd(busybox))
    extra = len(added - base_sonames)
    say(f"nested: {len(elves)} program(s), {extra} extra shared libraries, guest kernel + initrd")
    cpio.write_file(tree, out, compress=True)


def _project_files(repo: str) -> Iterable[Tuple[str, str]]:
    """(archive path, host file) of what the project piece carries from the tree."""
    wanted = [
        ("serrinj", None),
        ("lab", ("arm64",)),
        ("tests", ("data",)),
        # the campaign examples run for real in the lab (lab/suite/test_campaign_arm64.py)
        ("examples", ("ansible",)),
    ]
    for top, skip in wanted:
        base = os.path.join(repo, top)
        for dirpath, dirs, files in os.walk(base):
            rel_dir = os.path.relpath(dirpath, repo)
            dirs[:] = sorted(
                d
                for d in dirs
                if d != "__pycache__"
                and not d.startswith(".")
                and not (skip and rel_dir == top and d in skip)
            )
            for name in sorted(files):
                if name.endswith((".pyc", ".pyo")) or name.startswith("."):
                    continue
                yield posixpath.join(PROJECT, rel_dir, name), os.path.join(dirpath, name)
    yield posixpath.join(PROJECT, "pyproject.toml"), os.path.join(repo, "pyproject.toml")


def build_project(repo: str, out: str, pytest_args: Sequence[str] = ()) -> int:
    """serrinj and the suite from the working tree, the guest runner and ``/init``.

    ``pytest_args`` replace the default selection (the whole suite) in ``run`` mode.
    """
    tree = cpio.Tree()
    tree.add_bytes(RUN_SETTINGS, json.dumps({"pytest_args": list(pytest_args)}) + "\n")
    count = 0
    for arc, src in _project_files(repo):
        tree.add_file(arc, src)
        count += 1
    with open(os.path.join(_GUEST, "init.sh"), "rb") as fh:
        tree.add_bytes("init", fh.read(), mode=0o755)
    tree.add_bytes(
        "usr/bin/serrinj",
        "#!/usr/bin/python3\nfrom serrinj.__main__ import main\nmain()\n",
        mode=0o755,
    )
    tree.add_bytes(
        "usr/bin/lab-suite",
        "#!/bin/sh\n# Run the lab suite (or the pytest arguments given) as `run` does.\n"
        'exec python3 -m lab.guest.runner --suite-only "$@"\n',
        mode=0o755,
    )
    precompile(tree, (PROJECT,), checked=True)
    cpio.write_file(tree, out, compress=True)
    return count
