"""Typed readers for the /proc files serrinj uses.

Every reader raises ``ProcessLookupError`` when the process or thread is gone
(the entry vanished between listing and reading, which is normal on a live
host), and ``PermissionError`` when it may not be read. Callers decide what
that means.

Every reader takes the root of the procfs tree it reads (``root``, ``/proc`` by
default): the unit tests pass a tree of their own.
"""

from __future__ import annotations

import errno
import os
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

#: where procfs is mounted: the default ``root`` of every reader here (the unit tests
#: pass the root of a fake tree instead)
PROC = "/proc"

#: task_struct->flags bits (include/linux/sched.h) of tasks that never run
#: user code: kernel threads, io_uring workers and user workers. KVM's
#: ``kvm-nx-lpage-recovery`` is a user worker since Linux 6.13 (a kernel
#: thread before): it lives in the VMM's task list, can be seized, and its
#: copied registers even show the vCPU's ``ioctl(fd, KVM_RUN)``.
PF_IO_WORKER = 0x00000010
PF_USER_WORKER = 0x00004000
PF_KTHREAD = 0x00200000
_NO_USER_CODE = PF_IO_WORKER | PF_USER_WORKER | PF_KTHREAD
#: the task is in do_exit (set before its state shows Z)
PF_EXITING = 0x00000004


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return f.read()
    except FileNotFoundError as err:
        raise ProcessLookupError(errno.ESRCH, f"{path} vanished") from err
    except OSError as err:
        if err.errno in (errno.ESRCH, errno.ENOENT):
            raise ProcessLookupError(errno.ESRCH, f"{path} vanished") from err
        raise


def _task(pid: int, tid: Optional[int], root: str) -> str:
    return f"{root}/{pid}" if tid is None else f"{root}/{pid}/task/{tid}"


def pids(root: str = PROC) -> List[int]:
    """Every pid currently listed in /proc."""
    return sorted(int(n) for n in os.listdir(root) if n.isdigit())


def tids(pid: int, root: str = PROC) -> List[int]:
    try:
        return sorted(int(n) for n in os.listdir(f"{root}/{pid}/task"))
    except FileNotFoundError as err:
        raise ProcessLookupError(errno.ESRCH, f"process {pid} vanished") from err


def comm(pid: int, tid: Optional[int] = None, root: str = PROC) -> str:
    return _read(f"{_task(pid, tid, root)}/comm").rstrip("\n")


def cmdline(pid: int, root: str = PROC) -> List[str]:
    raw = _read(f"{root}/{pid}/cmdline")
    return [a for a in raw.split("\0") if a] if raw else []


def exe(pid: int, root: str = PROC) -> Optional[str]:
    try:
        return os.readlink(f"{root}/{pid}/exe")
    except OSError:
        return None


class Stat(NamedTuple):
    """The fields of /proc/PID[/task/TID]/stat serrinj needs."""

    state: str
    flags: int
    starttime: int

    @property
    def exiting(self) -> bool:
        """The task is in ``do_exit`` (killed, or its process is exiting)."""
        return bool(self.flags & PF_EXITING) or self.state in ("Z", "X", "x")

    @property
    def kernel_thread(self) -> bool:
        """A task without user code (kernel thread or worker): never a vCPU thread."""
        return bool(self.flags & _NO_USER_CODE)


def stat(pid: int, tid: Optional[int] = None, root: str = PROC) -> Stat:
    raw = _read(f"{_task(pid, tid, root)}/stat")
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    rest = raw[raw.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state); flags is field 9, starttime field 22.
    return Stat(state=rest[0], flags=int(rest[6]), starttime=int(rest[19]))


def status(pid: int, tid: Optional[int] = None, root: str = PROC) -> Dict[str, str]:
    """/proc/.../status as a key -> value dict."""
    out: Dict[str, str] = {}
    for line in _read(f"{_task(pid, tid, root)}/status").splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


class TaskSecurity(NamedTuple):
    """Ptrace- and seccomp-relevant facts of a thread."""

    tracer_pid: int
    #: real, effective, saved and filesystem ids
    uid: Tuple[int, int, int, int]
    seccomp_mode: int
    seccomp_filters: int
    gid: Tuple[int, int, int, int] = (0, 0, 0, 0)
    #: the permitted capability set (a tracer needs all of them, or CAP_SYS_PTRACE)
    cap_permitted: int = 0
    #: the ``x86_Thread_features`` line ('' without one): ``shstk`` = a user shadow stack
    thread_features: str = ""


