"""Find KVM VMs, their vCPUs and the thread that runs each vCPU.

A vCPU is (VM, vcpu_id), not an fd: a VMM may hold several fds on one vCPU
(Firecracker dups every vCPU fd for its VMM thread, and Python's ``mmap`` of
``kvm_run`` dups the fd it maps). Every fd whose link reads
``anon_inode:kvm-vcpu:<id>`` is collected; fds with the same id are one vCPU
(``kcmp(KCMP_FILE)`` tells apart two VMs' vCPUs with the same id in one
process). Any of a vCPU's fds may carry its ioctls, since KVM checks only the
process; serrinj uses the one the thread itself runs KVM_RUN on when that is
known, else the lowest.

Everything comes from /proc (BRIEF section 6). Each source below gives
*evidence* (this thread runs this vCPU); all of it is gathered, and where two
sources disagree the more direct one wins, in this order (:data:`SOURCES`):

1. ``syscall``: ``/proc/PID/task/TID/syscall`` shows the thread blocked in
   ``ioctl(fd, KVM_RUN)`` on one of the vCPU's fds, now (idle guests);
2. ``probe``: a ptrace probe, only when asked, of the threads still unmapped
   (then of those mapped by name alone), one at a time (:func:`probe_order`):
   the thread is stopped, and the KVM_RUN it left (x86_64) or the next one it
   enters (a thread waiting outside KVM_RUN, aarch64) names the fd, now;
   nothing of the thread is changed;
3. ``debugfs``: ``/sys/kernel/debug/kvm/<tid>-<vmfd>/vcpu<N>/pid``, when
   mounted and readable: KVM's record of the thread that *last entered*
   KVM_RUN on vCPU N (right unless the VMM moved the vCPU since);
4. ``name``: the VMM's thread names (``CPU 1/KVM``, ``fc_vcpu 1``...), whose
   index is a CPU index, not always the vcpu_id: used only when they agree
   with every mapping above;
5. ``single``: a VM with one vCPU and one candidate thread.

Each vCPU keeps its evidence: the sources that agreed with the winner and
those that named another thread (shown by ``list`` and ``status``).

Kernel threads and user workers that live in a VMM's task list
(``kvm-nx-lpage-recovery``) are skipped: they cannot run a syscall for serrinj.
"""

from __future__ import annotations

import errno
import os
import re
import time
from dataclasses import dataclass, field, replace
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

from serrinj import _native
from serrinj.errors import InvalidInput, PermissionDenied, TargetGone, TargetNotFound
from serrinj.host import procfs
from serrinj.kvm import arch as kvm_arch
from serrinj.kvm.api import KVM_RUN
from serrinj.remote.arch import Arch, host_arch

_VM_LINK = "anon_inode:kvm-vm"
_VCPU_LINK = re.compile(r"^anon_inode:kvm-vcpu:(\d+)$")
#: capability(7) numbers
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2

#: thread-name patterns of known VMMs -> (vmm kind, regex with the vCPU index)
_THREAD_NAMES: Sequence[Tuple[str, re.Pattern[str]]] = (
    ("qemu", re.compile(r"^CPU (\d+)/KVM$")),
    ("kvmtool", re.compile(r"^kvm-vcpu-(\d+)$")),
    ("firecracker", re.compile(r"^fc_vcpu (\d+)$")),
    ("cloud-hypervisor", re.compile(r"^vcpu(\d+)$")),
    ("crosvm", re.compile(r"^crosvm_vcpu(\d+)$")),
)


#: the sources of evidence of which thread runs a vCPU, most direct first
SOURCES: Tuple[str, ...] = ("syscall", "probe", "debugfs", "name", "single")
_RANK = {source: i for i, source in enumerate(SOURCES)}


class Thread(NamedTuple):
    """A (non-kernel) thread of a VMM."""

    tid: int
    name: str
    #: "in-kvm-run" (blocked inside KVM_RUN: a halted/idle vCPU), "running"
    #: (on a CPU: in the guest or in VMM code), "blocked" (in another syscall),
    #: "unknown" (its syscall file may not be read: Yama)
    state: str
    syscall_nr: Optional[int] = None
    seccomp_mode: int = 0
    seccomp_filters: int = 0
    #: the fd of the KVM_RUN the thread is blocked in ("in-kvm-run" only)
    kvm_run_fd: Optional[int] = None


