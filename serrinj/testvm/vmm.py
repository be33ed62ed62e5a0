"""The built-in test VM's arch-independent core: a minimal VMM on serrinj's own library.

``python -m serrinj.testvm`` creates a VM with guest RAM and N vCPUs, each run
by its own thread (named like a real VMM's), and runs a tiny guest that
reports what it observes. Everything goes through ``serrinj._native`` and
:class:`serrinj.vcpu.executor.LocalExecutor`; this module has no ctypes and no
``fcntl.ioctl``.

VMM profiles
------------
``--profile qemu|firecracker|cloud-hypervisor|crosvm|kvmtool`` lays the process out
as that VMM does (:mod:`serrinj.testvm.profiles`): the main, vCPU and other threads'
names, which thread creates the vCPU fds, Firecracker's second (dup'ed) fd per vCPU,
QEMU's stats fd per vCPU, x86 APIC vcpu ids (``--topology``; or any ids with
``--vcpu-ids``), and each thread's seccomp filters. Without it the VMM is as
before: threads named by ``--thread-names``, ids 0..n-1, no filter unless
``--seccomp``.

Threads and kicks
-----------------
KVM_RUN holds the vCPU mutex, so an ioctl on a vCPU whose thread sits in
KVM_RUN blocks (BRIEF section 1). The VMM therefore never issues a vCPU ioctl
from another thread: a command becomes a *request* queued on the vCPU, and the
vCPU thread is *kicked* out of KVM_RUN to run it. A kick sets
``kvm_run.immediate_exit`` and then sends SIGUSR1 (a no-op handler) to that
thread. The flag closes the race with a thread that is just about to enter
KVM_RUN; the signal interrupts one that is already inside. The vCPU thread
clears the flag *before* it drains its queue, so no request is ever left
behind. KVM_RUN returning EINTR (a kick, or a ptrace interrupt from a
debugger or from serrinj's remote engine) is normal: the thread services its
queue and re-enters. A vCPU whose thread has ended (e.g. after a triple fault)
is served directly by the main thread, since no KVM_RUN can be holding it.

Process-directed signals (SIGTERM, SIGINT, SIGHUP) are blocked in the vCPU
threads, so they reach the main thread, which waits in ``select`` on stdin and
on the signal wake-up pipe. SIGTERM, SIGINT, SIGHUP, ``{"cmd":"quit"}`` and
end of input (unless ``--ignore-eof``) stop the VMM: vCPU threads are kicked
and joined, every fd and mapping is closed, and the exit status is 0.

Waiting states (what ``/proc/PID/task/TID/syscall`` shows):

- the guest halts: the thread blocks inside ``ioctl(fd, KVM_RUN)`` (the in-kernel
  irqchip handles HLT), exactly like QEMU's vCPU threads;
- the guest spins: ``running``;
- ``futex`` mode: the guest asks to yield by port I/O; the thread then blocks in
  a futex (``Condition.wait`` with a timeout of ``--yield-ms``) before
  re-entering KVM_RUN. ``--block-in ppoll|nanosleep|pipe`` makes it block in
  that syscall instead (the raw ``ppoll`` or ``nanosleep``, or ``read`` on a
  pipe that an I/O thread writes to every ``--yield-ms``), so that every kind
  of restartable syscall can be interrupted by an injector. A return value
  that is one of the kernel's internal restart codes (512..516, which a
  tracer that skips the kernel's restart would leak) is reported as an
  ``error`` event with ``"restart_code"``;
- ``--start-paused`` or ``{"cmd":"pause"}``: the thread waits in a futex, out of
  KVM_RUN, until ``{"cmd":"run"}``.

stdin commands (one JSON object per line)
-----------------------------------------
Every command may carry an ``"id"``, echoed in the reply. A command that
produces no event of its own is answered by ``{"event":"ack","cmd":...}``; a
failure by ``{"event":"error","cmd":...,"message":...,"errno":...}``.

- ``{"cmd":"run"}``: start or resume every vCPU.
- ``{"cmd":"pause"}``: park every vCPU thread out of KVM_RUN (ack once all are).
- ``{"cmd":"quit"}``: stop the VMM (exit status 0).
- ``--dup-vcpu-fds``: a second (CLOEXEC) fd on every vCPU, never used, as Firecracker holds.
- ``{"cmd":"spawn","argv":[...]}``: run a child that inherits the VM and vCPU fds
  (``spawned`` then ``spawn-exit`` with its returncode, stdout and stderr).
- ``--seccomp trap|kill|errno`` makes the VMM play a sandboxed one: a filter on
  the vCPU threads (``--seccomp-threads all``: on every thread) answers the
  vCPU-event ioctls with that action, as Firecracker's does.
- ``{"cmd":"sigsys"}``: answered by ``{"event":"sigsys-count","count":N}``, the
  seccomp traps taken so far (with ``--profile``; each trap also emits a
  ``sigsys`` event, then the VMM dies as the profile's VMM would unless
  ``--on-sigsys count``).
- arch commands, run on the vCPU's own thread (x86_64: ``nmi``, ``mce``,
  ``events``, ``heartbeat``; see the arch module). They name the vCPU with
  ``"vcpu": <vcpu_id>``.

Events (JSON lines on stdout, flushed per line; integers are JSON integers)
--------------------------------------------------------------------------
- ``{"event":"ready","pid":P,"arch":A,"mode":M,"paused":bool,"vm_fd":F,
  "vcpus":[{"vcpu_id":0,"tid":T,"fd":F,"thread_name":N,"fds":[F,...],
  "stats_fd":S|null}, ...],"profile":P,"threads":[{"name","tid","filters"}], ...}``:
  once, when every vCPU thread exists (arch-specific fields added by ``ready_info``).
- ``{"event":"ack","cmd":C[,"vcpu":V][,"id":I]}`` and ``{"event":"error",...}``.
- ``{"event":"exit","vcpu":V,"reason":R,...}``: the vCPU stopped (``SHUTDOWN`` for a
  triple fault, ``INTERNAL_ERROR``, ``FAIL_ENTRY``, ``UNEXPECTED_IO``, ...).
- ``{"event":"shutdown","reason":R}``: the last line before a clean exit.
- guest events decoded by the arch (x86_64: ``guest-ready``, ``nmi``, ``mce``,
  ``mce-poll``, ``heartbeat``, ``guest-check-failed``, ``exception``).

The ``GuestArch`` interface
---------------------------
Everything arch-specific lives in one class per architecture (``x86_64.py``,
``arm64.py``) that implements :class:`GuestArch`; the core never looks inside
the guest. The hooks, and the thread each runs on:

``name``                     ``"x86_64"`` or ``"arm64"`` (also the ``--arch`` value).
``commands``                 the command names ``apply_command`` accepts.
``setup_vm(vm)``             main thread, once: irqchip, memory (``vm.add_memory``), the
                             guest image, VM-wide tables.
``setup_vcpu(vm, vcpu)``     the thread that created the vCPU (its own thread, or the
                             main or ``vmm`` thread of a ``--profile``), right after
                             KVM_CREATE_VCPU and the ``kvm_run`` mapping: registers,
                             CPU features, mp_state, the guest's per-vCPU data.
``setup_done(vm)``           main thread, once every vCPU is set up and before any
                             KVM_RUN (e.g. arm64 vGIC init).
``handle_exit(vm, vcpu)``    the vCPU thread, after every KVM_RUN that returned 0: read
                             ``vcpu.run_page``, emit events with ``vm.emit``, return an
                             :class:`ExitAction`.
``apply_command(vm, vcpu, cmd)``  the vCPU thread (or the main thread if that vCPU has
                             stopped), never while KVM_RUN holds the vCPU: issue the
                             ioctl; return an event dict to emit instead of the ack,
                             or None. Raise ``ValueError`` for a bad command and
                             ``OSError`` for a failed ioctl (both become ``error`` events).
``ready_info(vm)``           main thread: extra fields for the ``ready`` event.

Conventions for a guest, so that tests read every arch alike: each event
carries ``"vcpu": <vcpu_id>``; the guest announces itself with
``guest-ready``; it answers the ``heartbeat`` command with a ``heartbeat``
event carrying ``seq`` (the request count it answers) and ``iterations``;
it reports state changed under it as ``guest-check-failed``; an exit the VMM
cannot continue from is an ``exit`` event with a ``reason`` and the vCPU's
thread ends (``ExitAction.STOP``). ``--mode`` is the guest's to honour: halt
(wait for interrupts, so the thread blocks in KVM_RUN), spin, or futex (spin
and ask for ``ExitAction.YIELD`` now and then).

:class:`Vm` gives the arch ``vm.executor`` (a LocalExecutor), ``vm.kvm_fd``,
``vm.fd``, ``vm.options``, ``vm.vcpus`` and ``vm.emit``; :class:`Vcpu` gives
``vcpu.vcpu_id``, ``vcpu.fd``, ``vcpu.run_page`` (a ``_native.Memory``) and
``vcpu.yields``.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import errno
import fcntl
import importlib
import json
import os
import platform
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import (
    IO,
    Any,
    Callable,
    Collection,
    Deque,
    Dict,
    FrozenSet,
    Iterable,
    List,
    Mapping,
    Optional,
    Protocol,
    Sequence,
    Tuple,
)

from serrinj import _native
from serrinj.kvm import api
from serrinj.kvm import x86_64 as kx86
from serrinj.remote import arch as remote_arch
from serrinj.remote import seccomp
from serrinj.testvm import profiles
from serrinj.vcpu.executor import LocalExecutor

__all__ = [
    "ARCHES",
    "MODES",
    "THREAD_NAMES",
    "ExitAction",
    "GuestArch",
    "Options",
    "Vcpu",
    "Vm",
    "main",
]

#: ``--thread-names`` styles: how each VMM names its vCPU threads (BRIEF section 6)
THREAD_NAMES: Mapping[str, Optional[Callable[[int], str]]] = MappingProxyType(
    {
        "qemu": lambda n: f"CPU {n}/KVM",
        "kvmtool": lambda n: f"kvm-vcpu-{n}",
        "firecracker": lambda n: f"fc_vcpu {n}",
        "cloud-hypervisor": lambda n: f"vcpu{n}",
        "crosvm": lambda n: f"crosvm_vcpu{n}",
        "none": None,
    }
)
MODES: FrozenSet[str] = frozenset({"halt", "spin", "futex"})
#: ``--block-in``: the syscall a yielding vCPU thread blocks in (futex mode)
BLOCK_IN: FrozenSet[str] = frozenset({"futex", "ppoll", "nanosleep", "pipe"})
#: ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK
#: (include/linux/errno.h): never valid in user space
RESTART_CODES: FrozenSet[int] = frozenset({512, 513, 514, 516})
_POLLIN = 0x1
#: ``--arch`` value -> "module:class" of its GuestArch (imported on demand)
ARCHES: Mapping[str, str] = MappingProxyType(
    {
        "x86_64": "serrinj.testvm.x86_64:X86Guest",
        "arm64": "serrinj.testvm.arm64:Arm64Guest",
    }
)
KICK_SIGNAL = signal.SIGUSR1
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class ExitAction(enum.Enum):
    """What the vCPU thread does after ``handle_exit``."""

    CONTINUE = "continue"  # re-enter KVM_RUN
    YIELD = "yield"  # block in a futex for --yield-ms, then re-enter
    STOP = "stop"  # the vCPU is finished (an ``exit`` event was emitted)


@dataclass(frozen=True)
class Options:
    """The VMM's configuration (the command line)."""

    arch: str
    vcpus: int = 1
    mode: str = "halt"
    thread_names: str = "qemu"
    start_paused: bool = False
    tick_ms: int = 10
    yield_ms: int = 3
    mce_banks: int = 10
    ignore_eof: bool = False
    seccomp: str = "none"
    seccomp_threads: str = "vcpu"
    mask_serror: bool = False  # arm64: PSTATE.A stays set until {"cmd":"unmask"}
    mmio_probe: bool = False  # arm64: the guest keeps loading from an unmapped address
    block_in: str = "futex"  # the syscall a yielding vCPU thread blocks in
    profile: str = "none"  # a VMM layout from serrinj.testvm.profiles ("none": the default)
    vcpu_ids: Tuple[int, ...] = ()  # KVM vcpu ids (default 0..vcpus-1)
    on_sigsys: str = "vmm"  # a SIGSYS: "vmm" acts as the profile's VMM, "count" only counts
    #: vcpu_id -> the guest mode of that vCPU where it differs from ``mode``
    vcpu_modes: Mapping[int, str] = field(default_factory=lambda: MappingProxyType({}))

    dup_vcpu_fds: bool = False  # hold a second fd on every vCPU (as Firecracker does)

    def mode_of(self, vcpu_id: int) -> str:
        """The guest mode vCPU ``vcpu_id`` runs (``--vcpu-mode``, else ``--mode``)."""
        return self.vcpu_modes.get(vcpu_id, self.mode)


