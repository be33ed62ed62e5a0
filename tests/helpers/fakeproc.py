"""A fake /proc tree (with KVM's debugfs and libvirt's pid files beside it) for the
discovery unit tests.

Discovery reads the machine through :class:`serrinj.target.discover.HostPaths`;
:attr:`FakeProc.host` points it at this tree, so a test states exactly what
/proc shows (pid dirs, ``comm``, ``stat``, ``status``, ``task/TID/...``,
``fd/N`` links such as ``anon_inode:kvm-vcpu:0``) instead of replacing the
readers. An fd link is a symlink to a target that need not exist: ``readlink``
returns the text, as the kernel's anon-inode links do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

from serrinj.target.discover import HostPaths

#: PF_FORKNOEXEC | PF_NOFREEZE: flags of an ordinary task (a kernel thread has them too)
OTHER_FLAGS = 0x00000040 | 0x00008000
#: the /proc/PID/task/TID/syscall line of a thread running on a CPU
RUNNING = "running\n"
#: a task as the tests describe it: (comm, stat flags, syscall line)
Task = Tuple[str, int, str]


def stat_line(tid: int, comm: str, flags: int, starttime: int = 12345, pgrp: int = 1) -> str:
    """A /proc/.../stat line: fields 3..22 are state, ppid, pgrp, session, tty, tpgid,
    flags, 12 counters, starttime."""
    counters = " ".join(["0"] * 12)
    return f"{tid} ({comm}) S 1 {pgrp} {pgrp} 0 -1 {flags} {counters} {starttime} 0 0\n"


def status_text(
    comm: str,
    uid: int = 0,
    gid: int = 0,
    cap_prm: int = 0x1FFFFFFFFFF,
    cap_eff: Optional[int] = None,
    tracer: int = 0,
    seccomp: int = 0,
    seccomp_filters: int = 0,
) -> str:
    """A /proc/.../status file with the keys serrinj reads."""
    eff = "" if cap_eff is None else f"CapEff:\t{cap_eff:016x}\n"
    return (
        f"Name:\t{comm}\nTracerPid:\t{tracer}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n"
        f"Gid:\t{gid}\t{gid}\t{gid}\t{gid}\nCapPrm:\t{cap_prm:016x}\n{eff}"
        f"Seccomp:\t{seccomp}\nSeccomp_filters:\t{seccomp_filters}\n"
    )


class FakeProc:
    """A /proc tree under ``base/proc``, KVM's debugfs under ``base/debugfs-kvm``
    (absent until :meth:`debugfs_vcpus`), libvirt's run dir under ``base/libvirt-qemu``
    (absent until :meth:`libvirt_pid_file`)."""

    def __init__(self, base: Path) -> None:
        self.root = base / "proc"
        self.root.mkdir(parents=True)
        self.debugfs = base / "debugfs-kvm"
        self.libvirt = base / "libvirt-qemu"
        #: what discovery reads: this tree, and nothing of the real host
        self.host = HostPaths(
            proc=str(self.root),
            debugfs_kvm=str(self.debugfs),
            libvirt_run_dirs=(str(self.libvirt), str(base / "missing")),
        )

    @property
    def proc(self) -> str:
        """The ``root`` to give the readers of :mod:`serrinj.host.procfs`."""
        return str(self.root)

    def process(
        self,
        pid: int,
        comm: str,
        cmdline: Sequence[str] = (),
        flags: int = OTHER_FLAGS,
        starttime: int = 12345,
    ) -> Path:
        """/proc/PID with its comm, cmdline, stat and status (no task, no fd yet)."""
        base = self.root / str(pid)
        (base / "fd").mkdir(parents=True)
        (base / "task").mkdir()
        (base / "comm").write_text(comm + "\n")
        (base / "cmdline").write_text("".join(a + "\0" for a in cmdline))
        (base / "stat").write_text(stat_line(pid, comm, flags, starttime, pid))
        (base / "status").write_text(status_text(comm))
        return base

    def task(
        self, pid: int, tid: int, comm: str, flags: int = OTHER_FLAGS, syscall: str = RUNNING
    ) -> Path:
        """/proc/PID/task/TID: its comm, stat (``flags``), status and syscall line."""
        task = self.root / str(pid) / "task" / str(tid)
        task.mkdir(parents=True)
        (task / "comm").write_text(comm + "\n")
        (task / "stat").write_text(stat_line(tid, comm, flags, pgrp=pid))
        (task / "status").write_text(status_text(comm))
        (task / "syscall").write_text(syscall)
        return task

    def fd(self, pid: int, fd: int, target: str) -> None:
        """/proc/PID/fd/FD, a link that reads ``target`` (``anon_inode:kvm-vcpu:0``...)."""
        (self.root / str(pid) / "fd" / str(fd)).symlink_to(target)

    def debugfs_vcpus(self, creator: int, vm_fd: int, pids: Dict[int, int]) -> None:
        """KVM's debugfs: ``<creator tid>-<vm fd>/vcpuN/pid``, the thread that last
        entered KVM_RUN on vCPU N (``pids``: vcpu_id -> tid)."""
        base = self.debugfs / f"{creator}-{vm_fd}"
        for vid, tid in pids.items():
            (base / f"vcpu{vid}").mkdir(parents=True)
            (base / f"vcpu{vid}" / "pid").write_text(f"{tid}\n")

    def libvirt_pid_file(self, name: str, text: str) -> None:
        """A file ``name`` in libvirt's QEMU run dir (``DOMAIN.pid`` holds the pid)."""
        self.libvirt.mkdir(exist_ok=True)
        (self.libvirt / name).write_text(text)


def kvm_run_line(nr_ioctl: int, fd: int, kvm_run: int) -> str:
    """The syscall line of a thread blocked in ``ioctl(fd, KVM_RUN)``."""
    return f"{nr_ioctl} {fd:#x} {kvm_run:#x} 0x0 0x0 0x0 0x0 0x7ffc1000 0x7f001000\n"