class Evidence(NamedTuple):
    """One source's word on which thread runs a vCPU."""

    source: str
    tid: int
    #: the vCPU fd the thread was seen using (syscall, probe)
    fd: Optional[int] = None

    def as_dict(self) -> Dict[str, object]:
        return {"source": self.source, "tid": self.tid, "fd": self.fd}


@dataclass(frozen=True)
class Vcpu:
    """A vCPU of a VM: its fds and, when known, the thread that runs it."""

    vcpu_id: int
    #: the fd serrinj issues the vCPU's ioctls on: the one its thread runs
    #: KVM_RUN on when known, else the lowest of :attr:`fds`
    fd: int
    thread: Optional[Thread] = None
    #: the most direct source that named the thread (see :data:`SOURCES`), or
    #: "" if unknown
    mapped_by: str = ""
    #: every fd of the VMM on this vCPU (``(fd,)`` when not given)
    fds: Tuple[int, ...] = ()
    #: everything every source said about this vCPU, most direct first
    evidence: Tuple[Evidence, ...] = ()

    def __post_init__(self) -> None:
        if not self.fds:
            object.__setattr__(self, "fds", (self.fd,))

    @property
    def sources(self) -> Tuple[str, ...]:
        """The sources that named the thread that runs it (the winner first)."""
        if self.thread is None:
            return ()
        tid = self.thread.tid
        agreed = [e.source for e in self.evidence if e.tid == tid]
        if self.mapped_by and self.mapped_by not in agreed:
            agreed.insert(0, self.mapped_by)
        return tuple(dict.fromkeys(agreed))

    @property
    def disagreements(self) -> Tuple[Evidence, ...]:
        """Evidence that named another thread than the one used (which lost)."""
        tid = self.thread.tid if self.thread is not None else None
        return tuple(e for e in self.evidence if e.tid != tid)


@dataclass(frozen=True)
class Vm:
    """A process that holds KVM VM or vCPU fds."""

    pid: int
    starttime: int
    comm: str
    name: Optional[str]
    vmm: str
    arch: kvm_arch.Arch
    uid: int
    vm_fds: Tuple[int, ...]
    vcpus: Tuple[Vcpu, ...]
    threads: Tuple[Thread, ...] = field(default=(), repr=False)

    def vcpu(self, vcpu_id: int) -> Vcpu:
        for v in self.vcpus:
            if v.vcpu_id == vcpu_id:
                return v
        ids = ", ".join(str(v.vcpu_id) for v in self.vcpus) or "none"
        raise TargetNotFound(
            f"VM {self.label} has no vCPU {vcpu_id}", hint=f"its vCPU ids are: {ids}"
        )

    @property
    def label(self) -> str:
        return f"{self.name!r} (pid {self.pid})" if self.name else f"pid {self.pid}"

    @property
    def unmapped(self) -> Tuple[Vcpu, ...]:
        return tuple(v for v in self.vcpus if v.thread is None)


# ---------------------------------------------------------------------- naming
def qemu_name(argv: Sequence[str]) -> Optional[str]:
    """The VM name from a QEMU-style ``-name guest=NAME,...`` or ``-name NAME``."""
    for i, arg in enumerate(argv):
        value = None
        if arg in ("-name", "--name") and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(("-name=", "--name=")):
            value = arg.split("=", 1)[1]
        if value is None:
            continue
        parts = [p for p in re.split(r"(?<!,),(?!,)", value) if p]
        for p in parts:
            if p.startswith("guest="):
                return p[len("guest=") :].replace(",,", ",")
        if parts and "=" not in parts[0]:
            return parts[0].replace(",,", ",")
    return None


#: where libvirt's QEMU driver writes ``DOMAIN.pid`` for each running domain
LIBVIRT_RUN_DIRS: Tuple[str, ...] = ("/run/libvirt/qemu", "/var/run/libvirt/qemu")


class HostPaths(NamedTuple):
    """Where discovery reads this machine: procfs, KVM's debugfs, libvirt's pid files.

    Every reader of discovery takes one (``host``, this machine by default); the
    unit tests pass the roots of a fake tree.
    """

    proc: str = procfs.PROC
    debugfs_kvm: str = "/sys/kernel/debug/kvm"
    #: ``None``: :data:`LIBVIRT_RUN_DIRS`
    libvirt_run_dirs: Optional[Tuple[str, ...]] = None