class GuestArch(Protocol):
    """The arch-specific half of the test VM (see the module docstring)."""

    name: str
    commands: FrozenSet[str]

    def setup_vm(self, vm: Vm) -> None:
        """Create the irqchip and memory and load the guest (main thread)."""

    def setup_vcpu(self, vm: Vm, vcpu: Vcpu) -> None:
        """Initialise one vCPU (on that vCPU's thread)."""

    def setup_done(self, vm: Vm) -> None:
        """Finish VM-wide setup once every vCPU exists (main thread)."""

    def handle_exit(self, vm: Vm, vcpu: Vcpu) -> ExitAction:
        """Decode the exit in ``vcpu.run_page``; emit events; say what to do next."""
        ...

    def apply_command(self, vm: Vm, vcpu: Vcpu, cmd: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
        """Run a vCPU command (never while KVM_RUN holds the vCPU)."""
        ...

    def ready_info(self, vm: Vm) -> Dict[str, Any]:
        """Extra fields for the ``ready`` event."""
        ...


def load_arch(name: str) -> GuestArch:
    """Instantiate the GuestArch registered for ``name``."""
    try:
        target = ARCHES[name]
    except KeyError:
        raise ValueError(f"unknown arch {name!r}; known: {', '.join(sorted(ARCHES))}") from None
    module_name, _, class_name = target.partition(":")
    module = importlib.import_module(module_name)
    arch: GuestArch = getattr(module, class_name)()
    return arch


# --- helpers shared by the arch halves


class GuestBase:
    """What both arch halves share: the guest RAM once :meth:`GuestArch.setup_vm` has mapped it."""

    def __init__(self, name: str, commands: Iterable[str]) -> None:
        self.name = name
        self.commands: FrozenSet[str] = frozenset(commands)
        self.ram: Optional[_native.Memory] = None

    def setup_done(self, vm: Vm) -> None:
        return None

    def memory(self) -> _native.Memory:
        """The guest RAM (only after set-up)."""
        assert self.ram is not None
        return self.ram


def mem_u64(mem: _native.Memory, addr: int) -> int:
    """The little-endian u64 at ``addr`` of ``mem``."""
    return int(struct.unpack_from("<Q", mem.view, addr)[0])


def int_field(cmd: Mapping[str, Any], name: str, default: Optional[int] = None) -> int:
    """A command's unsigned 64-bit field ``name`` (``default`` when absent; none: an error)."""
    value = cmd.get(name, default)
    if value is None:
        raise ValueError(f"missing {name!r}")
    if type(value) is not int or not 0 <= value < 1 << 64:
        raise ValueError(f"{name!r} must be an unsigned 64-bit integer")
    return value


def exit_head(vcpu: Vcpu) -> Tuple[_native.Memory, bytes, int]:
    """``vcpu``'s kvm_run page, a copy of its head (through the exit union) and the exit reason."""
    page = vcpu.run_page
    assert page is not None
    head = bytes(page.view[: api.KVM_RUN_OFF_UNION + 256])
    return page, head, api.exit_reason_of(head)


def stop_on_exit(
    vm: Vm, vcpu: Vcpu, head: bytes, reason: int, where: Callable[[Vm, Vcpu], Dict[str, int]]
) -> ExitAction:
    """Report an exit the guest did not ask for (with what the exit union says of it) and stop."""
    extra: Dict[str, Any] = {}
    if reason == api.KVM_EXIT_SYSTEM_EVENT:
        kind, ndata = struct.unpack_from("<II", head, api.KVM_RUN_OFF_UNION)
        extra = {"type": kind, "ndata": ndata}
    elif reason == api.KVM_EXIT_INTERNAL_ERROR:
        suberror, ndata = struct.unpack_from("<II", head, api.KVM_RUN_OFF_UNION)
        data = struct.unpack_from(f"<{min(ndata, 16)}Q", head, api.KVM_RUN_OFF_UNION + 8)
        extra = {"suberror": suberror, "ndata": ndata, "data": list(data)}
    elif reason == api.KVM_EXIT_FAIL_ENTRY:
        (failure,) = struct.unpack_from("<Q", head, api.KVM_RUN_OFF_UNION)
        extra = {"hardware_entry_failure_reason": failure}
    name = api.EXIT_REASON_NAMES.get(reason, f"EXIT_{reason}")
    emit_exit(vm, vcpu, name, reason, where, **extra)
    return ExitAction.STOP


def emit_exit(
    vm: Vm,
    vcpu: Vcpu,
    name: str,
    reason: int,
    where: Callable[[Vm, Vcpu], Dict[str, int]],
    **extra: Any,
) -> None:
    """Emit an ``exit`` event; ``where`` reads the instruction pointer (left out on error)."""
    event: Dict[str, Any] = {"event": "exit", "vcpu": vcpu.vcpu_id, "reason": name}
    event["exit_reason"] = reason
    with contextlib.suppress(OSError):
        event.update(where(vm, vcpu))
    event.update(extra)
    vm.emit(event)


def guest_report(
    vm: Vm,
    vcpu: Vcpu,
    event: Optional[Dict[str, Any]],
    where: Callable[[Vm, Vcpu], Dict[str, int]],
    **exit_info: Any,
) -> ExitAction:
    """Emit a decoded guest report (``event`` names it under "event") and let the vCPU run on; a
    report the arch did not know (``None``) is an ``UNKNOWN_REPORT`` exit (``exit_info`` holds its
    exit reason and code) that stops the vCPU."""
    if event is None:
        emit_exit(vm, vcpu, "UNKNOWN_REPORT", where=where, **exit_info)
        return ExitAction.STOP
    name = event.pop("event")
    vm.emit({"event": name, "vcpu": vcpu.vcpu_id, **event})
    return ExitAction.CONTINUE


def reg_changes(cmd: Mapping[str, Any], known: Collection[str]) -> Dict[str, int]:
    """The registers and values of a ``set-regs`` command, each checked before any is written."""
    changes = cmd.get("regs")
    if not isinstance(changes, dict) or not changes:
        raise ValueError("'regs' must be an object of register names and values")
    for reg in changes:
        if reg not in known:
            raise ValueError(f"unknown register {reg!r}")
    return {reg: int_field(changes, reg) for reg in changes}


def events_reply(vm: Vm, vcpu: Vcpu, size: int, decode: Callable[[bytes], Any]) -> Dict[str, Any]:
    """The ``events`` command's answer: KVM_GET_VCPU_EVENTS (``size`` bytes, ``decode``d) and the MP
    state."""
    ex = vm.executor
    raw = ex.ioctl_buf(vcpu.fd, api.KVM_GET_VCPU_EVENTS, bytes(size))
    mp = struct.unpack("<I", ex.ioctl_buf(vcpu.fd, api.KVM_GET_MP_STATE, bytes(4)))[0]
    return {
        "event": "events",
        "vcpu": vcpu.vcpu_id,
        "mp_state": api.MP_STATE_NAMES.get(mp, str(mp)),
        "events": decode(raw).as_dict(),
    }


def host_arch() -> str:
    """The ``--arch`` name of this machine."""
    return {"x86_64": "x86_64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


class Emitter:
    """Writes events as JSON lines, one at a time, flushing each."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self.broken = False

    def emit(self, event: Mapping[str, Any]) -> None:
        line = json.dumps(event, separators=(",", ":"))
        with self._lock:
            if self.broken:
                return
            try:
                self._stream.write(line + "\n")
                self._stream.flush()
            except (BrokenPipeError, ValueError):
                self.broken = True


Request = Callable[[], None]


class Vcpu:
    """One vCPU: its fd, its ``kvm_run`` page, its thread and its request queue."""

    def __init__(self, vm: Vm, vcpu_id: int, index: int) -> None:
        self.vm = vm
        self.vcpu_id = vcpu_id
        self.index = index  # the VMM's CPU index (thread names count by it)
        self.fd = -1
        self.extra_fds: List[int] = []  # a dup of the vCPU fd (Firecracker)
        self.stats_fd = -1  # KVM_GET_STATS_FD (QEMU)
        self.run_page: Optional[_native.Memory] = None
        self.tid = 0
        self.thread_name = ""
        self.yields = 0
        self.stopped = False
        self.parked = False
        self._requests: Deque[Request] = deque()
        self._cond = threading.Condition()
        self._setup_done = threading.Event()
        self._setup_error: Optional[BaseException] = None
        # --block-in ppoll|pipe: the yield waits on this pipe (the read end)
        self.pipe_r = self.pipe_w = -1
        if vm.options.block_in in ("ppoll", "pipe"):
            self.pipe_r, self.pipe_w = os.pipe2(os.O_CLOEXEC)
            os.set_blocking(self.pipe_w, False)
        self.thread = threading.Thread(target=self._thread_main, name=f"vcpu{index}", daemon=True)

    # ----------------------------------------------------------------- other threads

    def submit(self, request: Request) -> None:
        """Run ``request`` on this vCPU's thread as soon as it is out of KVM_RUN."""
        with self._cond:
            if not self.stopped:
                self._requests.append(request)
                self._cond.notify_all()
                self.kick()
                return
        # the thread has ended, so nothing holds the vCPU mutex: run it here
        request()

    def kick(self) -> None:
        """Make the thread leave KVM_RUN (or not enter it) and look at its queue."""
        page = self.run_page
        if page is not None:
            page.view[api.KVM_RUN_OFF_IMMEDIATE_EXIT] = 1
        ident = self.thread.ident
        if ident is not None and self.thread.is_alive():
            with contextlib.suppress(ProcessLookupError):
                signal.pthread_kill(ident, KICK_SIGNAL)
        self.poke()

    def wake(self) -> None:
        """Wake the thread from a futex wait (pause, yield) without a signal."""
        with self._cond:
            self._cond.notify_all()
        self.poke()

    def poke(self) -> None:
        """Make a ``--block-in ppoll|pipe`` yield return (one byte on its pipe)."""
        if self.pipe_w >= 0:
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(self.pipe_w, b"\0")

    # ----------------------------------------------------------------- the vCPU thread

    def _thread_main(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        vm = self.vm
        try:
            self.tid = threading.get_native_id()
            profile = vm.profile
            if profile is not None:
                _native.prctl_set_name(profile.vcpu_name(self.index))
            else:
                namer = THREAD_NAMES[vm.options.thread_names]
                if namer is not None:
                    _native.prctl_set_name(namer(self.index))
            with open(f"/proc/self/task/{self.tid}/comm") as comm:
                self.thread_name = comm.read().strip()
            if profile is None or profile.creator == "vcpu":
                self.create()
            if vm.options.seccomp != "none" and vm.options.seccomp_threads == "vcpu":
                install_sandbox(vm.options.seccomp)
            if profile is not None:
                vm.install_filters(profile.vcpu_filters)
        except BaseException as err:  # reported by the main thread
            self._setup_error = err
            self._setup_done.set()
            return
        self._setup_done.set()
        vm.go.wait()
        try:
            self._loop()
        except Exception as err:  # never die silently: the test harness waits on events
            vm.emit(
                {"event": "exit", "vcpu": self.vcpu_id, "reason": "VMM_ERROR", "message": str(err)}
            )
        finally:
            with self._cond:
                self.stopped = True
                pending = list(self._requests)
                self._requests.clear()
            for request in pending:
                request()

    def create(self) -> None:
        """Create the vCPU fd and set the vCPU up, on the calling thread (the profile's
        creator: the vCPU thread itself, the main thread or the VMM thread)."""
        vm = self.vm
        self.fd = vm.executor.ioctl_int(vm.fd, api.KVM_CREATE_VCPU, self.vcpu_id)
        self.run_page = _native.Memory(vm.run_size, self.fd)
        vm.arch.setup_vcpu(vm, self)
        profile = vm.profile
        if profile is not None and profile.stats_fd:
            try:
                self.stats_fd = vm.executor.ioctl_int(self.fd, profiles.KVM_GET_STATS_FD)
            except OSError:
                self.stats_fd = -1  # a kernel before 5.14: QEMU goes on without it
        if vm.options.dup_vcpu_fds:
            # a second fd the vCPU thread never uses (as Firecracker's VMM side holds)
            self.extra_fds.append(fcntl.fcntl(self.fd, fcntl.F_DUPFD_CLOEXEC, 0))

    def dup_fd(self) -> None:
        """Keep a second fd of the vCPU, as Firecracker does for its VMM side."""
        dup = os.dup(self.fd)
        os.set_inheritable(dup, True)  # a plain dup(2): not close-on-exec
        self.extra_fds.append(dup)

    def _loop(self) -> None:
        vm = self.vm
        page = self.run_page
        assert page is not None
        while True:
            page.view[api.KVM_RUN_OFF_IMMEDIATE_EXIT] = 0
            self._service()
            if vm.stopping:
                return
            if vm.paused:
                self._park()
                continue
            try:
                vm.executor.ioctl_int(self.fd, api.KVM_RUN, 0)
            except OSError as err:
                if err.errno in (errno.EINTR, errno.EAGAIN):
                    continue
                vm.emit(
                    {
                        "event": "exit",
                        "vcpu": self.vcpu_id,
                        "reason": "KVM_RUN_FAILED",
                        "errno": err.errno,
                        "message": os.strerror(err.errno or 0),
                    }
                )
                return
            action = vm.arch.handle_exit(vm, self)
            if action is ExitAction.STOP:
                return
            if action is ExitAction.YIELD:
                self.yields += 1
                self._yield(vm.options.yield_ms / 1000.0)

    def _service(self) -> None:
        while True:
            with self._cond:
                if not self._requests:
                    return
                request = self._requests.popleft()
            request()

    def _park(self) -> None:
        with self._cond:
            self.parked = True
            self.vm.note_parked()
            while self.vm.paused and not self.vm.stopping and not self._requests:
                self._cond.wait()
            self.parked = False

    def _yield(self, seconds: float) -> None:
        kind = self.vm.options.block_in
        if kind == "futex":
            # A futex wait with a timeout, as a VMM's I/O thread hand-off would do;
            # cut short only by a request or shutdown.
            with self._cond:
                self._cond.wait_for(lambda: bool(self._requests) or self.vm.stopping, seconds)
            return
        with self._cond:
            if self._requests or self.vm.stopping:
                return
        try:
            if kind == "nanosleep":
                _native.nanosleep(seconds)
            elif kind == "ppoll":
                if _native.ppoll(self.pipe_r, _POLLIN, seconds):
                    os.read(self.pipe_r, 4096)
            else:  # pipe: the VM's I/O thread writes a byte every --yield-ms
                os.read(self.pipe_r, 4096)
        except OSError as err:
            if err.errno in RESTART_CODES:
                self.vm.emit(
                    {
                        "event": "error",
                        "cmd": None,
                        "vcpu": self.vcpu_id,
                        "message": f"{kind} returned the kernel-internal restart code -{err.errno}",
                        "restart_code": -err.errno,
                    }
                )
            elif err.errno != errno.EINTR:
                raise

    def close(self) -> None:
        if self.run_page is not None:
            self.run_page.close()
            self.run_page = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for fd in (*self.extra_fds, self.stats_fd):
            if fd >= 0:
                os.close(fd)
        self.extra_fds, self.stats_fd = [], -1
        for fd in (self.pipe_r, self.pipe_w):
            if fd >= 0:
                os.close(fd)
        self.pipe_r = self.pipe_w = -1


class Vm:
    """A VM: /dev/kvm, the VM fd, guest memory, the vCPUs, and the command loop."""

    def __init__(self, arch: GuestArch, options: Options, out: IO[str]) -> None:
        self.arch = arch
        self.options = options
        self.executor = LocalExecutor()
        self.emitter = Emitter(out)
        self.kvm_fd = -1
        self.fd = -1
        self.run_size = 0
        self.memory: List[_native.Memory] = []
        self.vcpus: List[Vcpu] = []
        self.paused = options.start_paused
        self.stopping = False
        self.go = threading.Event()
        self._parked_cond = threading.Condition()
        self.profile: Optional[profiles.Profile] = (
            None if options.profile == "none" else profiles.PROFILES[options.profile]
        )
        #: the profile's other threads (name, tid, filters); they idle until shutdown
        self.threads: List[Dict[str, Any]] = []
        self._idle = threading.Event()
        self.sigsys_count = 0

    def install_filters(self, names: Sequence[str]) -> None:
        """Install the profile's filters ``names`` on the calling thread, in order."""
        profile = self.profile
        if profile is None or not names:
            return
        arch = remote_arch.host_arch()
        for name in names:
            _native.seccomp_install_filter(
                profile.filter_program(name, arch.audit_arch, arch.nr["ioctl"])
            )

    def _start_thread(self, spec: profiles.ThreadSpec, body: Optional[Callable[[], None]]) -> None:
        """Start one of the profile's named threads; ``body`` runs before it idles."""
        started = threading.Event()
        failure: List[BaseException] = []

        def run() -> None:
            signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
            try:
                _native.prctl_set_name(spec.name)
                if body is not None:
                    body()
                self.install_filters(spec.filters)
                tid = threading.get_native_id()
                self.threads.append({"name": spec.name, "tid": tid, "filters": list(spec.filters)})
            except BaseException as err:  # reported by the main thread
                failure.append(err)
                started.set()
                return
            started.set()
            self._idle.wait()

        threading.Thread(target=run, name=spec.name, daemon=True).start()
        started.wait()
        if failure:
            raise failure[0]

    def emit(self, event: Mapping[str, Any]) -> None:
        """Write one event line (thread-safe)."""
        self.emitter.emit(event)

    def add_memory(self, slot: int, guest_phys_addr: int, size: int) -> _native.Memory:
        """Anonymous memory mapped into the guest at ``guest_phys_addr``."""
        mem = _native.Memory(size)
        self.memory.append(mem)
        region = api.UserspaceMemoryRegion(slot, guest_phys_addr, size, mem.address)
        self.executor.ioctl_buf(self.fd, api.KVM_SET_USER_MEMORY_REGION, region.pack())
        return mem

    def vcpu(self, vcpu_id: int) -> Vcpu:
        for vcpu in self.vcpus:
            if vcpu.vcpu_id == vcpu_id:
                return vcpu
        raise ValueError(f"no vCPU {vcpu_id}")

    # ----------------------------------------------------------------- lifecycle

    def create(self) -> None:
        """Open /dev/kvm, create the VM and its vCPUs (each on its own thread)."""
        self.kvm_fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        version = self.executor.ioctl_int(self.kvm_fd, api.KVM_GET_API_VERSION)
        if version != api.KVM_API_VERSION:
            raise RuntimeError(f"KVM API version {version}, expected {api.KVM_API_VERSION}")
        self.fd = self.executor.ioctl_int(self.kvm_fd, api.KVM_CREATE_VM, 0)
        self.run_size = self.executor.ioctl_int(self.kvm_fd, api.KVM_GET_VCPU_MMAP_SIZE)
        self.arch.setup_vm(self)
        if self.options.seccomp != "none" and self.options.seccomp_threads == "all":
            # Threads created from now on (every vCPU thread) inherit the filter.
            install_sandbox(self.options.seccomp)
        profile = self.profile
        if profile is not None and profile.main_name:
            _native.prctl_set_name(profile.main_name)
        for spec in profile.threads if profile is not None else ():
            if spec.name == "vmm" and profile is not None and profile.creator == "vmm":
                self._start_thread(spec, self._create_vcpus)
            else:
                self._start_thread(spec, None)
        if profile is None or profile.creator != "vmm":
            self._create_vcpus()
        self.arch.setup_done(self)

    def _create_vcpus(self) -> None:
        # vCPUs are created in order of their ids, by the profile's creator thread:
        # each vCPU's own thread (the default), or this one before it starts them
        # (Firecracker creates them all, then dup's each fd as it starts its thread)
        ids = self.options.vcpu_ids or tuple(range(self.options.vcpus))
        profile = self.profile
        by_creator = profile is not None and profile.creator != "vcpu"
        for index, vcpu_id in enumerate(ids):
            vcpu = Vcpu(self, vcpu_id, index)
            self.vcpus.append(vcpu)
            if by_creator:
                vcpu.create()
        for vcpu in self.vcpus:
            if profile is not None and profile.dup_vcpu_fds:
                vcpu.dup_fd()
            vcpu.thread.start()
            vcpu._setup_done.wait()
            if vcpu._setup_error is not None:
                raise vcpu._setup_error

    def start(self) -> None:
        """Let the vCPU threads run and announce the VM."""
        self.go.set()
        if self.options.block_in == "pipe":
            threading.Thread(target=self._io_thread, name="io", daemon=True).start()
        vcpus = [
            {
                "vcpu_id": v.vcpu_id,
                "tid": v.tid,
                "fd": v.fd,
                "thread_name": v.thread_name,
                "fds": [v.fd, *v.extra_fds],
                "stats_fd": v.stats_fd if v.stats_fd >= 0 else None,
                **({"dup_fd": v.extra_fds[0]} if v.extra_fds else {}),
            }
            for v in self.vcpus
        ]
        event: Dict[str, Any] = {
            "event": "ready",
            "pid": os.getpid(),
            "arch": self.arch.name,
            "mode": self.options.mode,
            "paused": self.paused,
            "thread_names": self.options.thread_names,
            "profile": self.options.profile,
            "threads": list(self.threads),
            "vm_fd": self.fd,
            "vcpus": vcpus,
        }
        event.update(self.arch.ready_info(self))
        self.emit(event)

    def _io_thread(self) -> None:
        # Completes the --block-in pipe reads of yielding vCPU threads, like a
        # VMM's I/O thread would.
        period = max(self.options.yield_ms, 1) / 1000.0
        while not self.stopping:
            time.sleep(period)
            for vcpu in self.vcpus:
                vcpu.poke()

    def resume(self) -> None:
        self.paused = False
        for vcpu in self.vcpus:
            vcpu.wake()

    def pause(self, timeout: float = 5.0) -> bool:
        """Park every running vCPU thread; True once all are parked or stopped."""
        self.paused = True
        for vcpu in self.vcpus:
            vcpu.kick()
        deadline = time.monotonic() + timeout
        with self._parked_cond:
            while not all(v.parked or v.stopped for v in self.vcpus):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._parked_cond.wait(min(left, 0.05))
        return True

    def note_parked(self) -> None:
        with self._parked_cond:
            self._parked_cond.notify_all()

    def shutdown(self) -> None:
        """Stop every vCPU thread, then close every fd and mapping."""
        self.stopping = True
        self._idle.set()
        self.go.set()
        for vcpu in self.vcpus:
            vcpu.wake()
            vcpu.kick()
        for vcpu in self.vcpus:
            if vcpu.thread.is_alive():
                vcpu.thread.join(timeout=5.0)
        for vcpu in self.vcpus:
            if not vcpu.thread.is_alive():
                vcpu.close()
        for mem in self.memory:
            mem.close()
        self.memory.clear()
        for fd in (self.fd, self.kvm_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.kvm_fd = -1

    # ----------------------------------------------------------------- commands

    def handle_command(self, cmd: Mapping[str, Any]) -> bool:
        """Act on one command; False when the VMM should stop."""
        name = cmd.get("cmd")
        reply: Dict[str, Any] = {"cmd": name}
        if "id" in cmd:
            reply["id"] = cmd["id"]
        if name == "quit":
            return False
        if name == "run":
            self.resume()
            self.emit({"event": "ack", **reply})
            return True
        if name == "spawn":
            self._spawn(cmd, reply)
            return True
        if name == "sigsys":
            self.emit({"event": "sigsys-count", **reply, "count": self.sigsys_count})
            return True
        if name == "pause":
            if self.pause():
                self.emit({"event": "ack", **reply})
            else:
                self.emit({"event": "error", **reply, "message": "vCPUs did not park in time"})
            return True
        if name not in self.arch.commands:
            self.emit({"event": "error", **reply, "message": f"unknown command {name!r}"})
            return True
        try:
            vcpu_id = cmd["vcpu"]
            if type(vcpu_id) is not int:
                raise ValueError("'vcpu' must be an integer vCPU id")
            vcpu = self.vcpu(vcpu_id)
        except (KeyError, ValueError) as err:
            msg = "missing 'vcpu'" if isinstance(err, KeyError) else str(err)
            self.emit({"event": "error", **reply, "message": msg})
            return True
        reply["vcpu"] = vcpu_id
        vcpu.submit(lambda: self._run_command(vcpu, cmd, reply))
        return True

    def _spawn(self, cmd: Mapping[str, Any], reply: Dict[str, Any]) -> None:
        """Run a child that inherits the VM and vCPU fds (like a forked helper would)."""
        argv = cmd.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            self.emit({"event": "error", **reply, "message": "'argv' must be a list of strings"})
            return
        fds = [self.fd] + [v.fd for v in self.vcpus]
        try:
            child = subprocess.Popen(
                argv, pass_fds=fds, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        except OSError as err:
            self.emit({"event": "error", **reply, "message": str(err), "errno": err.errno})
            return
        self.emit({"event": "spawned", **reply, "pid": child.pid, "fds": fds})

        def reap() -> None:
            out, err = child.communicate()
            self.emit(
                {
                    "event": "spawn-exit",
                    **reply,
                    "pid": child.pid,
                    "returncode": child.returncode,
                    "stdout": out[-65536:],
                    "stderr": err[-65536:],
                }
            )

        threading.Thread(target=reap, daemon=True).start()

    def _run_command(self, vcpu: Vcpu, cmd: Mapping[str, Any], reply: Dict[str, Any]) -> None:
        try:
            event = self.arch.apply_command(self, vcpu, cmd)
        except OSError as err:
            self.emit(
                {
                    "event": "error",
                    **reply,
                    "errno": err.errno,
                    "message": os.strerror(err.errno) if err.errno else str(err),
                }
            )
            return
        except (ValueError, KeyError, TypeError) as err:
            self.emit({"event": "error", **reply, "message": str(err)})
            return
        if event is None:
            self.emit({"event": "ack", **reply})
        else:
            if "id" in reply:
                event = {**event, "id": reply["id"]}
            self.emit(event)

    def serve(self, stdin_fd: int, wakeup_fd: int, stop_flag: Callable[[], Optional[str]]) -> str:
        """Read commands until quit, EOF or a stop signal; returns the reason."""
        buffer = b""
        eof = False
        while True:
            reason = stop_flag()
            if reason:
                return reason
            if self.emitter.broken:
                return "stdout-closed"
            fds = [wakeup_fd] if eof else [stdin_fd, wakeup_fd]
            readable, _, _ = select.select(fds, [], [], 1.0)
            if wakeup_fd in readable:
                with contextlib.suppress(BlockingIOError):
                    os.read(wakeup_fd, 4096)
            if stdin_fd not in readable:
                continue
            chunk = os.read(stdin_fd, 65536)
            if not chunk:
                if self.options.ignore_eof:
                    eof = True
                    continue
                return "eof"
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if not line.strip():
                    continue
                try:
                    cmd = json.loads(line)
                    if not isinstance(cmd, dict):
                        raise ValueError("a command is a JSON object")
                except ValueError as err:
                    self.emit({"event": "error", "cmd": None, "message": f"bad command: {err}"})
                    continue
                if not self.handle_command(cmd):
                    return "quit"


#: seccomp actions ``--seccomp`` can install (the return value of the filter)
SANDBOX_ACTIONS: Mapping[str, Optional[int]] = MappingProxyType(
    {
        "none": None,
        "trap": seccomp.SECCOMP_RET_TRAP,
        "kill": seccomp.SECCOMP_RET_KILL_PROCESS,
        "errno": seccomp.SECCOMP_RET_ERRNO | errno.EPERM,
    }
)


def install_sandbox(action: str) -> None:
    """Install, on the calling thread, a filter like a sandboxed VMM's (BRIEF section 1)."""
    ret = SANDBOX_ACTIONS[action]
    assert ret is not None
    arch = remote_arch.host_arch()
    requests = [
        api.KVM_GET_VCPU_EVENTS,
        api.KVM_SET_VCPU_EVENTS,
        kx86.KVM_NMI,
        kx86.KVM_X86_SET_MCE,
    ]
    _native.seccomp_install_filter(
        seccomp.deny_ioctls(arch.audit_arch, arch.nr["ioctl"], requests, ret)
    )


def parse_args(argv: Optional[Sequence[str]]) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m serrinj.testvm",
        description="serrinj's built-in test VM: a minimal VMM whose tiny guest reports "
        "the NMIs, machine checks and SErrors it observes as JSON lines on stdout.",
    )
    parser.add_argument("--arch", default=host_arch(), choices=sorted(ARCHES))
    parser.add_argument(
        "--vcpus", type=int, help="number of vCPUs (default 1, or as many as --vcpu-ids)"
    )
    parser.add_argument("--mode", default="halt", choices=sorted(MODES))
    parser.add_argument("--thread-names", default="qemu", choices=list(THREAD_NAMES))
    parser.add_argument("--start-paused", action="store_true", help="wait for {'cmd':'run'}")
    parser.add_argument("--tick-ms", type=int, default=10, help="guest timer period")
    parser.add_argument("--yield-ms", type=int, default=3, help="futex wait per yield")
    parser.add_argument("--mce-banks", type=int, default=10, help="x86 MCE banks")
    parser.add_argument("--ignore-eof", action="store_true", help="keep running at end of stdin")
    parser.add_argument(
        "--seccomp",
        default="none",
        choices=sorted(SANDBOX_ACTIONS),
        help="play a sandboxed VMM: a seccomp filter answers the vCPU-event ioctls"
        " (KVM_GET/SET_VCPU_EVENTS, KVM_NMI, KVM_X86_SET_MCE) with this action",
    )
    parser.add_argument(
        "--seccomp-threads",
        default="vcpu",
        choices=["vcpu", "all"],
        help="filter only the vCPU threads (like Firecracker) or every thread",
    )
    parser.add_argument(
        "--block-in",
        default="futex",
        choices=sorted(BLOCK_IN),
        help="futex mode: the syscall a yielding vCPU thread blocks in (a futex, the raw"
        " ppoll or nanosleep, or read on a pipe); a leaked restart code is an error event",
    )
    parser.add_argument(
        "--mask-serror",
        action="store_true",
        help="arm64: the guest keeps SErrors masked (PSTATE.A) until {'cmd':'unmask'}",
    )
    parser.add_argument(
        "--mmio-probe",
        action="store_true",
        help="arm64: the guest keeps loading from an unmapped address (an MMIO exit each"
        " time), so that an external data abort can be injected right after one",
    )
    parser.add_argument(
        "--name",
        metavar="NAME",
        help="the VM's name: only shown in the command line, where serrinj finds the names"
        " of VMs (as QEMU's -name), for `serrinj --name` and the policy's VM names",
    )
    parser.add_argument(
        "--profile",
        default="none",
        choices=["none", *profiles.PROFILES],
        help="lay the VMM out as this VMM does: thread names, which thread creates the vCPU"
        " fds, dup'ed and stats fds, APIC vcpu ids, the seccomp filters of each thread and"
        " what a SIGSYS does (see serrinj.testvm.profiles); default: none of that",
    )
    parser.add_argument(
        "--topology",
        metavar="SOCKETS,CORES,THREADS",
        help="x86 CPU topology; a profile whose VMM numbers vCPUs by APIC id (qemu,"
        " cloud-hypervisor) gets those ids, e.g. --vcpus 4 --topology 2,3,1: 0,1,2,4",
    )
    parser.add_argument(
        "--vcpu-ids",
        metavar="ID,ID,...",
        help="the KVM vcpu ids, in creation order (the first must be 0, the boot CPU)",
    )
    parser.add_argument(
        "--vcpu-mode",
        metavar="ID=MODE",
        action="append",
        default=[],
        help="run vCPU ID's guest in MODE instead of --mode (repeatable), e.g. one vCPU"
        " that keeps exiting to the VMM (futex) beside vCPUs that spin",
    )
    parser.add_argument(
        "--on-sigsys",
        default="vmm",
        choices=["vmm", "count"],
        help="a profile's seccomp trap (SIGSYS): 'vmm' reports it and dies as that VMM does"
        " (Firecracker: exit 148; cloud-hypervisor: killed by SIGSYS), 'count' only reports it",
    )
    parser.add_argument(
        "--dup-vcpu-fds",
        action="store_true",
        help="hold a second fd on every vCPU (a dup the vCPU thread never uses), as"
        " Firecracker does; the ready event gives it as dup_fd",
    )
    ns = parser.parse_args(argv)
    profile = None if ns.profile == "none" else profiles.PROFILES[ns.profile]
    if profile is not None and ns.arch != "x86_64":
        parser.error("the --profile layouts (ids, filters) are the VMMs' x86_64 ones")
    if profile is not None and (ns.thread_names != "qemu" or ns.seccomp != "none"):
        parser.error("--profile sets thread names and sandbox: drop --thread-names/--seccomp")
    try:
        topology = None if ns.topology is None else profiles.parse_topology(ns.topology)
        if ns.vcpu_ids is not None:
            ids = tuple(int(x, 0) for x in ns.vcpu_ids.split(","))
            if topology is not None:
                raise ValueError("--vcpu-ids and --topology exclude each other")
            if ids[0] != 0 or len(set(ids)) != len(ids) or min(ids) < 0:
                raise ValueError("--vcpu-ids: distinct ids >= 0, the first 0 (the boot CPU)")
            if ns.vcpus is None:
                ns.vcpus = len(ids)
            elif ns.vcpus != len(ids):
                raise ValueError(f"--vcpus {ns.vcpus} but {len(ids)} --vcpu-ids")
        else:
            ns.vcpus = 1 if ns.vcpus is None else ns.vcpus
            ids = profiles.vcpu_ids(profile, ns.vcpus, topology)
    except ValueError as err:
        parser.error(str(err))
    if not 1 <= ns.vcpus <= 64:
        parser.error("--vcpus must be between 1 and 64")
    vcpu_modes: Dict[int, str] = {}
    for item in ns.vcpu_mode:
        vid, _, mode = item.partition("=")
        try:
            vcpu_modes[int(vid, 0)] = mode
        except ValueError:
            parser.error(f"--vcpu-mode takes ID=MODE, not {item!r}")
        if mode not in MODES or int(vid, 0) not in ids:
            parser.error(f"--vcpu-mode {item}: no vCPU {vid}, or not one of {sorted(MODES)}")
    if not 1 <= ns.tick_ms <= 1000:
        parser.error("--tick-ms must be between 1 and 1000")
    if not 0 <= ns.yield_ms <= 1000:
        parser.error("--yield-ms must be between 0 and 1000")
    if ns.block_in != "futex" and "futex" not in (ns.mode, *vcpu_modes.values()):
        parser.error("--block-in needs --mode futex (only then does the guest yield)")
    return Options(
        arch=ns.arch,
        vcpus=ns.vcpus,
        mode=ns.mode,
        thread_names=ns.thread_names,
        start_paused=ns.start_paused,
        tick_ms=ns.tick_ms,
        yield_ms=ns.yield_ms,
        mce_banks=ns.mce_banks,
        ignore_eof=ns.ignore_eof,
        seccomp=ns.seccomp,
        seccomp_threads=ns.seccomp_threads,
        mask_serror=ns.mask_serror,
        mmio_probe=ns.mmio_probe,
        block_in=ns.block_in,
        profile=ns.profile,
        vcpu_ids=ids,
        on_sigsys=ns.on_sigsys,
        vcpu_modes=MappingProxyType(vcpu_modes),
        dup_vcpu_fds=ns.dup_vcpu_fds,
    )


def _handle_sigsys(vm: Vm) -> None:
    """Count and report every seccomp trap, then act as the profile's VMM does.

    The kernel sends SIGSYS to the thread whose syscall the filter trapped (the
    call itself returns ENOSYS there); Python runs this handler on the main thread.
    """
    profile = vm.profile
    assert profile is not None

    def on_sigsys(_signum: int, _frame: object) -> None:
        vm.sigsys_count += 1
        vm.emit({"event": "sigsys", "count": vm.sigsys_count, "profile": profile.name})
        if vm.options.on_sigsys != "vmm":
            return
        if profile.on_sigsys == "exit-148":
            os._exit(148)  # Firecracker's FcExitCode::BadSyscall
        sys.stderr.write("Probable seccomp violation\n")
        sys.stderr.flush()
        signal.signal(signal.SIGSYS, signal.SIG_DFL)
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGSYS)

    signal.signal(signal.SIGSYS, on_sigsys)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the test VM until quit, end of input or SIGTERM/SIGINT/SIGHUP."""
    options = parse_args(argv)
    out = sys.stdout
    stop_reason: List[str] = []

    def on_stop(signum: int, _frame: object) -> None:
        stop_reason.append(signal.Signals(signum).name)

    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.signal(KICK_SIGNAL, lambda _s, _f: None)
    for sig in _STOP_SIGNALS:
        signal.signal(sig, on_stop)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    # A blocked signal mask is inherited through fork and exec: a parent that held
    # its stop signals while starting us must not leave us deaf to SIGTERM.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)

    vm: Optional[Vm] = None
    try:
        arch = load_arch(options.arch)
        vm = Vm(arch, options, out)
        if vm.profile is not None and vm.profile.sandboxed:
            _handle_sigsys(vm)
        vm.create()
        if vm.profile is not None:
            vm.install_filters(vm.profile.main_filters)
        vm.start()
        reason = vm.serve(
            sys.stdin.fileno(), wake_r, lambda: stop_reason[0] if stop_reason else None
        )
    except (OSError, RuntimeError, ValueError, ImportError) as err:
        Emitter(out).emit({"event": "error", "cmd": None, "message": f"test VM failed: {err}"})
        if vm is not None:
            vm.shutdown()
        return 1
    vm.shutdown()
    vm.emit({"event": "shutdown", "reason": reason})
    signal.set_wakeup_fd(-1)
    os.close(wake_r)
    os.close(wake_w)
    return 0