def task_security(pid: int, tid: Optional[int] = None, root: str = PROC) -> TaskSecurity:
    st = status(pid, tid, root)
    uids = st.get("Uid", "0 0 0 0").split()
    gids = st.get("Gid", "0 0 0 0").split()
    return TaskSecurity(
        tracer_pid=int(st.get("TracerPid", "0")),
        uid=(int(uids[0]), int(uids[1]), int(uids[2]), int(uids[3])),
        seccomp_mode=int(st.get("Seccomp", "0")),
        seccomp_filters=int(st.get("Seccomp_filters", "0")),
        gid=(int(gids[0]), int(gids[1]), int(gids[2]), int(gids[3])),
        cap_permitted=int(st.get("CapPrm", "0"), 16),
        thread_features=st.get("x86_Thread_features", ""),
    )


def owner_uid(pid: int, root: str = PROC) -> int:
    """The owner of ``/proc/PID``: the process's euid, or root when it is not dumpable."""
    try:
        return os.stat(f"{root}/{pid}").st_uid
    except FileNotFoundError as err:
        raise ProcessLookupError(errno.ESRCH, f"process {pid} vanished") from err


def sigkill_pending(pid: int, tid: Optional[int] = None, root: str = PROC) -> bool:
    """Whether SIGKILL is pending for the thread or its process (it is about to die)."""
    st = status(pid, tid, root)
    bit = 1 << (9 - 1)
    return any(int(st.get(key, "0"), 16) & bit for key in ("SigPnd", "ShdPnd"))


class SyscallState(NamedTuple):
    """/proc/PID/task/TID/syscall: what the thread is blocked in, if anything."""

    running: bool
    nr: Optional[int] = None
    args: Tuple[int, ...] = ()


def syscall(pid: int, tid: int, root: str = PROC) -> SyscallState:
    raw = _read(f"{root}/{pid}/task/{tid}/syscall").split()
    if not raw or raw[0] == "running":
        return SyscallState(running=True)
    nr = int(raw[0])
    if nr < 0:  # "-1 sp pc": blocked, but not in a syscall
        return SyscallState(running=False, nr=nr)
    return SyscallState(running=False, nr=nr, args=tuple(int(a, 16) for a in raw[1:7]))


class Mapping(NamedTuple):
    """One line of /proc/PID/maps.

    A named tuple, not a dataclass: a VMM with many threads lists hundreds of
    mappings, read before every seize, and a tuple is built in half the time.
    """

    start: int
    end: int
    perms: str
    offset: int
    path: str
    #: the mapped file's device ("fe:01") and inode; inode 0 for anonymous memory
    dev: str = ""
    inode: int = 0

    @property
    def readable(self) -> bool:
        return self.perms[0] == "r"

    @property
    def writable(self) -> bool:
        return self.perms[1] == "w"

    @property
    def executable(self) -> bool:
        return self.perms[2] == "x"

    def contains(self, addr: int, size: int = 1) -> bool:
        return self.start <= addr and addr + size <= self.end


def maps(pid: int, root: str = PROC) -> List[Mapping]:
    out = []
    for line in _read(f"{root}/{pid}/maps").splitlines():
        parts = line.split(None, 5)
        lo, _, hi = parts[0].partition("-")
        out.append(
            Mapping(
                int(lo, 16),
                int(hi, 16),
                parts[1],
                int(parts[2], 16),
                parts[5] if len(parts) > 5 else "",
                parts[3],
                int(parts[4]),
            )
        )
    return out


def fd_targets(pid: int, root: str = PROC) -> Iterator[Tuple[int, str]]:
    """``(fd, readlink target)`` for each open fd; fds that vanish are skipped."""
    base = f"{root}/{pid}/fd"
    try:
        names = os.listdir(base)
    except FileNotFoundError as err:
        raise ProcessLookupError(errno.ESRCH, f"process {pid} vanished") from err
    for name in names:
        try:
            yield int(name), os.readlink(f"{base}/{name}")
        except FileNotFoundError:
            continue


def ptrace_scope(root: str = PROC) -> Optional[int]:
    """Yama's ptrace_scope, or ``None`` when Yama is not enabled."""
    try:
        return int(_read(f"{root}/sys/kernel/yama/ptrace_scope").strip())
    except (ProcessLookupError, OSError, ValueError):
        return None


def has_capability(cap: int, pid: str = "self", root: str = PROC) -> bool:
    """Whether ``pid`` has capability ``cap`` in its effective set."""
    st = _read(f"{root}/{pid}/status")
    for line in st.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> cap & 1)
    return False


CAP_SYS_PTRACE = 19
CAP_SYS_ADMIN = 21