#: this machine
HOST = HostPaths()


def libvirt_pid(domain: str, host: HostPaths = HOST) -> Optional[int]:
    """The QEMU pid libvirt recorded for the running ``domain`` (``None``: no such record)."""
    for pid, name in _libvirt_names(host).items():
        if name == domain:
            return pid
    return None


def _libvirt_names(host: HostPaths = HOST) -> Dict[int, str]:
    """pid -> libvirt domain name, from the QEMU driver's pid files."""
    names: Dict[int, str] = {}
    dirs = LIBVIRT_RUN_DIRS if host.libvirt_run_dirs is None else host.libvirt_run_dirs
    for base in dirs:
        try:
            entries = os.listdir(base)
        except OSError:
            continue
        for entry in entries:
            if not entry.endswith(".pid"):
                continue
            try:
                with open(os.path.join(base, entry)) as f:
                    names[int(f.read().strip())] = entry[: -len(".pid")]
            except (OSError, ValueError):
                continue
    return names


def vmm_kind(comm: str, argv: Sequence[str], thread_names: Iterable[str]) -> str:
    """A best guess at which VMM a process is (a hint for display only)."""
    exe = os.path.basename(argv[0]) if argv else comm
    if exe.startswith("qemu-system") or comm.startswith("qemu-system") or exe == "qemu-kvm":
        return "qemu"
    if "serrinj.testvm" in argv:
        return "serrinj-testvm"
    for kind in ("firecracker", "cloud-hypervisor", "crosvm"):
        if kind in exe or comm.startswith(kind[:15]):
            return kind
    if exe in ("lkvm", "kvmtool") or comm in ("lkvm", "kvmtool"):
        return "kvmtool"
    names = list(thread_names)
    for kind, pattern in _THREAD_NAMES:
        if any(pattern.match(n) for n in names):
            return kind
    return "unknown"


# ---------------------------------------------------------------------- scanning
def _kvm_fds(pid: int, host: HostPaths = HOST) -> Tuple[List[int], Dict[int, int]]:
    vm_fds: List[int] = []
    vcpu_fds: Dict[int, int] = {}  # fd -> vcpu_id
    for fd, target in procfs.fd_targets(pid, host.proc):
        if target == _VM_LINK:
            vm_fds.append(fd)
            continue
        m = _VCPU_LINK.match(target)
        if m:
            vcpu_fds[fd] = int(m.group(1))
    return sorted(vm_fds), vcpu_fds


def _threads(pid: int, arch: Arch, host: HostPaths = HOST) -> List[Thread]:
    out = []
    for tid in procfs.tids(pid, host.proc):
        try:
            if procfs.stat(pid, tid, host.proc).kernel_thread:
                continue
            sec = procfs.task_security(pid, tid, host.proc)
            name = procfs.comm(pid, tid, host.proc)
            try:
                sc: Optional[procfs.SyscallState] = procfs.syscall(pid, tid, host.proc)
            except PermissionError:
                # the syscall file needs ptrace *attach* access (Yama's ptrace_scope 1
                # or 2 refuses it where the fds could be read): the state is unknown,
                # and the refusal is explained when the thread is seized
                sc = None
        except ProcessLookupError:
            continue  # the thread exited while we looked
        run_fd = None
        if sc is None:
            out.append(Thread(tid, name, "unknown", None, sec.seccomp_mode, sec.seccomp_filters))
            continue
        if sc.running:
            state = "running"
        elif sc.nr == arch.nr["ioctl"] and len(sc.args) > 1 and sc.args[1] == KVM_RUN:
            state = "in-kvm-run"
            run_fd = sc.args[0]
        else:
            state = "blocked"
        out.append(Thread(tid, name, state, sc.nr, sec.seccomp_mode, sec.seccomp_filters, run_fd))
    return out


