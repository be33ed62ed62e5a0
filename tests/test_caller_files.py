"""Files opened as the caller, on the real kernel: serrinj (root here) acting for a
sudo caller gives the opening thread, and it alone, the caller's fsuid, fsgid
and groups. The whole path through sudo is in tests/test_sudo.py."""

from __future__ import annotations

import grp
import os
import threading
from pathlib import Path
from typing import Iterator, List

import pytest

from serrinj.errors import PermissionDenied
from serrinj.host import privilege
from serrinj.host.privilege import Caller

NOBODY = 65534


def test_who_the_caller_is() -> None:
    c = privilege.identify(0, 0, 0, (0,), "1001", "1001")
    assert (c.uid, c.gid, c.via, c.elevated) == (1001, 1001, "sudo", True)
    assert 1001 in c.groups
    assert privilege.identify(0, 0, 0, (0,)).via == "root"
    assert privilege.identify(0, 0, 0, (0,), "0", "0").via == "root"  # root's own sudo
    assert privilege.identify(1001, 0, 1001, (1001,)).via == "setuid"
    # a user running serrinj with its own rights: SUDO_UID means nothing then
    user = privilege.identify(1001, 1001, 1001, (1001,), "0", "0")
    assert (user.via, user.elevated) == ("user", False)


@pytest.fixture
def as_nobody(monkeypatch: pytest.MonkeyPatch) -> Iterator[Caller]:
    """serrinj acting for uid 65534 through sudo, with one supplementary group."""
    group = grp.getgrnam("users").gr_gid
    caller = Caller(NOBODY, NOBODY, (NOBODY, group), "nobody", "sudo")
    monkeypatch.setattr(privilege, "_cache", [caller])
    monkeypatch.setattr(privilege, "warnings", [])
    yield caller


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A temporary directory any user may enter (pytest's own tmp_path is root's alone)."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="serrinj-caller-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_the_environment_cannot_move_roots_files(
    as_nobody: Caller, monkeypatch: pytest.MonkeyPatch
) -> None:
    from serrinj.ops import audit, lock

    monkeypatch.setenv("SERRINJ_AUDIT_LOG", "/tmp/elsewhere.jsonl")
    monkeypatch.setenv("SERRINJ_LOCK_DIR", "/tmp/elsewhere")
    assert audit.path() == "/var/log/serrinj/audit.jsonl"
    assert lock.lock_dir() in ("/run/serrinj", "/tmp/serrinj-locks")
    assert privilege.warnings == [
        f"{v} is ignored: serrinj runs as root for uid {NOBODY} (nobody), who may not move"
        " root's files"
        for v in ("SERRINJ_AUDIT_LOG", "SERRINJ_LOCK_DIR")
    ]


def _fs_ids() -> List[str]:
    with open("/proc/thread-self/status") as f:
        lines = {k: v.split() for k, _, v in (x.partition(":") for x in f)}
    return [lines["Uid"][3], lines["Gid"][3], " ".join(lines["Groups"])]


@pytest.mark.root
def test_files_are_opened_with_the_callers_uid_gid_and_groups(
    as_nobody: Caller, open_tmp: Path
) -> None:
    tmp_path = open_tmp
    secret = tmp_path / "secret"
    secret.write_text("root only\n")
    secret.chmod(0o600)
    public = tmp_path / "public"
    public.write_text("anyone\n")
    public.chmod(0o644)
    users = grp.getgrnam("users").gr_gid
    for_group = tmp_path / "group"
    for_group.write_text("the users group\n")
    os.chown(for_group, 0, users)
    for_group.chmod(0o640)
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    (closed / "inside").write_text("x\n")
    (closed / "inside").chmod(0o644)

    with pytest.raises(PermissionDenied) as err:
        privilege.open_file(str(secret), "r", "guest log")
    assert err.value.message == f"guest log {secret}: Permission denied for uid {NOBODY} (nobody)"
    with privilege.open_file(str(public), "r", "guest log") as f:
        assert f.read() == "anyone\n"
    # the supplementary group is the caller's, not root's
    with privilege.open_file(str(for_group), "r", "campaign file") as f:
        assert f.read() == "the users group\n"
    # the path's directories are searched as the caller too
    with pytest.raises(PermissionDenied, match=r"pid file .*inside"):
        privilege.open_file(str(closed / "inside"), "r", "pid file")
    with pytest.raises(PermissionDenied, match="pause file"):
        privilege.stat(str(closed / "inside"), "pause file")
    # /proc/self is serrinj's own process: refused outright
    with pytest.raises(PermissionDenied, match="files on /proc are refused"):
        privilege.open_file("/proc/self/status", "rb", "guest log")
    # a file the caller creates is the caller's
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with privilege.open_file(str(open_dir / "report.xml"), "w", "JUnit report") as f:
        f.write("<testsuites/>")
    st = (open_dir / "report.xml").stat()
    assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)
    with pytest.raises(PermissionDenied, match="JUnit report"):
        privilege.open_file(str(tmp_path / "report.xml"), "w", "JUnit report")
    # and afterwards the thread is root again: its fs ids, groups and file capabilities
    before = _fs_ids()
    assert before[:2] == ["0", "0"]
    assert secret.read_text() == "root only\n"


@pytest.mark.root
def test_only_the_opening_thread_switches(as_nobody: Caller, open_tmp: Path) -> None:
    tmp_path = open_tmp
    secret = tmp_path / "secret"
    secret.write_text("root only\n")
    secret.chmod(0o600)
    seen: List[object] = []
    go, done = threading.Event(), threading.Event()

    def other_thread() -> None:
        go.wait(5)
        seen.append(_fs_ids())
        seen.append(secret.read_text())
        done.set()

    t = threading.Thread(target=other_thread)
    t.start()
    root_ids = _fs_ids()
    with privilege.as_caller():
        inside = _fs_ids()
        go.set()
        assert done.wait(5)
        with pytest.raises(PermissionError):
            secret.read_text()
    t.join()
    group = as_nobody.groups[1]
    assert inside == [str(NOBODY), str(NOBODY), " ".join(map(str, sorted({NOBODY, group})))]
    assert seen == [root_ids, "root only\n"]
    assert _fs_ids() == root_ids


@pytest.mark.cross
@pytest.mark.parametrize(("arch", "gcc"), [("x86_64", "gcc"), ("aarch64", "aarch64-linux-gnu-gcc")])
def test_the_credential_syscall_numbers_are_the_kernel_headers(arch: str, gcc: str) -> None:
    """The raw setfsuid/setfsgid/setgroups/getgroups numbers, per arch, from <sys/syscall.h>."""
    import re
    import subprocess

    from serrinj import _native
    from tests.conftest import need_tool

    cc = need_tool(gcc, "gcc" if arch == "x86_64" else "gcc-aarch64-linux-gnu")
    macros = subprocess.run(
        [cc, "-dM", "-E", "-include", "sys/syscall.h", "-"],
        input="", capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    numbers = dict(re.findall(r"^#define __NR_(\w+) (\d+)$", macros, re.M))
    for name in ("setfsuid", "setfsgid", "setgroups", "getgroups"):
        assert _native._SYSCALLS[arch][name] == int(numbers[name]), name
