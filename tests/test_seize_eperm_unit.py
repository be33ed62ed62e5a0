"""Every explanation of a PTRACE_SEIZE EPERM, one branch at a time.

``_explain_seize_eperm`` reads the target thread's status (tracer, ids,
capabilities), serrinj's own capabilities and ids, Yama's ``ptrace_scope`` and
the owner of ``/proc/PID``. Each is replaced here, so each branch is reached on
any host, as any user, and the message must name the cause.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import pytest

from serrinj.errors import Conflict, ExitCode, PermissionDenied, SerrinjError, TargetGone
from serrinj.host import procfs
from serrinj.remote import session

VMM = 4242
TID = 4243
TRACER = 5151
UID = os.getuid()
GID = os.getgid()
CAP_NET_ADMIN = 1 << 12


@dataclass
class Host:
    """What the explanation reads, with defaults where ptrace would be allowed."""

    vmm_uid: Tuple[int, int, int, int] = (UID, UID, UID, UID)
    vmm_gid: Tuple[int, int, int, int] = (GID, GID, GID, GID)
    vmm_caps: int = 0
    tracer: int = 0
    gone: bool = False
    cap_sys_ptrace: bool = False
    scope: Optional[int] = 0
    #: the owner of /proc/VMM; None: the vmm's euid (dumpable); an OSError: unreadable
    proc_owner: Optional[int] = None
    proc_owner_error: bool = False
    my_caps: int = 0
    calls: List[Tuple[object, ...]] = field(default_factory=list)


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> Host:
    h = Host()

    def task_security(pid: int, tid: Optional[int] = None) -> procfs.TaskSecurity:
        h.calls.append(("task_security", pid, tid))
        if pid == os.getpid():
            return procfs.TaskSecurity(0, (UID,) * 4, 0, 0, (GID,) * 4, h.my_caps)
        assert pid == VMM, pid
        if h.gone:
            raise ProcessLookupError(errno.ESRCH, "gone")
        return procfs.TaskSecurity(h.tracer, h.vmm_uid, 0, 0, h.vmm_gid, h.vmm_caps)

    def has_capability(cap: int, pid: str = "self") -> bool:
        assert (cap, pid) == (procfs.CAP_SYS_PTRACE, "self")
        return h.cap_sys_ptrace

    def owner_uid(pid: int) -> int:
        assert pid == VMM
        if h.proc_owner_error:
            raise PermissionError(errno.EACCES, "denied")
        return h.vmm_uid[1] if h.proc_owner is None else h.proc_owner

    def comm(pid: int, tid: Optional[int] = None) -> str:
        assert (pid, tid) == (TRACER, None)
        return "gdb"

    monkeypatch.setattr(procfs, "task_security", task_security)
    monkeypatch.setattr(procfs, "has_capability", has_capability)
    monkeypatch.setattr(procfs, "ptrace_scope", lambda: h.scope)
    monkeypatch.setattr(procfs, "owner_uid", owner_uid)
    monkeypatch.setattr(procfs, "comm", comm)
    return h


def explain() -> SerrinjError:
    return session._explain_seize_eperm(VMM, TID)


def denied(err: SerrinjError) -> PermissionDenied:
    assert type(err) is PermissionDenied, err
    assert err.exit_code == ExitCode.PERMISSION and int(err.exit_code) == 4
    return err


def test_thread_gone(host: Host) -> None:
    host.gone = True
    err = explain()
    assert type(err) is TargetGone and err.exit_code == ExitCode.NOT_FOUND
    assert str(err) == f"thread {TID} of process {VMM} exited"
    assert ("task_security", VMM, TID) in host.calls  # the thread, not only the process


def test_already_traced_is_a_conflict_naming_the_tracer(host: Host) -> None:
    host.tracer = TRACER
    host.cap_sys_ptrace = True  # even root cannot take a thread that has a tracer
    err = explain()
    assert type(err) is Conflict and err.exit_code == ExitCode.CONFLICT
    assert str(err) == (
        f"thread {TID} of process {VMM} is already traced by process {TRACER} (gdb)"
    )
    assert err.hint is not None and "detach the debugger" in err.hint


@pytest.mark.parametrize("cap", [False, True], ids=["no-cap", "cap"])
def test_yama_scope_3_refuses_even_cap_sys_ptrace(host: Host, cap: bool) -> None:
    host.scope, host.cap_sys_ptrace = 3, cap
    err = denied(explain())
    assert str(err) == (
        f"ptrace of process {VMM} denied: Yama ptrace_scope is 3 (no attach at all)"
    )
    assert err.hint == "ptrace_scope 3 can only be lowered by a reboot"


@pytest.mark.parametrize(
    "uid, gid",
    [
        ((UID + 1,) * 4, (GID,) * 4),
        ((UID, UID + 1, UID, UID), (GID,) * 4),  # a set-uid VMM: only its euid differs
        ((UID,) * 4, (GID, GID, GID + 1, GID)),  # only its saved gid differs
    ],
    ids=["uid", "euid", "sgid"],
)
def test_other_ids_without_cap_sys_ptrace(
    host: Host, uid: Tuple[int, int, int, int], gid: Tuple[int, int, int, int]
) -> None:
    host.vmm_uid, host.vmm_gid = uid, gid
    host.scope = 1  # the uid check comes first: it is what the user must fix
    err = denied(explain())
    assert str(err) == (
        f"ptrace of process {VMM} denied: it runs as uid {uid[0]} gid {gid[0]}, serrinj as"
        f" uid {UID} gid {GID} (its real ids; ptrace needs them to match), without"
        " CAP_SYS_PTRACE"
    )
    assert err.hint is not None and "CAP_SYS_PTRACE" in err.hint


def test_yama_scope_2_without_cap_sys_ptrace(host: Host) -> None:
    host.scope = 2
    err = denied(explain())
    assert str(err) == f"ptrace of process {VMM} denied: Yama ptrace_scope is 2 (admin only)"
    assert err.hint == "run serrinj with CAP_SYS_PTRACE (e.g. as root)"


def test_yama_scope_1_without_cap_sys_ptrace(host: Host) -> None:
    host.scope = 1
    err = denied(explain())
    assert str(err) == (
        f"ptrace of process {VMM} denied: Yama ptrace_scope is 1 (descendants only)"
    )
    assert err.hint is not None and "kernel.yama.ptrace_scope=0" in err.hint


def test_not_dumpable(host: Host) -> None:
    host.proc_owner = UID + 7  # /proc/PID belongs to root when the process is not dumpable
    err = denied(explain())
    assert str(err) == (
        f"ptrace of process {VMM} denied: the VMM is not dumpable"
        " (PR_SET_DUMPABLE 0 or a set-uid binary)"
    )
    assert err.hint == "run serrinj with CAP_SYS_PTRACE"


def test_capabilities_the_vmm_holds_and_serrinj_lacks(host: Host) -> None:
    host.vmm_caps, host.my_caps = CAP_NET_ADMIN | 1, 1
    err = denied(explain())
    assert str(err) == (
        f"ptrace of process {VMM} denied: it holds capabilities serrinj lacks"
        f" (CapPrm {CAP_NET_ADMIN | 1:#x}, serrinj {1:#x}), and serrinj has no CAP_SYS_PTRACE"
    )
    assert err.hint is not None and "at least the VMM's capabilities" in err.hint


def test_unreadable_proc_owner_skips_the_dumpable_check(host: Host) -> None:
    host.proc_owner_error = True
    host.vmm_caps = CAP_NET_ADMIN
    err = denied(explain())
    assert "it holds capabilities serrinj lacks" in str(err)


@pytest.mark.parametrize(
    "setup",
    [
        {},  # nothing serrinj can see explains it
        {"cap_sys_ptrace": True, "scope": 2, "vmm_uid": (UID + 1,) * 4, "proc_owner": 0},
        {"scope": None},  # no Yama at all
    ],
    ids=["all-allowed", "cap-sys-ptrace", "no-yama"],
)
def test_otherwise_a_security_module(host: Host, setup: Dict[str, object]) -> None:
    for key, value in setup.items():
        setattr(host, key, value)
    err = denied(explain())
    assert str(err) == (
        f"ptrace of process {VMM} denied by a security module (SELinux, AppArmor or similar)"
    )
    assert err.hint == "check the audit log for the denial"


def test_the_same_explanation_names_another_action(host: Host) -> None:
    """pidfd_getfd makes the same access check; the caller names what was refused."""
    host.scope = 2
    sec = procfs.task_security(VMM)
    err = session.explain_ptrace_denial(VMM, sec, f"taking fd 11 of process {VMM}")
    assert str(err) == f"taking fd 11 of process {VMM} denied: Yama ptrace_scope is 2 (admin only)"