def _group_vcpu_fds(pid: int, vcpu_fds: Dict[int, int]) -> List[Tuple[int, Tuple[int, ...]]]:
    """(vcpu_id, fds) per vCPU: the fds with one vcpu_id are one vCPU, unless
    ``kcmp(KCMP_FILE)`` says they are different open files (two VMs in one
    process, each with a vCPU of that id). A dup'ed fd is the same open file."""
    by_id: Dict[int, List[int]] = {}
    for fd, vid in sorted(vcpu_fds.items()):
        by_id.setdefault(vid, []).append(fd)
    out: List[Tuple[int, Tuple[int, ...]]] = []
    for vid, fds in sorted(by_id.items()):
        files: List[List[int]] = []
        for fd in fds:
            for same in files:
                if _same_file(pid, same[0], fd):
                    same.append(fd)
                    break
            else:
                files.append([fd])
        out.extend((vid, tuple(f)) for f in files)
    return out


def _same_file(pid: int, fd1: int, fd2: int) -> bool:
    try:
        return _native.kcmp_file(pid, fd1, pid, fd2) == 0
    except OSError:
        return True  # kcmp unavailable (or the process is gone): by the id alone


def _debugfs_evidence(
    pid: int, tids: Iterable[int], host: HostPaths = HOST
) -> List[Tuple[int, int]]:
    """(vcpu_id, tid) from KVM's debugfs, when mounted and readable.

    KVM names a VM's directory ``<tid>-<fd>`` after the thread that created it
    (the VMM's main thread or another one) and the VM fd number it got then.
    """
    owners = {pid, *tids}
    out: List[Tuple[int, int]] = []
    try:
        dirs = sorted(os.listdir(host.debugfs_kvm))
    except OSError:
        return out
    for d in dirs:
        creator, sep, vm_fd = d.partition("-")
        if not sep or not creator.isdigit() or not vm_fd.isdigit() or int(creator) not in owners:
            continue
        base = f"{host.debugfs_kvm}/{d}"
        try:
            entries = sorted(os.listdir(base))
        except OSError:
            continue
        for entry in entries:
            if not entry.startswith("vcpu") or not entry[4:].isdigit():
                continue
            try:
                with open(f"{base}/{entry}/pid") as f:
                    tid = int(f.read().strip())
            except (OSError, ValueError):
                continue
            if tid > 0:
                out.append((int(entry[4:]), tid))
    return out


def debugfs_available(host: HostPaths = HOST) -> bool:
    """Whether KVM's debugfs directory is mounted and readable here."""
    return os.access(host.debugfs_kvm, os.R_OK | os.X_OK)


def _name_evidence(threads: Sequence[Thread]) -> List[Tuple[int, int]]:
    """(index, tid) from the VMM's vCPU thread names."""
    out = []
    for t in threads:
        for _kind, pattern in _THREAD_NAMES:
            m = pattern.match(t.name)
            if m:
                out.append((int(m.group(1)), t.tid))
                break
    return out


def map_vcpus(
    groups: Sequence[Tuple[int, Tuple[int, ...]]],
    threads: Sequence[Thread],
    debugfs: Sequence[Tuple[int, int]] = (),
    probed: Sequence[Evidence] = (),
) -> List[Vcpu]:
    """Weigh every source's evidence and map each vCPU to at most one thread.

    ``groups`` is (vcpu_id, fds) per vCPU. Evidence is taken most direct first
    (:data:`SOURCES`); a vCPU and a thread are each mapped once. The names are
    used only when they agree with every mapping made from the other sources:
    a name's index is the VMM's CPU index, and one that disagrees means the
    indices are not the vcpu_ids (e.g. x86 APIC ids with gaps).
    """
    by_tid = {t.tid: t for t in threads}
    fd_to_group = {fd: i for i, (_vid, fds) in enumerate(groups) for fd in fds}
    ids: Dict[int, List[int]] = {}
    for i, (vid, _fds) in enumerate(groups):
        ids.setdefault(vid, []).append(i)
    claims: List[Tuple[int, Evidence]] = []  # (group index, evidence)
    for t in threads:
        if t.kvm_run_fd is not None and t.kvm_run_fd in fd_to_group:
            claims.append((fd_to_group[t.kvm_run_fd], Evidence("syscall", t.tid, t.kvm_run_fd)))
    for e in probed:
        if e.fd is not None and e.fd in fd_to_group and e.tid in by_tid:
            claims.append((fd_to_group[e.fd], e))
    for source, pairs in (("debugfs", debugfs), ("name", _name_evidence(threads))):
        for vid, tid in pairs:
            # an id held by two VMs of one process is ambiguous: no claim
            if tid in by_tid and len(ids.get(vid, ())) == 1:
                claims.append((ids[vid][0], Evidence(source, tid)))
    claims.sort(key=lambda c: _RANK[c[1].source])

    winner: Dict[int, Evidence] = {}
    taken: Dict[int, int] = {}  # tid -> group index

    def take(gi: int, e: Evidence) -> None:
        if gi not in winner and e.tid not in taken:
            winner[gi] = e
            taken[e.tid] = gi

    for gi, e in claims:
        if e.source != "name":
            take(gi, e)
    names = [(gi, e) for gi, e in claims if e.source == "name"]
    if all(winner[gi].tid == e.tid for gi, e in names if gi in winner) and all(
        taken.get(e.tid, gi) == gi for gi, e in names
    ):
        for gi, e in names:
            take(gi, e)
    unmapped = [gi for gi in range(len(groups)) if gi not in winner]
    free = [t for t in threads if t.tid not in taken and t.state != "blocked"]
    if len(groups) == 1 and len(unmapped) == 1 and len(free) == 1:
        e = Evidence("single", free[0].tid)
        claims.append((0, e))
        take(0, e)

    out = []
    for gi, (vid, fds) in enumerate(groups):
        evidence = tuple(e for g, e in claims if g == gi)
        w = winner.get(gi)
        if w is None:
            out.append(Vcpu(vid, fds[0], fds=fds, evidence=evidence))
            continue
        # the fd the thread itself was seen on, else the one another source saw, else the lowest
        seen = [e.fd for e in evidence if e.tid == w.tid and e.fd is not None]
        fd = seen[0] if seen else fds[0]
        out.append(Vcpu(vid, fd, by_tid[w.tid], w.source, fds, evidence))
    return sorted(out, key=lambda v: (v.vcpu_id, v.fds))


