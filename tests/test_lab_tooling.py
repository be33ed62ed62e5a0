"""Host-side tests of the arm64 lab's tooling: the pure parts (``make lab-arm64`` runs the rest).

The cpio writer is checked against GNU cpio, the ELF reader against readelf,
and the pytest plugin together with the host's parser on a real pytest run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

from lab import protocol, skips
from lab.arm64 import __main__ as lab_main
from lab.arm64 import boot, config, cpio, debian, elf, initramfs, prepare, wheels
from lab.guest import env, nested
from tests.conftest import missing, need_tool

REPO = Path(__file__).resolve().parents[1]


def _need(present: bool, what: str) -> None:
    """A missing host tool skips the test, except in CI, where it fails
    (:func:`tests.conftest.missing`)."""
    if not present:
        missing(what)


# --- cpio -------------------------------------------------------------------------


def _sample_tree(tmp_path: Path) -> cpio.Tree:
    src = tmp_path / "payload.bin"
    src.write_bytes(b"\x7fELF-not-really" * 3)
    os.chmod(src, 0o750)
    tree = cpio.Tree()
    tree.add_bytes("etc/passwd", "root:x:0:0::/root:/bin/sh\n")
    tree.add_file("usr/bin/tool", str(src))
    tree.add_symlink("bin", "usr/bin")
    tree.add_chardev("dev/console", 5, 1)
    tree.mkdir("tmp", 0o1777)
    tree.add_bytes("odd", b"12345")  # a size that needs padding
    return tree


def _archive(tree: cpio.Tree, tmp_path: Path, name: str = "a.cpio") -> Path:
    out = tmp_path / name
    with open(out, "wb") as fh:
        cpio.write(tree, fh)
    return out


def test_cpio_round_trip(tmp_path: Path) -> None:
    raw = _archive(_sample_tree(tmp_path), tmp_path).read_bytes()
    assert len(raw) % 4 == 0
    members = {m.name: m for m in cpio.read(raw)}
    assert sorted(members) == [
        "bin",
        "dev",
        "dev/console",
        "etc",
        "etc/passwd",
        "odd",
        "tmp",
        "usr",
        "usr/bin",
        "usr/bin/tool",
    ]
    assert members["usr/bin/tool"].data == b"\x7fELF-not-really" * 3
    assert stat.S_IMODE(members["usr/bin/tool"].mode) == 0o750
    assert stat.S_ISLNK(members["bin"].mode) and members["bin"].data == b"usr/bin"
    assert stat.S_ISCHR(members["dev/console"].mode) and members["dev/console"].rdev == (5, 1)
    assert stat.S_IMODE(members["tmp"].mode) == 0o1777
    assert members["odd"].data == b"12345"


def test_cpio_parents_come_first_and_output_is_deterministic(tmp_path: Path) -> None:
    tree = _sample_tree(tmp_path)
    first = _archive(tree, tmp_path, "1.cpio").read_bytes()
    assert first == _archive(tree, tmp_path, "2.cpio").read_bytes()
    seen: List[str] = []
    for m in cpio.read(first):
        parent = os.path.dirname(m.name)
        assert not parent or parent in seen
        seen.append(m.name)


def test_cpio_later_entry_replaces_and_pieces_concatenate(tmp_path: Path) -> None:
    base, project = cpio.Tree(), cpio.Tree()
    base.add_bytes("init", "#!/bin/sh\necho base\n", mode=0o755)
    project.add_bytes("init", "#!/bin/sh\necho project\n", mode=0o755)
    raw = _archive(base, tmp_path, "b").read_bytes() + _archive(project, tmp_path, "p").read_bytes()
    inits = [m.data for m in cpio.read(raw) if m.name == "init"]
    assert inits == [b"#!/bin/sh\necho base\n", b"#!/bin/sh\necho project\n"]


def test_cpio_tree_refuses_bad_paths() -> None:
    tree = cpio.Tree()
    tree.add_symlink("lib", "usr/lib")
    with pytest.raises(ValueError, match="through the symlink"):
        tree.add_bytes("lib/libc.so.6", b"")
    with pytest.raises(ValueError):
        tree.add_bytes("../escape", b"")
    tree.add_bytes("/usr/./lib//x", b"1")
    assert "usr/lib/x" in tree


def test_cpio_matches_gnu_cpio(tmp_path: Path) -> None:
    _need(shutil.which("cpio") is not None, "GNU cpio is not installed: make deps")
    tree = _sample_tree(tmp_path)
    path = _archive(tree, tmp_path)
    with open(path, "rb") as fh:
        listing = subprocess.run(
            ["cpio", "-i", "-t", "--quiet"], stdin=fh, capture_output=True, check=True
        )
    assert listing.stdout.decode().split() == list(tree.paths())
    out = tmp_path / "x"
    out.mkdir()
    gz = tmp_path / "a.cpio.gz"
    nodev = cpio.Tree()
    for p, e in tree.items():
        if e.kind != stat.S_IFCHR:
            nodev._entries[p] = e  # extracting a device node needs CAP_MKNOD
    cpio.write_file(nodev, str(gz), compress=True)
    subprocess.run(
        f"gzip -dc {gz} | cpio -i -d --quiet --no-absolute-filenames",
        shell=True,
        cwd=out,
        check=True,
    )
    assert (out / "usr/bin/tool").read_bytes() == b"\x7fELF-not-really" * 3
    assert os.readlink(out / "bin") == "usr/bin"
    assert (out / "odd").read_bytes() == b"12345"


# --- ELF --------------------------------------------------------------------------


def _readelf_needed(path: str, readelf: str = "readelf") -> List[str]:
    out = subprocess.run([readelf, "-d", path], capture_output=True, text=True, check=True).stdout
    return [
        line.split("[", 1)[1].split("]", 1)[0] for line in out.splitlines() if "(NEEDED)" in line
    ]


def test_read_elf_matches_readelf_on_a_host_binary() -> None:
    _need(shutil.which("readelf") is not None, "readelf (binutils) is not installed: make deps")
    path = os.path.realpath(shutil.which("ls") or "/bin/ls")  # a dynamic Debian binary
    info = elf.read_elf_file(path)
    assert info is not None
    assert info.machine == elf.EM_X86_64
    assert list(info.needed) == _readelf_needed(path)
    assert info.interp is not None and "ld-linux" in info.interp


def test_read_elf_rejects_non_elf(tmp_path: Path) -> None:
    text = tmp_path / "script"
    text.write_text("#!/bin/sh\n")
    assert elf.read_elf_file(str(text)) is None
    with pytest.raises(elf.ElfError):
        elf.read_elf(b"\x7fELF" + b"\x01" * 60)  # 32-bit


@pytest.mark.cross
def test_read_elf_on_an_arm64_library(tmp_path: Path) -> None:
    src = tmp_path / "lib.c"
    src.write_text("#include <math.h>\ndouble f(double x) { return sqrt(x); }\n")
    lib = tmp_path / "libdemo.so.1"
    subprocess.run(
        [
            "aarch64-linux-gnu-gcc",
            "-shared",
            "-fPIC",
            "-o",
            str(lib),
            str(src),
            "-lm",
            "-Wl,-soname,libdemo.so.1",
            "-Wl,-rpath,$ORIGIN/demo.libs:/opt/x",
            "-Wl,--enable-new-dtags",
        ],
        check=True,
    )
    info = elf.read_elf_file(str(lib))
    assert info is not None
    assert info.machine == elf.EM_AARCH64
    assert info.soname == "libdemo.so.1"
    assert list(info.needed) == _readelf_needed(str(lib), "aarch64-linux-gnu-readelf")
    assert "libm.so.6" in info.needed
    assert info.runpath == ("$ORIGIN/demo.libs", "/opt/x")
    assert info.interp is None


def test_closure_follows_needed_runpath_and_dlopen_extras() -> None:
    arm = elf.EM_AARCH64
    payload = {
        "usr/bin/prog": elf.ElfInfo(arm, "/lib/ld-linux-aarch64.so.1", ("libA.so.1", "libc.so.6")),
        "site/_ext.so": elf.ElfInfo(
            arm, None, ("libffi-1a2b.so.8",), runpath=("$ORIGIN/ext.libs",)
        ),
        "site/ext.libs/libffi-1a2b.so.8": elf.ElfInfo(arm, None, ("libc.so.6",)),
        "usr/bin/static": elf.ElfInfo(arm),
    }
    system = {
        "libA.so.1": elf.ElfInfo(arm, None, ("libB.so.2",)),
        "libB.so.2": elf.ElfInfo(arm, None, ("libc.so.6",)),
        "libc.so.6": elf.ElfInfo(arm, None, ("ld-linux-aarch64.so.1",)),
        "ld-linux-aarch64.so.1": elf.ElfInfo(arm),
        "libgcc_s.so.1": elf.ElfInfo(arm, None, ("libc.so.6",)),
        "libunused.so.3": elf.ElfInfo(arm),
    }
    found = elf.closure(payload, system, extra=["libgcc_s.so.1"])
    assert found.unresolved == []
    assert set(found.libraries) == {
        "libA.so.1",
        "libB.so.2",
        "libc.so.6",
        "ld-linux-aarch64.so.1",
        "libgcc_s.so.1",
    }
    assert found.libraries["libB.so.2"] == "libA.so.1"  # who pulled it in
    assert found.interpreters == {"/lib/ld-linux-aarch64.so.1"}


def test_closure_reports_what_is_missing_and_who_needs_it() -> None:
    arm = elf.EM_AARCH64
    payload = {"usr/bin/qemu": elf.ElfInfo(arm, None, ("libglib-2.0.so.0",))}
    system = {"libglib-2.0.so.0": elf.ElfInfo(arm, None, ("libpcre2-8.so.0",))}
    found = elf.closure(payload, system, extra=["libgone.so.1"])
    assert ("libglib-2.0.so.0", "libpcre2-8.so.0") in found.unresolved
    assert ("(dlopen)", "libgone.so.1") in found.unresolved


# --- the image builder's path handling and bytecode -----------------------------------


def test_usr_merged_layout() -> None:
    assert initramfs.usr_merged("/lib/ld-linux-aarch64.so.1") == "usr/lib/ld-linux-aarch64.so.1"
    assert initramfs.usr_merged("bin/busybox") == "usr/bin/busybox"
    assert initramfs.usr_merged("usr/lib/python3.11/os.py") == "usr/lib/python3.11/os.py"
    assert (
        initramfs.usr_merged("etc/python3.11/sitecustomize.py") == "etc/python3.11/sitecustomize.py"
    )


def test_resolve_in_root_stays_inside_the_package(tmp_path: Path) -> None:
    root = tmp_path / "pkg"
    (root / "lib/aarch64-linux-gnu").mkdir(parents=True)
    (root / "lib/aarch64-linux-gnu/libx.so.1.2.3").write_bytes(b"x")
    os.symlink("libx.so.1.2.3", root / "lib/aarch64-linux-gnu/libx.so.1")
    os.symlink("/lib/aarch64-linux-gnu/libx.so.1", root / "lib/abs-link")
    os.symlink("../../../../../../etc/passwd", root / "lib/escape")
    real = str(root / "lib/aarch64-linux-gnu/libx.so.1.2.3")
    assert initramfs.resolve_in_root(str(root), "lib/aarch64-linux-gnu/libx.so.1") == real
    assert (
        initramfs.resolve_in_root(str(root), "lib/abs-link") == real
    )  # the tree's /, not the host's
    assert initramfs.resolve_in_root(str(root), "lib/escape") is None
    assert initramfs.resolve_in_root(str(root), "lib/missing") is None


@pytest.mark.parametrize("checked", [False, True])
def test_precompiled_bytecode_loads(tmp_path: Path, checked: bool) -> None:
    _need(
        initramfs.can_precompile(),
        f"needs CPython {config.PYTHON_VERSION}, the lab's version, to precompile its bytecode",
    )
    source = b"VALUE = 6 * 7\n"
    data = initramfs.pyc_bytes(source, "/opt/demo_mod.py", checked)
    assert data is not None
    flags = int.from_bytes(data[4:8], "little")
    assert flags == (0b11 if checked else 0b01)
    (tmp_path / "demo_mod.py").write_bytes(source)
    cache = tmp_path / "__pycache__"
    cache.mkdir()
    (cache / f"demo_mod.{sys.implementation.cache_tag}.pyc").write_bytes(data)
    spec = importlib.util.spec_from_file_location("demo_mod", tmp_path / "demo_mod.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.VALUE == 42
    assert initramfs.pyc_bytes(b"def (:\n", "/x.py", checked) is None


def test_project_piece_carries_the_working_tree(tmp_path: Path) -> None:
    out = tmp_path / "project.cpio.gz"
    initramfs.build_project(str(REPO), str(out), ["-k", "smoke"])
    import gzip

    members = {m.name: m for m in cpio.read(gzip.decompress(out.read_bytes()))}
    assert stat.S_IMODE(members["init"].mode) == 0o755
    assert members["init"].data.startswith(b"#!/bin/sh")
    assert "opt/serrinj/serrinj/__init__.py" in members
    assert "opt/serrinj/lab/suite/test_smoke.py" in members
    assert "opt/serrinj/lab/protocol.py" in members
    assert not any(n.startswith("opt/serrinj/lab/arm64") for n in members)  # host tooling stays out
    assert json.loads(members["etc/lab/run.json"].data) == {"pytest_args": ["-k", "smoke"]}
    if initramfs.can_precompile():
        tag = sys.implementation.cache_tag
        assert f"opt/serrinj/serrinj/__pycache__/__init__.{tag}.pyc" in members


def test_wheel_install_merges_data_dirs(tmp_path: Path) -> None:
    whl = tmp_path / "demo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr("demo/__init__.py", "X = 1\n")
        zf.writestr("demo-1.0.data/purelib/demo_extra.py", "Y = 2\n")
        zf.writestr("demo-1.0.data/scripts/demo", "#!python\n")
        zf.writestr("demo-1.0.dist-info/METADATA", "Name: demo\n")
    tree = cpio.Tree()
    assert wheels.install(str(whl), tree, "usr/lib/python3/dist-packages") == 3
    paths = set(tree.paths())
    assert "usr/lib/python3/dist-packages/demo/__init__.py" in paths
    assert "usr/lib/python3/dist-packages/demo_extra.py" in paths
    assert not any("scripts" in p for p in paths)


def test_wheel_requirements_include_serrinj_runtime_deps() -> None:
    reqs = wheels.requirements()
    names = {r.split(">", 1)[0].split("=", 1)[0] for r in reqs}
    assert {"click", "rich", "cffi", "pytest"} <= names


# --- apt output parsing -----------------------------------------------------------------


def test_parse_simulation() -> None:
    text = textwrap.dedent(
        """\
        NOTE: This is only a simulation!
        Inst gcc-12-base (12.2.0-14+deb12u1 Debian:12.11/stable [arm64])
        Inst libc6 [2.36-9] (2.36-9+deb12u14 Debian-Security:12/stable-security [arm64])
        Inst qemu-system-arm:arm64 (1:7.2+dfsg-7+deb12u18+b3 Debian:12.11/stable [arm64])
        Conf libc6 (2.36-9+deb12u14 Debian:12.11/stable [arm64])
        """
    )
    assert debian.parse_simulation(text) == {
        "gcc-12-base": "12.2.0-14+deb12u1",
        "libc6": "2.36-9+deb12u14",
        "qemu-system-arm": "1:7.2+dfsg-7+deb12u18+b3",
    }


def test_parse_stanzas_and_dependencies() -> None:
    text = textwrap.dedent(
        """\
        Package: linux-image-arm64
        Version: 6.12.95-1~bpo12+1
        Depends: linux-image-6.12.95+deb12-arm64 (= 6.12.95-1~bpo12+1)
        Description: Linux for 64-bit ARMv8 machines (meta-package)
         This package depends on the latest Linux kernel.

        Package: libc6
        Version: 2.36-9+deb12u14
        SHA256: abc
        """
    )
    stanzas = debian.parse_stanzas(text)
    assert [s["Package"] for s in stanzas] == ["linux-image-arm64", "libc6"]
    assert stanzas[0]["Description"].endswith("latest Linux kernel.")
    dep = debian.exact_dependency(stanzas[0]["Depends"], r"linux-image-.*-arm64")
    assert dep == ("linux-image-6.12.95+deb12-arm64", "6.12.95-1~bpo12+1")
    assert debian.exact_dependency("libc6 (>= 2.36), foo | bar (= 1)", r"bar") == ("bar", "1")
    assert debian.exact_dependency("libc6 (>= 2.36)", r"libc6") is None


def test_exact_dependencies_of_the_7x_image_metapackage() -> None:
    """Debian's 7.x image package (unstable, 2026) is a metapackage: its Image is in the
    linux-binary package it names by exact version, next to modules and base."""
    depends = (
        "dracut | initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool,"
        " linux-base-7.2.13+deb14-arm64 (= 7.2.13-1), linux-binary-7.2.13+deb14-arm64"
        " (= 7.2.13-1), linux-modules-7.2.13+deb14-arm64 (= 7.2.13-1)"
    )
    pattern = r"linux-(binary|image)-.*-arm64(-unsigned)?"
    assert debian.exact_dependencies(depends, pattern) == [
        ("linux-binary-7.2.13+deb14-arm64", "7.2.13-1")
    ]
    assert debian.exact_dependencies("initramfs-tools, kmod", pattern) == []


def _deb(tmp: Path, name: str, files: Dict[str, bytes]) -> str:
    """A minimal .deb holding ``files`` (dpkg-deb --build)."""
    root = tmp / name
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: 1\nArchitecture: arm64\nMaintainer: x <x@x>\nDescription: x\n"
    )
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    out = tmp / f"{name}.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root), str(out)],
        check=True,
        capture_output=True,
    )
    return str(out)


def _pkg(name: str, deb: str) -> debian.Package:
    return debian.Package(name, "1", f"pool/{name}_1_arm64.deb", 1, debian.sha256_file(deb))


@pytest.mark.parametrize("layout", ["6.x", "7.x"])
def test_the_image_is_found_by_looking_into_the_packages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str
) -> None:
    """6.x: ``boot/vmlinuz-*`` in the image package; 7.x: the image package holds no
    Image and its linux-binary dependency has ``usr/lib/modules/<release>/vmlinuz``.
    Both are found the same way, whatever the version says."""
    need_tool("dpkg-deb", "dpkg")
    monkeypatch.setenv("SERRINJ_CACHE", str(tmp_path / "cache"))
    image = b"ARM64 Image " + layout.encode()
    if layout == "6.x":
        debs = {"linux-image-6.1.0-57-arm64": _deb(tmp_path, "linux-image-6.1.0-57-arm64", {
            "boot/vmlinuz-6.1.0-57-arm64": image, "boot/config-6.1.0-57-arm64": b"CONFIG_KVM=y",
        })}  # fmt: skip
    else:
        debs = {
            "linux-image-7.2.13+deb14-arm64": _deb(
                tmp_path, "linux-image-7.2.13+deb14-arm64", {"usr/share/doc/x/README": b"meta"}
            ),
            "linux-binary-7.2.13+deb14-arm64": _deb(
                tmp_path, "linux-binary-7.2.13+deb14-arm64",
                {"usr/lib/modules/7.2.13+deb14-arm64/vmlinuz": image,
                 "usr/lib/modules/7.2.13+deb14-arm64/modules.order": b""},
            ),
        }  # fmt: skip
    chain = [_pkg(name, deb) for name, deb in debs.items()]
    path, carrier = prepare._kernel_image(chain, debs)
    assert Path(path).read_bytes() == image
    assert carrier == chain[-1]  # 6.x: the image package itself; 7.x: linux-binary
    # cached: found again without looking into the packages
    monkeypatch.setattr(prepare, "extract_member", None)
    assert prepare._kernel_image(chain, debs) == (path, carrier)


def test_no_image_in_any_package_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    need_tool("dpkg-deb", "dpkg")
    monkeypatch.setenv("SERRINJ_CACHE", str(tmp_path / "cache"))
    deb = _deb(tmp_path, "linux-image-9.9-arm64", {"usr/lib/modules/9.9-arm64/Image.gz": b"x"})
    with pytest.raises(debian.DebianError, match="no kernel Image"):
        prepare._kernel_image([_pkg("linux-image-9.9-arm64", deb)], {"linux-image-9.9-arm64": deb})


def test_parse_candidate() -> None:
    text = "linux-image-arm64:\n  Installed: (none)\n  Candidate: 6.1.192-2\n  Version table:\n"
    assert debian.parse_candidate(text) == "6.1.192-2"
    assert debian.parse_candidate("x:\n  Installed: (none)\n  Candidate: (none)\n") is None


def test_sources_list_is_arm64_and_signed() -> None:
    text = debian.sources_list([("http://m/debian", "bookworm")], "/k.gpg")
    assert text == "deb [arch=arm64 signed-by=/k.gpg] http://m/debian bookworm main\n"


def test_verified_rehashes_a_changed_file(tmp_path: Path) -> None:
    path = tmp_path / "x.deb"
    path.write_bytes(b"good")
    digest = debian.sha256_file(str(path))
    assert debian.verified(str(path), digest, 4)
    assert os.path.exists(str(path) + ".verified")
    path.write_bytes(b"evil")  # same size, new content and mtime
    assert not debian.verified(str(path), digest, 4)
    assert not debian.verified(str(tmp_path / "absent.deb"), digest)


# --- the result protocol ------------------------------------------------------------------


TRANSCRIPT = [
    "[    0.118936] CPU features: detected: RAS Extension Support\r",
    "@@LAB@@ BEGIN kernel=6.1.0-56-arm64 label=6.1 cpu=max expect_ras=1\r",
    "@@LAB@@ INFO ras_detected=1 kvm=1 cap41=1 cap158=1 cap178=1",
    "lab/suite/test_a.py::test_ok \x1b[32mPASSED\x1b[0m [ 33%]",
    "@@LAB@@ RESULT PASSED lab/suite/test_a.py::test_ok 0.01",
    "[   12.5] kvm: some kernel noise @@LAB@@ RESULT FAILED lab/suite/test_a.py::test_bad 0.20",
    "@@LAB@@ |     assert 0 == 1",
    "@@LAB@@ | E   AssertionError",
    "@@LAB@@ RESULT SKIPPED lab/suite/test_a.py::test_skip 0.00",
    "@@LAB@@ | needs the inner QEMU",
    "@@LAB@@ END rc=1",
]


def test_protocol_parses_a_console_transcript() -> None:
    report = protocol.parse(TRANSCRIPT)
    assert report.begin is not None and report.begin["cpu"] == "max"
    assert report.info["cap158"] == "1"
    assert [(r.outcome, r.nodeid) for r in report.results] == [
        ("PASSED", "lab/suite/test_a.py::test_ok"),
        ("FAILED", "lab/suite/test_a.py::test_bad"),
        ("SKIPPED", "lab/suite/test_a.py::test_skip"),
    ]
    assert report.results[1].details == ["    assert 0 == 1", "E   AssertionError"]
    assert (report.passed, report.failed, report.skipped) == (1, 1, 1)
    assert report.end == {"rc": "1"}
    assert not report.ok
    assert "1 test(s) failed" in report.problems()


@pytest.mark.parametrize(
    ("lines", "problem"),
    [
        ([], "the boot never reached the suite"),
        (TRANSCRIPT[:5], "the suite did not finish (no END line)"),
        ([*TRANSCRIPT[:3], "@@LAB@@ END rc=0"], "no test ran"),
        ([*TRANSCRIPT[:5], "@@LAB@@ END rc=124"], "the suite exited with rc=124"),
        ([*TRANSCRIPT[:5], "@@LAB@@ ERROR boom", "@@LAB@@ END rc=0"], "guest error: boom"),
    ],
)
def test_protocol_problems(lines: List[str], problem: str) -> None:
    assert problem in protocol.parse(lines).problems()


def test_protocol_clean_boot_is_ok() -> None:
    report = protocol.parse([*TRANSCRIPT[:5], "@@LAB@@ END rc=0"])
    assert report.ok and report.problems() == []


def test_protocol_line_round_trip() -> None:
    text = protocol.line(protocol.DETAIL, "  indented\r\nand joined")
    report = protocol.parse([protocol.line(protocol.RESULT, "ERROR a::b 1.5"), text])
    assert report.results[0].duration == 1.5
    assert report.results[0].details == ["  indented  and joined"]


def test_plugin_and_parser_on_a_real_pytest_run(tmp_path: Path) -> None:
    (tmp_path / "test_demo.py").write_text(
        textwrap.dedent(
            """\
            import pytest

            import sys

            def test_pass():
                print("guest ESR_EL1 0xbe001811")
                print("chatter", file=sys.stderr)

            def test_quiet():
                pass

            def test_fail():
                print("seen before failing")
                assert 1 + 1 == 3

            @pytest.mark.skip(reason="not here")
            def test_skip():
                pass

            @pytest.fixture
            def broken_teardown():
                yield
                raise RuntimeError("teardown broke")

            def test_teardown_error(broken_teardown):
                pass

            @pytest.mark.xfail(reason="known")
            def test_xfail():
                assert False
            """
        )
    )
    envv = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="120")
    envv.pop("PYTEST_ADDOPTS", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-v",
            "-p",
            "no:cacheprovider",
            "-p",
            "lab.guest.plugin",
            "--color=no",
            "-c",
            os.devnull,
            "--rootdir",
            str(tmp_path),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=envv,
        timeout=120,
    )
    report = protocol.parse(proc.stdout.splitlines())
    outcomes: Dict[str, str] = {r.nodeid.split("::")[-1]: r.outcome for r in report.results}
    assert outcomes == {
        "test_pass": "PASSED",
        "test_quiet": "PASSED",
        "test_fail": "FAILED",
        "test_skip": "SKIPPED",
        "test_teardown_error": "ERROR",
        "test_xfail": "XFAIL",
    }, proc.stdout
    details = {r.nodeid.split("::")[-1]: r.details for r in report.results}
    assert any("== 3" in d for d in details["test_fail"]), details
    assert any("teardown broke" in d for d in details["test_teardown_error"])
    assert details["test_skip"] == ["not here"]
    # a pass sends what it printed to stdout (stderr is chatter); a failure's output
    # is in its details, as pytest reports it
    observed = {r.nodeid.split("::")[-1]: r.observed for r in report.results}
    assert observed["test_pass"] == ["guest ESR_EL1 0xbe001811"], proc.stdout
    assert observed["test_quiet"] == [] and observed["test_fail"] == []
    assert any("seen before failing" in d for d in details["test_fail"])


def test_protocol_observation_lines_follow_their_result() -> None:
    report = protocol.parse(
        [
            protocol.line(protocol.RESULT, "PASSED a::b 1.0"),
            protocol.line(protocol.OBSERVED, "  guest ESR_EL1 0xbe000411"),
            protocol.line(protocol.RESULT, "PASSED a::c 1.0"),
        ]
    )
    assert report.results[0].observed == ["  guest ESR_EL1 0xbe000411"]
    assert report.results[0].details == [] and report.results[1].observed == []


# --- skips: every one is a failure unless the boot's allow-list has it -------------------

_RAS_ONLY = "lab/suite/test_campaign_arm64.py::test_arm64_ras_example"
_RAS_ONLY_WHY = "a campaign with a syndrome is refused without RAS: the masked example checks it"
_NO_RAS_ONLY = (
    "lab/suite/test_qemu_linux_arm64.py::"
    "test_without_ras_an_esr_is_refused_and_the_cpus_own_serror_is_fatal"
)
_NO_RAS_ONLY_WHY = "the host without RAS is the cortex-a57 boot"
_X86_ONLY = "tests/test_engine_kvm.py::test_nmi_and_machine_checks_reach_the_guest[spin]"
_X86_ONLY_WHY = "x86_64 injections; arm64 runs in the lab"


def _skipped(nodeid: str, reason: str = "some reason") -> protocol.CaseResult:
    return protocol.CaseResult("SKIPPED", nodeid, 0.0, [reason])


@pytest.mark.parametrize(
    ("nodeid", "reason", "ras", "with_qemu", "accepted"),
    [
        (_RAS_ONLY, _RAS_ONLY_WHY, False, True, True),  # a RAS-only test without RAS
        (_RAS_ONLY, _RAS_ONLY_WHY, True, True, False),  # ... but never on a boot with RAS
        (_RAS_ONLY, "x", False, True, False),  # ... and only for its own reason
        (_NO_RAS_ONLY, _NO_RAS_ONLY_WHY, True, True, True),
        (_NO_RAS_ONLY, _NO_RAS_ONLY_WHY, False, True, False),
        (_NO_RAS_ONLY, "needs the inner QEMU", True, True, False),
        (_X86_ONLY, _X86_ONLY_WHY, True, True, True),  # x86_64-only host tests, on every boot
        (_X86_ONLY, _X86_ONLY_WHY, False, True, True),
        (_X86_ONLY, "x86_64 guest", True, True, False),  # another entry's reason
        (_X86_ONLY.replace("[spin]", "_more[spin]"), _X86_ONLY_WHY, True, True, False),
        ("lab/suite/test_cli_arm64.py::test_demo_matches_on_every_host", "x", True, True, False),
        ("lab/suite/test_smoke.py::test_x", skips.NO_QEMU_REASON, True, False, True),
        ("lab/suite/test_smoke.py::test_x", skips.NO_QEMU_REASON, True, True, False),
        ("lab/suite/test_smoke.py::test_x", "something else", False, False, False),
    ],
)
def test_skip_allow_list(
    nodeid: str, reason: str, ras: bool, with_qemu: bool, accepted: bool
) -> None:
    why = skips.allowed_for(ras, with_qemu)(_skipped(nodeid, reason))
    assert (why is not None) is accepted, why


def test_every_allowed_skip_is_pinned_to_its_exact_reason() -> None:
    """Each entry names its test and the text that test skips with (found in its source),
    and the same test skipped for any other reason, on a boot where the entry applies,
    is not accepted."""
    for entry in skips.ALLOWED:
        assert entry.reason, entry
        if entry.pattern == "*":
            continue
        path = entry.pattern.partition("::")[0]
        assert f'"{entry.reason}"' in (REPO / path).read_text(), entry
        nodeid = entry.pattern.replace("[*]", "[halt]")
        for ras in (True, False):
            allowed = skips.allowed_for(ras, with_qemu=True)
            if entry.when in (skips.ALWAYS, skips.RAS if ras else skips.NO_RAS):
                assert allowed(_skipped(nodeid, entry.reason)) == entry.why
            for other in ("", entry.reason + " ", entry.reason.upper(), "a missing tool"):
                assert allowed(_skipped(nodeid, other)) is None, (entry, other)


def test_skip_allow_list_names_tests_that_exist() -> None:
    """A stale entry would accept nothing, or worse, a new test of the same name."""
    for entry in skips.ALLOWED:
        if entry.pattern == "*":
            assert entry.reason and entry.when == skips.NO_QEMU
            continue
        path, _, name = entry.pattern.partition("::")
        source = (REPO / path).read_text()
        assert f"def {name.removesuffix('[*]')}(" in source, entry
        assert entry.when in (skips.ALWAYS, skips.RAS, skips.NO_RAS), entry
        assert entry.why, entry


def test_protocol_problems_fail_a_skip_outside_the_allow_list() -> None:
    lines = [
        "@@LAB@@ BEGIN kernel=6.1 cpu=max expect_ras=1",
        "@@LAB@@ RESULT PASSED lab/suite/test_a.py::test_ok 0.01",
        f"@@LAB@@ RESULT SKIPPED {_RAS_ONLY} 0.00",
        f"@@LAB@@ | {_RAS_ONLY_WHY}",
        "@@LAB@@ END rc=0",
    ]
    report = protocol.parse(lines)
    # no allow-list: the skip is a failure
    assert report.problems() == [f"1 test(s) skipped outside the boot's allow-list: {_RAS_ONLY}"]
    assert report.problems(skips.allowed_for(ras=True, with_qemu=True)) != []
    assert report.problems(skips.allowed_for(ras=False, with_qemu=True)) == []
    assert report.results[1].allowed_because is not None
    # the same test skipped for another reason: the boot fails
    other = protocol.parse([*lines[:3], "@@LAB@@ | needs RAS", lines[4]])
    assert other.problems(skips.allowed_for(ras=False, with_qemu=True)) == [
        f"1 test(s) skipped outside the boot's allow-list: {_RAS_ONLY}"
    ]


# --- the run command: its lines, its closing line and its exit status ----------------------


def test_summary_line() -> None:
    assert lab_main._summary(3, 0, 0) == "3 passed, 0 failed"
    assert lab_main._summary(3, 1, 2) == "3 passed, 1 failed, 2 skipped"


def _outcome(name: str, lines: List[str], ras: bool = True) -> boot.BootOutcome:
    cpu = config.CPUS["max" if ras else "cortex-a57"]
    return boot.BootOutcome(
        spec=boot.BootSpec("6.1", cpu, "Image"),
        report=protocol.parse(lines),
        seconds=1.0,
        log=f"{name}.log",
    )


_OK_BOOT = [
    "@@LAB@@ BEGIN kernel=6.1 cpu=max expect_ras=1",
    "@@LAB@@ RESULT PASSED lab/suite/test_a.py::test_ok 0.01",
    "@@LAB@@ RESULT PASSED lab/suite/test_a.py::test_ok2 0.01",
    "@@LAB@@ END rc=0",
]


@pytest.mark.parametrize(
    ("seconds", "wall"),
    [
        (484.6, "wall time 484.6 s (8 min 05 s), within the 10-minute target"),
        (600.0, "wall time 600.0 s (10 min 00 s), within the 10-minute target"),
        (600.4, "wall time 600.4 s (10 min 00 s), OVER the 10-minute target"),
        (1234.5, "wall time 1234.5 s (20 min 34 s), OVER the 10-minute target"),
    ],
)
def test_closing_line_gives_counts_boots_and_wall_time(seconds: float, wall: str) -> None:
    failing = [*_OK_BOOT[:2], "@@LAB@@ RESULT FAILED lab/suite/test_a.py::test_bad 0.1",
               f"@@LAB@@ RESULT SKIPPED {_RAS_ONLY} 0.0", "@@LAB@@ | needs RAS",
               "@@LAB@@ END rc=1"]  # fmt: skip
    outcomes = [_outcome("a", _OK_BOOT), _outcome("b", failing)]
    line = lab_main._closing(outcomes, seconds)
    assert line == f"== overall: 3 passed, 1 failed, 1 skipped; 1/2 boots ok; {wall}"


def _boot_lines(ras: bool, extra: List[str]) -> List[str]:
    cpu = "max" if ras else "cortex-a57"
    return [
        f"@@LAB@@ BEGIN kernel=6.1.0-57-arm64 label=6.1 cpu={cpu} expect_ras={int(ras)}",
        f"@@LAB@@ INFO ras_detected={int(ras)} kvm=1 cap41=1 cap158={int(ras)} cap178=1",
        "@@LAB@@ RESULT PASSED lab/suite/test_a.py::test_ok 0.5",
        "@@LAB@@ OBS guest ESR_EL1 0xbe001811",
        *extra,
        "@@LAB@@ END rc=0",
    ]


@pytest.mark.parametrize(
    ("max_extra", "a57_extra", "rc", "failed_boots"),
    [
        # every skip on the boot whose allow-list has it, for its own reason
        ([f"@@LAB@@ RESULT SKIPPED {_NO_RAS_ONLY} 0.0", f"@@LAB@@ | {_NO_RAS_ONLY_WHY}"],
         [f"@@LAB@@ RESULT SKIPPED {_RAS_ONLY} 0.0", f"@@LAB@@ | {_RAS_ONLY_WHY}"], 0, None),
        # a RAS-only test skipped on a RAS boot: that boot fails
        ([f"@@LAB@@ RESULT SKIPPED {_RAS_ONLY} 0.0", f"@@LAB@@ | {_RAS_ONLY_WHY}"], [], 1,
         "6.1/max"),
        # the allowed test skipped for another reason (a tool missing): that boot fails
        ([], [f"@@LAB@@ RESULT SKIPPED {_RAS_ONLY} 0.0", "@@LAB@@ | cpio is missing"], 1,
         "6.1/cortex-a57"),
        # a failed test
        ([], ["@@LAB@@ RESULT FAILED lab/suite/test_a.py::test_bad 0.1", "@@LAB@@ | E boom"],
         1, "6.1/cortex-a57"),
    ],
)  # fmt: skip
def test_cmd_run_exit_status_and_closing_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    max_extra: List[str],
    a57_extra: List[str],
    rc: int,
    failed_boots: Optional[str],
) -> None:
    """``run`` with preparation and QEMU replaced by a transcript per boot: the lines it
    prints, its closing line, and its exit status."""
    package = debian.Package("linux-image-6.1.0-57-arm64", "6.1.192-3", "k.deb", 1, "0" * 64)
    kimg = prepare.KernelImage("6.1", package, str(tmp_path / "Image"))
    prepared = prepare.Prepared({"6.1": kimg}, str(tmp_path / "base"), None)
    monkeypatch.setattr(lab_main, "_prepare", lambda labels, with_qemu, refresh: prepared)
    monkeypatch.setattr(lab_main, "_project", lambda run_dir, args: str(tmp_path / "project"))
    monkeypatch.setattr(prepare, "new_run_dir", lambda: str(tmp_path))
    monkeypatch.setattr(prepare, "concatenate", lambda pieces, out: out)
    transcripts = {"6.1/max": _boot_lines(True, max_extra),
                   "6.1/cortex-a57": _boot_lines(False, a57_extra)}  # fmt: skip

    def fake_run(spec, initrd, log, timeout, with_qemu, on_line, cancel):  # type: ignore[no-untyped-def]
        report = protocol.BootReport()
        for text in transcripts[spec.name]:
            on_line(report, protocol.feed(report, text), text)
        return boot.BootOutcome(spec, report, 2.0, log, with_qemu=with_qemu)

    monkeypatch.setattr(boot, "run", fake_run)
    assert lab_main.main(["run", "--kernel", "6.1", "--cpu", "all", "--jobs", "1"]) == rc
    out = capsys.readouterr().out.splitlines()
    assert "   PASSED   lab/suite/test_a.py::test_ok  (0.50 s)" in out
    assert "            > guest ESR_EL1 0xbe001811" in out  # a pass's observation
    closing, tally = out[-2], out[-1]
    assert closing.startswith("== overall: 2 passed, ")
    # the plain last line CI reads; a failed boot is never "0 failed"
    if rc == 0:
        assert tally == "lab-arm64: 2 passed, 0 failed, 2 skipped", tally
    else:
        assert re.fullmatch(r"lab-arm64: 2 passed, [1-9]\d* failed(, \d+ skipped)?", tally), tally
    assert ("2/2 boots ok" if rc == 0 else "1/2 boots ok") in closing
    assert "wall time " in closing and "within the 10-minute target" in closing
    if failed_boots:
        assert out[-3].startswith(f"   failed boots: {failed_boots} ")
    if rc == 0:
        assert any("(accepted: " in line for line in out)
    elif "RAS only" in " ".join(max_extra):
        assert any("NOT in the allow-list" in line for line in out), out


# --- boot matrix and guest-side config ------------------------------------------------------


def test_default_matrix_is_every_kernel_with_ras_plus_one_without() -> None:
    combos = boot.matrix(None, None)
    assert combos == list(config.DEFAULT_MATRIX)
    assert {k for k, c in combos if c == "max"} == set(config.KERNELS)
    assert [c for _, c in combos].count("cortex-a57") == 1
    assert not config.CPUS["cortex-a57"].ras and config.CPUS["max"].ras


def test_matrix_selection() -> None:
    assert boot.matrix(["6.12"], None) == [("6.12", "max"), ("6.12", "cortex-a57")]
    assert boot.matrix(None, ["max"]) == [("6.1", "max"), ("6.12", "max"), ("newest", "max")]
    assert boot.matrix(["newest"], ["max"]) == [("newest", "max")]
    assert boot.matrix(["6.1"], ["cortex-a57"]) == [("6.1", "cortex-a57")]


def test_kernel_command_line_reaches_the_guest_config() -> None:
    spec = boot.BootSpec("6.1", config.CPUS["cortex-a57"], "/x/Image")
    line = boot.append_line(spec, "run", with_qemu=False, guest_timeout=280)
    cfg = env.LabConfig.from_params(env.params(line))
    assert cfg == env.LabConfig(
        mode="run", cpu="cortex-a57", kernel="6.1", expect_ras=False, with_qemu=False, timeout=280
    )
    assert cfg.inside_lab
    assert not env.LabConfig.from_params(env.params("console=ttyS0 quiet")).inside_lab
    # the newest kernel commits an unmasked SError at SET (6.17+); the suite checks
    # serrinj's probe against what the host states here
    newest = boot.BootSpec("newest", config.CPUS["max"], "/x/Image")
    cfg = env.LabConfig.from_params(env.params(boot.append_line(newest, "run", True, 0)))
    assert cfg.expect_commit and cfg.kernel == "newest" and cfg.expect_ras


def test_nested_init_prints_the_markers_the_suite_waits_for() -> None:
    script = (REPO / "lab/guest/nested_init.sh").read_text()
    assert f'echo "{nested.MARKER} ' in script
    assert f'echo "{nested.TICK} ' in script


def test_inner_qemu_command() -> None:
    cmd = nested.command(nested.NestedAssets(), name="t", tick=2)
    assert cmd[cmd.index("-accel") + 1] == "kvm"
    assert cmd[cmd.index("-cpu") + 1] == "host"
    assert cmd[cmd.index("-name") + 1] == "t,debug-threads=on"
    assert "lab.tick=2" in cmd[cmd.index("-append") + 1]


# --- the runner never leaves a QEMU behind ---------------------------------------

_SPAWN_AND_WAIT = textwrap.dedent(
    """
    import subprocess, sys, time
    from lab.arm64 import __main__ as lab_main, boot
    lab_main.catch_termination()
    child = subprocess.Popen(boot.orphan_proof(["sleep", "120"]))
    try:
        while open(f"/proc/{child.pid}/comm").read().strip() != "sleep":
            time.sleep(0.01)  # setpriv has set PR_SET_PDEATHSIG once it has exec'd
        print(child.pid, flush=True)
        time.sleep(120)
    except lab_main.Terminated as err:
        child.kill()
        child.wait()
        print("unwound", err.signo, flush=True)
        sys.exit(128 + err.signo)
    """
)


def _gone(pid: int, within: float = 10.0) -> bool:
    """True once ``pid`` no longer runs (reaped, or a zombie left to its new parent)."""
    import time

    deadline = time.monotonic() + within
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return True
        except FileNotFoundError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


@contextlib.contextmanager
def _runner() -> Iterator[Tuple[subprocess.Popen[str], int]]:
    """A stand-in for the lab runner (its signal handling, a child started as it starts
    QEMU) and that child's pid; both are ended by pid whatever the test did."""
    runner = subprocess.Popen(
        [sys.executable, "-c", _SPAWN_AND_WAIT], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    child = None
    try:
        assert runner.stdout is not None
        child = int(runner.stdout.readline())
        yield runner, child
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
        if runner.stdout is not None:
            runner.stdout.close()
        if child is not None and not _gone(child, within=0):
            os.kill(child, 9)


def test_a_sigkilled_runner_takes_its_qemu_with_it() -> None:
    """SIGKILL cannot be caught: PR_SET_PDEATHSIG (set by ``setpriv``) ends the child."""
    need_tool("setpriv", "util-linux")
    with _runner() as (runner, child):
        runner.kill()
        runner.wait(timeout=10)
        assert _gone(child), f"the child {child} outlived its SIGKILLed runner"


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_unwind_the_runner(signame: str) -> None:
    """The runner's handler turns SIGTERM/SIGHUP into an exception, so the boots'
    clean-up (kill each QEMU by pid) runs, as it does for Ctrl-C."""
    import signal

    signo = int(getattr(signal, signame))
    with _runner() as (runner, child):
        runner.send_signal(signo)
        out, _ = runner.communicate(timeout=10)
        assert out.strip() == f"unwound {signo}"
        assert runner.returncode == 128 + signo
        assert _gone(child)
