"""``--fd`` resolution (``serrinj.target.attach.resolve_fd``): its errors.

The unit tests replace what ``resolve_fd`` calls (``pidfd_getfd``, the
readlink of the fd, the local ioctl, the kcmp search), so every error path is
reached on any host. One test makes the "no owner" case for real: a vCPU fd
kept across exec (the process that created the VM is no more), given to the
real command line.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import pytest

from serrinj import _native
from serrinj.errors import ExitCode, PermissionDenied, TargetGone, TargetNotFound
from serrinj.host import procfs
from serrinj.kvm import api
from serrinj.target import attach as target
from serrinj.target import discover
from serrinj.vcpu.executor import LocalExecutor

ROOT = Path(__file__).resolve().parent.parent
VMM = 4242
FD = 11
UID, GID = os.getuid(), os.getgid()


@pytest.fixture
def vcpu_fd(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """An fd of this process that reads as ``anon_inode:kvm-vcpu:3`` and that KVM
    answers with EIO (a VM this process did not create)."""
    fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    real_readlink = os.readlink

    def readlink(path: str, *args: object, **kwargs: object) -> str:
        if path == f"/proc/self/fd/{fd}":
            return "anon_inode:kvm-vcpu:3"
        return real_readlink(path, *args, **kwargs)  # type: ignore[arg-type]

    def ioctl_buf(self: LocalExecutor, got_fd: int, request: int, buf: bytes) -> bytes:
        assert (got_fd, request) == (fd, api.KVM_GET_VCPU_EVENTS)
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "readlink", readlink)
    monkeypatch.setattr(LocalExecutor, "ioctl_buf", ioctl_buf)
    try:
        yield fd
    finally:
        os.close(fd)


def test_inherited_fd_without_any_owner_is_not_found(
    vcpu_fd: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    searched: List[Tuple[int, int]] = []

    def find_file_holders(pid: int, fd: int) -> List[discover.FdOwner]:
        searched.append((pid, fd))
        return []

    monkeypatch.setattr(discover, "find_file_holders", find_file_holders)
    with pytest.raises(TargetNotFound) as err:
        target.resolve_fd(vcpu_fd)
    assert type(err.value) is TargetNotFound
    assert err.value.exit_code == ExitCode.NOT_FOUND and int(err.value.exit_code) == 3
    assert str(err.value) == (
        f"fd {vcpu_fd} is vCPU 3 of a VM this process did not create (KVM says EIO),"
        " and no running process shares that file"
    )
    assert err.value.hint == (
        "KVM accepts vCPU ioctls only from the VM's creator; is the VMM gone?"
    )
    assert searched == [(os.getpid(), vcpu_fd)]


def test_inherited_fd_with_an_owner_is_resolved(
    vcpu_fd: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The counterpart of the test above: the same fd, with a process sharing it."""
    owner = discover.FdOwner(pid=VMM, fd=FD, vcpu_id=3)
    monkeypatch.setattr(discover, "find_file_holders", lambda pid, fd: [owner])
    monkeypatch.setattr(target, "_owner_rank", lambda o: (False, 0))
    monkeypatch.setattr(procfs, "comm", lambda pid, tid=None: "qemu-system-x86")
    res = target.resolve_fd(vcpu_fd)
    assert (res.vcpu_id, res.local, res.owner_pid, res.owner_fd) == (3, False, VMM, FD)