def inspect(pid: int, arch: Optional[Arch] = None, host: HostPaths = HOST) -> Optional[Vm]:
    """The VM held by process ``pid``, or ``None`` when it holds no KVM fds (or
    serrinj may not read them: :func:`hidden` names those processes)."""
    arch = arch or host_arch()
    try:
        vm_fds, vcpu_fds = _kvm_fds(pid, host)
    except PermissionError:
        return None
    if not vm_fds and not vcpu_fds:
        return None
    starttime = procfs.stat(pid, root=host.proc).starttime
    comm = procfs.comm(pid, root=host.proc)
    argv = procfs.cmdline(pid, host.proc)
    threads = _threads(pid, arch, host)
    debugfs = _debugfs_evidence(pid, (t.tid for t in threads), host)
    vcpus = map_vcpus(_group_vcpu_fds(pid, vcpu_fds), threads, debugfs)
    name = qemu_name(argv) or _libvirt_names(host).get(pid)
    uid = procfs.task_security(pid, root=host.proc).uid[1]
    return Vm(
        pid=pid,
        starttime=starttime,
        comm=comm,
        name=name,
        vmm=vmm_kind(comm, argv, (t.name for t in threads)),
        arch=kvm_arch.Arch(arch.name),
        uid=uid,
        vm_fds=tuple(vm_fds),
        vcpus=tuple(vcpus),
        threads=tuple(threads),
    )


def scan(arch: Optional[Arch] = None, host: HostPaths = HOST) -> List[Vm]:
    """Every process on the host that holds KVM fds (those serrinj may inspect;
    :func:`hidden` names the others)."""
    out = []
    me = os.getpid()
    for pid in procfs.pids(host.proc):
        if pid == me:
            continue
        try:
            vm = inspect(pid, arch, host)
        except ProcessLookupError:
            continue  # exited while we looked: it is simply not listed
        if vm is not None:
            out.append(vm)
    return out


def hidden(host: HostPaths = HOST) -> Tuple[int, ...]:
    """User processes whose fds serrinj may not read and that may be VMMs it misses.

    Without CAP_SYS_PTRACE any other user's process may be a VMM. With it, a
    process that still cannot be read is protected by something else (e.g. a
    container's init outside serrinj's reach): it counts only when it looks
    like a VMM (its name, command line or thread names), so that root on a
    host with such a process still gets "no VM" (exit 3), not a permission error.
    """
    privileged = procfs.has_capability(procfs.CAP_SYS_PTRACE, root=host.proc)
    out = []
    for pid in procfs.pids(host.proc):
        if pid == os.getpid() or not _fds_denied(pid, host):
            continue
        try:
            if procfs.stat(pid, root=host.proc).kernel_thread:  # kernel threads are no VMMs
                continue
        except ProcessLookupError:
            continue
        if privileged and not _looks_like_vmm(pid, host):
            continue
        out.append(pid)
    return tuple(out)


