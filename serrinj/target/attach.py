"""Which VM and vCPUs a command means, and a safe way to reach one of them.

:func:`attach` is the one place where a :class:`~serrinj.vcpu.base.Vcpu` backed by
the remote engine is made. It guarantees, before anything is sent:

- the thread is the vCPU's thread (checked again at the stop when the
  registers show the KVM_RUN it left, so a stale mapping is caught);
- the thread's seccomp filter lets every ioctl of the operation through; if
  not, another thread of the VMM whose filter does is used, while the vCPU
  thread is held stopped (out of KVM_RUN, so the vCPU mutex is free);
- if a call still waits on the vCPU mutex (another thread is inside KVM_RUN
  on that vCPU after all), the VMM's other runnable threads are held stopped
  until it completes, then released.

``--fd`` targets are resolved here too: a vCPU fd this process holds is
tried locally; KVM answers EIO unless this process created the VM, and then
the VMM that shares the open file is found with ``kcmp(KCMP_FILE)``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from dataclasses import replace
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

from serrinj import _native
from serrinj.errors import (
    Conflict,
    InvalidInput,
    KvmRejected,
    PermissionDenied,
    SeccompBlocked,
    TargetGone,
    TargetNotFound,
    Unsupported,
)
from serrinj.host import procfs
from serrinj.kvm import api
from serrinj.kvm.arch import Arch
from serrinj.remote.session import RemoteThread, explain_ptrace_denial
from serrinj.target import discover
from serrinj.vcpu import open_vcpu
from serrinj.vcpu.base import Vcpu
from serrinj.vcpu.executor import LocalExecutor
from serrinj.vcpu.remote import RemoteExecutor

VcpuSpec = Union[int, str, None]  # an id, "all", or None (= all when there is one, else error)


class Target(NamedTuple):
    """A resolved VM plus the vCPU ids a command acts on."""

    vm: discover.Vm
    vcpu_ids: Tuple[int, ...]


def parse_vcpu(value: Optional[str]) -> VcpuSpec:
    if value is None:
        return None
    if value == "all":
        return "all"
    try:
        n = int(value, 0)
    except ValueError:
        raise InvalidInput(
            f"--vcpu takes a vCPU id or 'all', not {value!r}", hint="serrinj list shows the ids"
        ) from None
    if n < 0:
        raise InvalidInput(f"--vcpu {value}: vCPU ids are not negative")
    return n


def resolve(
    pid: Optional[int] = None,
    name: Optional[str] = None,
    vcpu: VcpuSpec = None,
    *,
    single: bool = False,
) -> Target:
    """Find the VM and select vCPUs. ``single`` commands need exactly one vCPU."""
    return select(discover.find(pid=pid, name=name), vcpu, single=single)


def select(vm: discover.Vm, vcpu: VcpuSpec = None, *, single: bool = False) -> Target:
    """Select the vCPUs of a VM already found (see :func:`resolve`)."""
    if not vm.vcpus:
        raise TargetNotFound(f"VM {vm.label} has no vCPUs yet")
    if vcpu == "all":
        if single:
            raise InvalidInput("this command acts on one vCPU; --vcpu all is not allowed here")
        ids: Tuple[int, ...] = tuple(v.vcpu_id for v in vm.vcpus)
    elif vcpu is None:
        if single and len(vm.vcpus) > 1:
            ids_text = ", ".join(str(v.vcpu_id) for v in vm.vcpus)
            raise InvalidInput(
                f"VM {vm.label} has {len(vm.vcpus)} vCPUs; choose one with --vcpu",
                hint=f"vCPU ids: {ids_text}",
            )
        ids = tuple(v.vcpu_id for v in vm.vcpus) if not single else (vm.vcpus[0].vcpu_id,)
    else:
        assert isinstance(vcpu, int)
        vm.vcpu(vcpu)  # raises TargetNotFound with the valid ids
        ids = (vcpu,)
    return Target(vm, ids)


def ensure_mapped(vm: discover.Vm, vcpu_ids: Sequence[int]) -> discover.Vm:
    """Probe for threads when any selected vCPU has none yet."""
    if all(vm.vcpu(i).thread is not None for i in vcpu_ids):
        return vm
    vm = discover.probe(vm)
    if any(vm.vcpu(i).thread is None for i in vcpu_ids):
        vm = _paused_fallback(vm, vcpu_ids)
    for i in vcpu_ids:
        if vm.vcpu(i).thread is None:
            names = "name the VMM's threads (QEMU: -name ...,debug-threads=on)"
            more = (
                f"KVM's debugfs names none of its live threads either; {names}"
                if discover.debugfs_available()
                else f"mount debugfs (mount -t debugfs none /sys/kernel/debug) or {names}"
            )
            raise TargetNotFound(
                f"cannot tell which thread of {vm.label} runs vCPU {i}",
                hint=f"it is neither blocked in KVM_RUN nor entering it (paused VM?); {more}",
            )
    return vm


_PAUSED_LOOKS = 5


def _paused_fallback(vm: discover.Vm, vcpu_ids: Sequence[int]) -> discover.Vm:
    """A VM whose threads are all blocked outside KVM_RUN (paused) needs no mapping.

    The vCPU mutex is free while no thread is inside KVM_RUN, so any thread of
    the VMM may issue the ioctl; KVM only checks the process. The main thread
    is preferred (it is the least likely to be seccomp-filtered). Should a
    vCPU thread start running meanwhile, the stall guard in :func:`attach`
    holds it out of KVM_RUN.
    """
    # A busy host may catch one of a paused VMM's helper threads on a CPU: look a
    # few times. Never fall back if any look finds a thread inside KVM_RUN.
    fresh: Optional[discover.Vm] = None
    for attempt in range(_PAUSED_LOOKS):
        look = discover.inspect(vm.pid)
        if look is None or any(t.state == "in-kvm-run" for t in look.threads):
            return vm
        if look.threads and all(t.state == "blocked" for t in look.threads):
            fresh = look
            break
        if attempt + 1 < _PAUSED_LOOKS:
            time.sleep(0.02)
    if fresh is None:
        return vm
    main = next((t for t in fresh.threads if t.tid == vm.pid), fresh.threads[0])
    vcpus = tuple(
        replace(v, thread=main, mapped_by="any (VM paused)")
        if v.thread is None and v.vcpu_id in vcpu_ids
        else v
        for v in vm.vcpus
    )
    return replace(vm, vcpus=vcpus, threads=fresh.threads)


class _Held:
    """Threads stopped to keep them out of KVM_RUN while a call needs the vCPU."""

    def __init__(self, vm: discover.Vm, exclude: Sequence[int]) -> None:
        self.vm = vm
        self.exclude = set(exclude)
        self.threads: List[RemoteThread] = []

    def hold_others(self) -> None:
        for t in self.vm.threads:
            if t.tid in self.exclude or t.state == "blocked":
                continue
            rt = RemoteThread(self.vm.pid, t.tid, expected_starttime=self.vm.starttime)
            try:
                rt.attach()
            except (TargetGone, Conflict):
                continue
            self.threads.append(rt)
            self.exclude.add(t.tid)

    def release(self) -> None:
        while self.threads:
            self.threads.pop().close()


def _left_fd(rt: RemoteThread) -> Optional[int]:
    """The fd of the KVM_RUN the stopped thread left, when its registers show it."""
    assert rt.saved is not None
    return rt.arch.kvm_run_fd_at_stop(rt.saved)


@contextlib.contextmanager
def attach(
    vm: discover.Vm,
    vcpu_id: int,
    requests: Sequence[int],
    *,
    timeout: float = 2.0,
) -> Iterator[Tuple[Vcpu, RemoteThread]]:
    """Reach vCPU ``vcpu_id`` of ``vm`` for the ioctls in ``requests``.

    Yields the :class:`Vcpu` and the stopped vCPU thread (its first stop tells
    what the thread was doing). Everything is restored and detached on exit.
    """
    vm = ensure_mapped(vm, (vcpu_id,))
    v = vm.vcpu(vcpu_id)
    assert v.thread is not None
    held = _Held(vm, exclude=[v.thread.tid])
    with contextlib.ExitStack() as stack:
        stack.callback(held.release)
        try:
            rt = stack.enter_context(
                RemoteThread(
                    vm.pid,
                    v.thread.tid,
                    stop_timeout=timeout,
                    expected_starttime=vm.starttime,
                    on_stall=held.hold_others,
                    prefetch_maps=any(_ioc_size(r) for r in requests),
                )
            )
        except TargetGone as err:
            if _vmm_running(vm):
                raise TargetGone(
                    f"thread {v.thread.tid} of {vm.label}, which ran vCPU {vcpu_id}, has exited;"
                    " the VMM runs on",
                    hint="the VMM ended that vCPU (e.g. its guest triple-faulted);"
                    " `serrinj list` shows the VM as it is now",
                ) from err
            raise
        left = _left_fd(rt)
        if left is not None and left not in v.fds:
            fds = ", ".join(str(fd) for fd in v.fds)
            raise Conflict(
                f"thread {v.thread.tid} of {vm.label} runs the vCPU on fd {left}, not vCPU"
                f" {vcpu_id} (fd {fds}): the VMM moved its vCPUs",
                hint="run the command again",
            )
        if left is not None and left != v.fd:
            # another fd on the same vCPU: the one the thread itself uses is best
            v = replace(v, fd=left)
        exec_thread = rt
        try:
            _check_requests(rt, v.fd, requests)
        except SeccompBlocked as blocked:
            exec_thread = _helper_thread(vm, v, requests, stack, blocked, held)
        yield open_vcpu(RemoteExecutor(exec_thread), v.fd, vcpu_id, vm.arch), rt


def _vmm_running(vm: discover.Vm) -> bool:
    try:
        st = procfs.stat(vm.pid)
    except ProcessLookupError:
        return False
    return st.starttime == vm.starttime and not st.exiting


def _ioc_size(request: int) -> int:
    """The argument size encoded in an ioctl number (nonzero: it passes a buffer)."""
    return (request >> 16) & 0x3FFF


def _check_requests(rt: RemoteThread, fd: int, requests: Sequence[int]) -> None:
    for req in requests:
        rt.check_seccomp(rt.arch.nr["ioctl"], (fd, req, 0))


def _helper_thread(
    vm: discover.Vm,
    v: discover.Vcpu,
    requests: Sequence[int],
    stack: contextlib.ExitStack,
    blocked: SeccompBlocked,
    held: _Held,
) -> RemoteThread:
    """Another VMM thread whose filter allows the calls (the vCPU thread stays held)."""
    vcpu_tids = {x.thread.tid for x in vm.vcpus if x.thread is not None}
    others = sorted(
        (t for t in vm.threads if t.tid != v.thread.tid),  # type: ignore[union-attr]
        key=lambda t: (t.tid in vcpu_tids, t.seccomp_filters, t.tid),
    )
    for t in others:
        rt = RemoteThread(
            vm.pid,
            t.tid,
            expected_starttime=vm.starttime,
            on_stall=held.hold_others,
            prefetch_maps=any(_ioc_size(r) for r in requests),
        )
        try:
            rt.attach()
        except (TargetGone, Conflict):
            continue
        try:
            _check_requests(rt, v.fd, requests)
        except SeccompBlocked:
            rt.close()
            continue
        held.exclude.add(t.tid)
        stack.callback(rt.close)
        return rt
    if not procfs.has_capability(procfs.CAP_SYS_ADMIN):
        # Without CAP_SYS_ADMIN no filter can be read (PTRACE_SECCOMP_GET_FILTER),
        # so what stopped serrinj is its own privilege, not a known verdict.
        raise PermissionDenied(
            f"every thread of {vm.label} runs under a seccomp filter, and serrinj may not"
            " read the filters to check that its ioctls are allowed: CAP_SYS_ADMIN is missing",
            hint="nothing was sent; run serrinj as root (reading seccomp filters needs"
            " CAP_SYS_ADMIN)",
        )
    raise SeccompBlocked(
        f"{blocked.message}, and no other thread of {vm.label} may issue it either",
        hint="nothing was sent; the VMM's sandbox forbids these ioctls everywhere",
    )


# ---------------------------------------------------------------------- --fd
class FdResolution(NamedTuple):
    """What an ``--fd`` turned out to be."""

    vcpu_id: int
    local: bool  # this process may issue the ioctls itself (it created the VM)
    owner_pid: Optional[int] = None
    owner_fd: Optional[int] = None
    explanation: str = ""


def resolve_fd(fd: int, pid: Optional[int] = None) -> FdResolution:
    """Resolve ``--fd`` (ours, inherited) or ``--pid P --fd N`` (the target's)."""
    mine = fd
    taken = -1
    try:
        if pid is not None:
            pidfd = _native.pidfd_open(pid)
            try:
                taken = _native.pidfd_getfd(pidfd, fd)
            except OSError as err:
                if err.errno == errno.EPERM:
                    raise _getfd_denied(pid, fd) from err
                raise
            finally:
                os.close(pidfd)
            mine = taken
        try:
            link = os.readlink(f"/proc/self/fd/{mine}")
        except OSError:
            raise TargetNotFound(f"fd {fd} is not open in serrinj's process") from None
        vcpu_id = discover.vcpu_id_of_link(link)
        if vcpu_id is None:
            raise InvalidInput(f"fd {fd} is {link}, not a KVM vCPU fd")
        try:
            LocalExecutor().ioctl_buf(mine, api.KVM_GET_VCPU_EVENTS, bytes(64))
            if pid is None:
                return FdResolution(vcpu_id, local=True, explanation="this process owns the VM")
        except OSError as err:
            if err.errno != errno.EIO:
                raise KvmRejected(f"KVM_GET_VCPU_EVENTS on fd {fd} failed", err.errno or 0) from err
        if pid is not None:
            return FdResolution(
                vcpu_id,
                local=False,
                owner_pid=pid,
                owner_fd=fd,
                explanation=f"vCPU {vcpu_id} is fd {fd} of process {pid}; issued inside it",
            )
        owners = sorted(discover.find_file_holders(os.getpid(), mine), key=_owner_rank)
        if not owners:
            raise TargetNotFound(
                f"fd {fd} is vCPU {vcpu_id} of a VM this process did not create (KVM says EIO),"
                " and no running process shares that file",
                hint="KVM accepts vCPU ioctls only from the VM's creator; is the VMM gone?",
            )
        owner = owners[0]
        return FdResolution(
            vcpu_id,
            local=False,
            owner_pid=owner.pid,
            owner_fd=owner.fd,
            explanation=(
                f"fd {fd} was inherited: KVM refuses it here (EIO); the same file is fd"
                f" {owner.fd} of process {owner.pid} ({procfs.comm(owner.pid)}), which runs it"
            ),
        )
    except OSError as err:
        if err.errno == errno.ESRCH:
            raise TargetGone(f"process {pid} exited") from err
        if err.errno == errno.EBADF:
            raise TargetNotFound(f"fd {fd} is not open in process {pid}") from err
        raise
    finally:
        if taken >= 0:
            os.close(taken)


def vcpu_fd_owner(fd: int, pid: Optional[int], option: str = "fd") -> Tuple[int, int]:
    """(VMM pid, vCPU id) of the vCPU fd ``fd`` (see :func:`resolve_fd`), called ``option``
    in errors; a VM this process created is refused: there is no VMM to attach to."""
    if fd < 0:
        raise InvalidInput(f"{option} {fd}: file descriptors are not negative")
    res = resolve_fd(fd, pid)
    if res.local or res.owner_pid is None:
        raise Unsupported(
            f"fd {fd} belongs to a VM this process created; there is nothing to attach to"
        )
    return res.owner_pid, res.vcpu_id


def _getfd_denied(pid: int, fd: int) -> Union[TargetGone, PermissionDenied]:
    """Why ``pidfd_getfd`` of ``pid``'s ``fd`` said EPERM.

    The kernel checks ptrace access to the process (PTRACE_MODE_ATTACH_REALCREDS),
    exactly as for PTRACE_SEIZE, so the same causes apply: ids, Yama, a missing
    CAP_SYS_PTRACE, a non-dumpable VMM.
    """
    try:
        sec = procfs.task_security(pid)
    except ProcessLookupError:
        return TargetGone(f"process {pid} exited")
    return explain_ptrace_denial(pid, sec, f"taking fd {fd} of process {pid} (pidfd_getfd)")


def _owner_rank(owner: discover.FdOwner) -> Tuple[bool, int]:
    """Likeliest creator first: a process whose thread runs that vCPU, then the oldest."""
    try:
        vm = discover.inspect(owner.pid)
        starttime = procfs.stat(owner.pid).starttime
    except ProcessLookupError:
        return (True, 1 << 62)
    runs_it = vm is not None and any(owner.fd in v.fds and v.thread is not None for v in vm.vcpus)
    return (not runs_it, starttime)


def thread_state(before: Optional[discover.Thread], rt: RemoteThread, fds: Sequence[int]) -> str:
    """Where the vCPU's thread was when it was stopped (``fds``: the vCPU's fds)."""
    stop = rt.first_stop
    if stop is not None and stop.group_stop:
        return "stopped"
    assert rt.saved is not None
    left_run = rt.arch.kvm_run_fd_at_stop(rt.saved)
    in_run = left_run in fds or (left_run is None and _left_kvm_run_generic(rt))
    if before is not None and before.state == "in-kvm-run":
        return "halted"
    if in_run:
        return "in-guest"
    return "userspace"


def _left_kvm_run_generic(rt: RemoteThread) -> bool:
    # aarch64 keeps the request in x1 and the number in x8 after the syscall returns.
    assert rt.saved is not None
    if rt.arch.name != Arch.AARCH64:
        return False
    return bool(rt.saved["x8"] == rt.arch.nr["ioctl"] and rt.saved["x1"] == api.KVM_RUN)