# ---------------------------------------------------------------------- pidfd_getfd EPERM
class FakeGetfd:
    """``pidfd_open`` and ``pidfd_getfd`` of a VMM that serrinj may not take fds from."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.pidfds: List[int] = []
        self.errno = errno.EPERM
        monkeypatch.setattr(_native, "pidfd_open", self.pidfd_open)
        monkeypatch.setattr(_native, "pidfd_getfd", self.pidfd_getfd)

    def pidfd_open(self, pid: int) -> int:
        assert pid == VMM
        fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)  # closed by resolve_fd
        self.pidfds.append(fd)
        return fd

    def pidfd_getfd(self, pidfd: int, targetfd: int) -> int:
        assert pidfd == self.pidfds[-1] and targetfd == FD
        raise OSError(self.errno, os.strerror(self.errno))

    def all_closed(self) -> bool:
        return all(not os.path.exists(f"/proc/self/fd/{fd}") for fd in self.pidfds)


def _vmm(
    monkeypatch: pytest.MonkeyPatch,
    uid: int = UID,
    scope: Optional[int] = 0,
    cap: bool = False,
    gone: bool = False,
) -> None:
    def task_security(pid: int, tid: Optional[int] = None) -> procfs.TaskSecurity:
        if pid == os.getpid():
            return procfs.TaskSecurity(0, (UID,) * 4, 0, 0, (GID,) * 4, 0)
        assert (pid, tid) == (VMM, None)
        if gone:
            raise ProcessLookupError(errno.ESRCH, "gone")
        return procfs.TaskSecurity(0, (uid,) * 4, 0, 0, (GID,) * 4, 0)

    monkeypatch.setattr(procfs, "task_security", task_security)
    monkeypatch.setattr(procfs, "has_capability", lambda c, pid="self": cap)
    monkeypatch.setattr(procfs, "ptrace_scope", lambda: scope)
    monkeypatch.setattr(procfs, "owner_uid", lambda pid: uid)


def test_getfd_eperm_for_another_uid_names_the_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeGetfd(monkeypatch)
    _vmm(monkeypatch, uid=UID + 1)
    with pytest.raises(PermissionDenied) as err:
        target.resolve_fd(FD, pid=VMM)
    assert type(err.value) is PermissionDenied
    assert err.value.exit_code == ExitCode.PERMISSION and int(err.value.exit_code) == 4
    assert str(err.value) == (
        f"taking fd {FD} of process {VMM} (pidfd_getfd) denied: it runs as uid {UID + 1}"
        f" gid {GID}, serrinj as uid {UID} gid {GID} (its real ids; ptrace needs them to"
        " match), without CAP_SYS_PTRACE"
    )
    assert err.value.hint is not None and "CAP_SYS_PTRACE" in err.value.hint
    assert isinstance(err.value.__cause__, OSError) and err.value.__cause__.errno == errno.EPERM
    assert fake.all_closed()


@pytest.mark.parametrize("scope, words", [(1, "descendants only"), (2, "admin only")])
def test_getfd_eperm_under_yama_names_the_scope(
    monkeypatch: pytest.MonkeyPatch, scope: int, words: str
) -> None:
    FakeGetfd(monkeypatch)
    _vmm(monkeypatch, scope=scope)
    with pytest.raises(PermissionDenied) as err:
        target.resolve_fd(FD, pid=VMM)
    assert str(err.value) == (
        f"taking fd {FD} of process {VMM} (pidfd_getfd) denied: Yama ptrace_scope is"
        f" {scope} ({words})"
    )
    assert err.value.hint is not None and "CAP_SYS_PTRACE" in err.value.hint


def test_getfd_eperm_with_cap_sys_ptrace_blames_a_security_module(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    FakeGetfd(monkeypatch)
    _vmm(monkeypatch, uid=UID + 1, scope=2, cap=True)
    with pytest.raises(PermissionDenied) as err:
        target.resolve_fd(FD, pid=VMM)
    assert "denied by a security module" in str(err.value)


def test_getfd_eperm_of_a_vmm_that_exited_meanwhile(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeGetfd(monkeypatch)
    _vmm(monkeypatch, gone=True)
    with pytest.raises(TargetGone) as err:
        target.resolve_fd(FD, pid=VMM)
    assert str(err.value) == f"process {VMM} exited"


def test_getfd_ebadf_is_still_not_found(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeGetfd(monkeypatch).errno = errno.EBADF
    with pytest.raises(TargetNotFound) as err:
        target.resolve_fd(FD, pid=VMM)
    assert type(err.value) is TargetNotFound
    assert str(err.value) == f"fd {FD} is not open in process {VMM}"


# ---------------------------------------------------------------------- for real
#: creates a VM and a vCPU, then becomes ``serrinj status --fd VCPU``: exec gives the
#: process a new mm, so KVM refuses the fd (EIO), and no other process holds the file
_CREATOR = f"""
import fcntl, os, sys
kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
vm = fcntl.ioctl(kvm, {api.KVM_CREATE_VM:#x}, 0)
vcpu = fcntl.ioctl(vm, {api.KVM_CREATE_VCPU:#x}, 0)
fcntl.fcntl(vcpu, fcntl.F_SETFD, 0)
print(os.readlink(f"/proc/self/fd/{{vcpu}}"), vcpu, flush=True)
os.execv(sys.executable, [sys.executable, "-m", "serrinj", "status", "--fd", str(vcpu)])
"""


@pytest.mark.kvm
def test_cli_fd_of_a_vm_nobody_runs_is_exit_3() -> None:
    """A vCPU fd kept across exec: its VM's creator (the process before exec) is
    gone, KVM says EIO, no process shares the file, and ``status --fd`` says so."""
    proc = subprocess.run(
        [sys.executable, "-c", _CREATOR], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    link, fd = proc.stdout.split("\n")[0].split()
    assert link == "anon_inode:kvm-vcpu:0", proc.stdout
    assert proc.returncode == ExitCode.NOT_FOUND, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert (
        f"error: fd {fd} is vCPU 0 of a VM this process did not create (KVM says EIO),"
        " and no running process shares that file"
    ) in " ".join(proc.stderr.split())