def hidden_error(
    denied: Sequence[int], what: str = "no KVM VM was found", host: HostPaths = HOST
) -> PermissionDenied:
    """The error for a search that found nothing while ``denied`` processes were hidden."""
    n = len(denied)
    vmms = [p for p in denied if _looks_like_vmm(p, host)]
    shown = ", ".join(f"{p} ({_comm(p, host)})" for p in (vmms or list(denied))[:4])
    among = "likely VMMs among them" if vmms else "e.g."
    return PermissionDenied(
        f"{what}, and serrinj may not read the fds of {n} process{'es' if n > 1 else ''}"
        f" ({among}: {shown}): /proc/PID/fd access is missing",
        hint="reading another user's /proc/PID/fd needs ptrace access: run serrinj as"
        " the VMM's user, or as root (CAP_SYS_PTRACE)",
    )


def _fds_denied(pid: int, host: HostPaths = HOST) -> bool:
    """Whether ``pid``'s fds are unreadable to serrinj. os.access() checks only the
    mode bits, and a root caller may list /proc/PID/fd yet not read its links:
    both also need ptrace read access to the process."""
    try:
        names = os.listdir(f"{host.proc}/{pid}/fd")
        for name in names[:1]:
            os.readlink(f"{host.proc}/{pid}/fd/{name}")
    except PermissionError:
        return True
    except OSError:
        pass  # exited meanwhile
    return False


def _fd_denial(pid: int, host: HostPaths = HOST) -> PermissionDenied:
    """Why this process may not read ``pid``'s fds (ptrace read access, file-system ids)."""
    reason = ""
    try:
        sec = procfs.task_security(pid, root=host.proc)
        caps = int(procfs.status(os.getpid(), root=host.proc).get("CapEff", "0"), 16)
        fsuid, fsgid = procfs.task_security(os.getpid(), root=host.proc).uid[3], os.getegid()
        if not procfs.has_capability(procfs.CAP_SYS_PTRACE, root=host.proc):
            if any(u != fsuid for u in sec.uid[:3]) or any(g != fsgid for g in sec.gid[:3]):
                reason = f": it runs as uid {sec.uid[0]} gid {sec.gid[0]}, serrinj as uid {fsuid}"
            elif sec.cap_permitted & ~caps:
                reason = ": it holds capabilities serrinj lacks, and serrinj has no CAP_SYS_PTRACE"
        elif not caps & (1 << _CAP_DAC_READ_SEARCH | 1 << _CAP_DAC_OVERRIDE):
            owner = procfs.owner_uid(pid, host.proc)
            if owner != fsuid:
                # /proc/PID/fd (0500) and .../syscall (0400) belong to the VMM's uid: the
                # file-mode check comes before the ptrace check that CAP_SYS_PTRACE passes
                reason = (
                    f": its /proc/PID/fd belongs to uid {owner}, serrinj runs as uid {fsuid};"
                    " CAP_SYS_PTRACE does not pass that file-mode check, CAP_DAC_READ_SEARCH does"
                )
    except ProcessLookupError:
        raise TargetGone(f"process {pid} exited") from None
    return PermissionDenied(
        f"cannot read the fds of process {pid} ({_comm(pid, host)}){reason}",
        hint="reading /proc/PID/fd needs ptrace access: run serrinj as the VMM's user (with"
        " at least its capabilities), or as root with CAP_SYS_PTRACE",
    )


def _looks_like_vmm(pid: int, host: HostPaths = HOST) -> bool:
    root = host.proc
    try:
        names = [procfs.comm(pid, t, root) for t in procfs.tids(pid, root)]
        return vmm_kind(procfs.comm(pid, root=root), procfs.cmdline(pid, root), names) != "unknown"
    except (ProcessLookupError, PermissionError):
        return False


def _candidates_hint(vms: Sequence[Vm]) -> str:
    if not vms:
        return "no KVM VMs are running on this host (serrinj list shows them)"
    lines = ", ".join(f"{v.label} [{v.vmm}]" for v in vms)
    return f"candidates: {lines}; choose one with --pid or --name"


def find(pid: Optional[int] = None, name: Optional[str] = None, host: HostPaths = HOST) -> Vm:
    """The one VM the user means: by pid, by name, or the only one on the host."""
    if pid is not None:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            raise TargetNotFound(f"no process with pid {pid}") from None
        except PermissionError:
            pass
        try:
            vm = inspect(pid, host=host)
        except ProcessLookupError:
            raise TargetGone(f"process {pid} exited") from None
        if vm is None:
            if _fds_denied(pid, host):
                raise _fd_denial(pid, host)
            raise TargetNotFound(
                f"process {pid} ({_comm(pid, host)}) is not a KVM VMM: it holds no KVM VM or"
                " vCPU fds",
                hint=_candidates_hint(scan(host=host)),
            )
        if name is not None and vm.name != name:
            raise TargetNotFound(f"process {pid} is VM {vm.name!r}, not {name!r}")
        return vm
    vms = scan(host=host)
    if name is not None:
        named = [v for v in vms if v.name == name]
        if len(named) == 1:
            return named[0]
        if not named:
            denied = hidden(host)
            if denied:
                raise hidden_error(denied, f"no VM named {name!r} was found", host)
            raise TargetNotFound(f"no VM named {name!r}", hint=_candidates_hint(vms))
        raise InvalidInput(f"{len(named)} VMs are named {name!r}", hint=_candidates_hint(named))
    if len(vms) == 1:
        return vms[0]
    if not vms:
        denied = hidden(host)
        if denied:
            raise hidden_error(denied, host=host)
        raise TargetNotFound("no KVM VM is running on this host", hint=_candidates_hint(vms))
    raise InvalidInput(f"{len(vms)} VMs are running; say which one", hint=_candidates_hint(vms))


def _comm(pid: int, host: HostPaths = HOST) -> str:
    try:
        return procfs.comm(pid, root=host.proc)
    except (ProcessLookupError, OSError):
        return "?"


# ---------------------------------------------------------------------- fds
class FdOwner(NamedTuple):
    """A process holding the same open vCPU file as an fd given by the user."""

    pid: int
    fd: int
    vcpu_id: int


def vcpu_id_of_link(target: str) -> Optional[int]:
    m = _VCPU_LINK.match(target)
    return int(m.group(1)) if m else None


def find_file_holders(pid: int, fd: int, host: HostPaths = HOST) -> List[FdOwner]:
    """Every other process whose vCPU fd is the very same open file as ``pid``'s ``fd``
    (``kcmp(KCMP_FILE)``), e.g. the VMM that created a vCPU fd inherited by ``pid``."""
    owners = []
    for other in procfs.pids(host.proc):
        if other == pid:
            continue
        try:
            _vm, vcpu_fds = _kvm_fds(other, host)
        except (ProcessLookupError, PermissionError):
            continue
        for ofd, vid in vcpu_fds.items():
            try:
                if _native.kcmp_file(pid, fd, other, ofd) == 0:
                    owners.append(FdOwner(other, ofd, vid))
            except OSError as err:
                if err.errno in (errno.ESRCH, errno.EBADF):
                    continue
                if err.errno == errno.EPERM:
                    continue  # kcmp needs ptrace access to both processes
                raise
    return owners


# ---------------------------------------------------------------------- probing
#: how long a step of a thread seen blocked outside KVM_RUN waits for it to wake
#: (a vCPU whose guest exits to the VMM waits there for the VMM's work, e.g. an
#: I/O hand-off); the step's own timeout counts from the wake-up
PROBE_WAKE_WITHIN = 1.0
#: how many /proc samples :func:`probe` takes before it believes that no thread of
#: the VM runs (then nothing is probed: a paused VM's steps would never end in KVM_RUN)
PROBE_LOOKS = 5
PROBE_LOOK_GAP = 0.02


def _runs(vm: Vm) -> bool:
    """Whether the sample of ``vm`` caught some thread on a CPU or inside KVM_RUN."""
    return any(t.state in ("running", "in-kvm-run") for t in vm.threads)


def _vcpu_named(t: Thread) -> bool:
    return any(pattern.match(t.name) for _kind, pattern in _THREAD_NAMES)


def probe_order(vm: Vm, vcpus: Sequence[Vcpu], tried: Iterable[int] = ()) -> List[Thread]:
    """The threads worth probing for the unmapped vCPUs of ``vcpus``, likeliest
    and cheapest first.

    A thread mapped by a source other than the names is never probed. A thread
    mapped by its name alone is, after the unmapped ones: a name's index is the
    VMM's CPU index, and a probe that finds it on another vCPU overrules it.
    Among the unmapped threads, those seen on a CPU or in KVM_RUN come before
    those blocked in another syscall (a vCPU whose guest exits to the VMM,
    waiting there): a step of those lasts until they wake. Threads named like
    a VMM's vCPU threads come first, the main thread last. Blocked threads are
    probed only while the VM runs (some thread on a CPU or in KVM_RUN): in a
    paused VM every thread is blocked and no step would end in KVM_RUN.
    """
    skip = set(tried)
    by_name: set[int] = set()
    for v in vcpus:
        if v.thread is not None:
            (by_name if v.mapped_by == "name" else skip).add(v.thread.tid)
    runs = _runs(vm)

    def rank(t: Thread) -> int:
        blocked = t.state == "blocked"
        if t.tid in by_name:
            return 6 if blocked else 5
        if not blocked:
            return 0 if _vcpu_named(t) else 1
        if _vcpu_named(t):
            return 2
        return 4 if t.tid == vm.pid else 3

    out = [
        t
        for t in vm.threads
        if t.tid not in skip and t.seccomp_mode != 1 and (runs or t.state != "blocked")
    ]
    return sorted(out, key=rank)


def probe(
    vm: Vm, timeout: float = 0.5, wake_within: float = PROBE_WAKE_WITHIN, host: HostPaths = HOST
) -> Vm:
    """Map the still-unmapped vCPUs by briefly stopping candidate threads.

    A candidate (:func:`probe_order`) is stopped with PTRACE_INTERRUPT (a vCPU
    in the guest leaves KVM_RUN with EINTR, which every VMM treats as a kick).
    On x86_64 the stop's registers name the fd of the KVM_RUN it left;
    otherwise the thread is stepped to its next KVM_RUN entry, for ``timeout``
    (a thread seen blocked outside KVM_RUN first gets up to ``wake_within``
    to wake). Nothing of the thread is changed and it is detached at once;
    only that thread is stopped. Whatever vCPU a probe finds is evidence, and
    it overrules the names (then the threads they mapped are probed too).
    When no thread of the VM was seen running, /proc is sampled again, up to
    :data:`PROBE_LOOKS` times in all, before the VM is taken for paused.
    """
    from serrinj.remote.session import RemoteThread

    arch = host_arch()
    if not vm.unmapped:
        return vm
    groups = [(v.vcpu_id, v.fds) for v in vm.vcpus]
    debugfs = [(v.vcpu_id, e.tid) for v in vm.vcpus for e in v.evidence if e.source == "debugfs"]
    vcpu_fds = {fd for v in vm.vcpus for fd in v.fds}
    probed: List[Evidence] = []
    tried: List[int] = []
    vcpus: Sequence[Vcpu] = vm.vcpus
    looks = 1
    while any(v.thread is None for v in vcpus):
        order = probe_order(vm, vcpus, tried)
        if not order and looks < PROBE_LOOKS and not _runs(vm):
            # One /proc sample is a moment: every thread of a running VM can be
            # caught outside KVM_RUN at once (vCPUs that yield to the VMM, a busy
            # host). Look again before taking the VM for paused.
            time.sleep(PROBE_LOOK_GAP)
            fresh = inspect(vm.pid, host=host)
            if fresh is None:
                break
            vm, looks = replace(vm, threads=fresh.threads), looks + 1
            continue
        if not order:
            break
        t = order[0]
        tried.append(t.tid)
        try:
            with RemoteThread(vm.pid, t.tid, expected_starttime=vm.starttime) as rt:
                assert rt.saved is not None
                fd = arch.kvm_run_fd_at_stop(rt.saved)
                if fd is None:
                    wake = wake_within if t.state == "blocked" else 0.0
                    fd = rt.step_to_kvm_run_entry(timeout, wake)
        except TargetGone:
            continue
        if fd is not None and fd in vcpu_fds:
            probed.append(Evidence("probe", t.tid, fd))
            vcpus = map_vcpus(groups, vm.threads, debugfs, probed)
    return replace(vm, vcpus=tuple(vcpus))
