"""serrinj's Python API: find a running VM, read its vCPUs, inject faults.

Everything here is re-exported at the package top, so a script writes::

    import serrinj

    vm = serrinj.find(name="web1")
    inj = vm.nmi(vcpu=1, wait=5.0)
    assert inj.delivered

Each call runs the use case the command line runs (:mod:`serrinj.ops`): the
same checks before anything is sent, the same per-VM lock and audit record,
the same exceptions (:mod:`serrinj.errors`; each class carries the exit code
the command would exit with). docs/api.md is the guide, with the stability
and deprecation rules.

Two ways to reach a VM:

- a :class:`Vm` handle finds the VM's process again on every call (the VMM
  may have started, ended or moved vCPU threads meanwhile; a pid reused by
  another process is noticed by its start time), takes the VM lock for the
  call and releases it;
- a :class:`Session` (``with vm.session() as s:``) takes the VM lock once
  and keeps the VM's vCPU-to-thread mapping for all its calls: the fast path
  for many injections. A vCPU thread is still seized only for the moment of
  each call, so the guest runs, and takes each fault, in between.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, List, Optional, Tuple, Union

from serrinj import faults as _faults
from serrinj.errors import InvalidInput, TargetGone, TargetNotFound
from serrinj.faults import ext_dabt as _ext_dabt
from serrinj.host import kvmcaps as _host
from serrinj.kvm.arch import Arch
from serrinj.ops import events as _events
from serrinj.ops import inject as _inject
from serrinj.ops import status as _status
from serrinj.target import attach as _target
from serrinj.target import discover

Injection = _inject.Injection
Delivery = _inject.Delivery
StatusReport = _status.StatusReport
VcpuStatus = _status.VcpuStatus
HostCaps = _host.HostCaps
EventsSnapshot = _events.Snapshot
EventsLoad = _events.LoadResult

__all__ = [
    "CAPABILITIES",
    "Delivery",
    "EventsLoad",
    "EventsSnapshot",
    "HostCaps",
    "Injection",
    "Session",
    "StatusReport",
    "VcpuStatus",
    "Vm",
    "capability_missing",
    "find",
    "host_caps",
    "read_events",
    "vms",
]


# ====================================================================== finding VMs
def find(
    pid: Optional[int] = None,
    name: Optional[str] = None,
    *,
    domain: Optional[str] = None,
    fd: Optional[int] = None,
) -> Vm:
    """Find one running VM and return a handle on it.

    - ``pid``: the VMM's process id;
    - ``name``: the VM's name (QEMU ``-name guest=NAME``, or a libvirt domain's name);
    - ``domain``: a libvirt domain, by the pid file libvirt keeps for it
      (``/run/libvirt/qemu/DOMAIN.pid``);
    - ``fd``: a vCPU fd. Alone, an fd this process holds (inherited from the
      VMM, whose process is then found with ``kcmp``); with ``pid``, that
      process's fd. The handle's methods then default to that fd's vCPU.
    - nothing: the only VM on the host (an error when there are several).

    Raises :class:`~serrinj.errors.TargetNotFound` (no such VM),
    :class:`~serrinj.errors.PermissionDenied` (its fds may not be read) or
    :class:`~serrinj.errors.InvalidInput` (several VMs match).
    """
    default_vcpu: Optional[int] = None
    if domain is not None:
        if name is not None:
            raise InvalidInput("give either name or domain, not both")
        found = discover.libvirt_pid(domain)
        if found is None:
            raise TargetNotFound(
                f"no running libvirt domain {domain!r}: libvirt keeps no pid file for it"
                f" in {' or '.join(discover.LIBVIRT_RUN_DIRS)}",
                hint="`virsh list` shows the running domains",
            )
        if pid is not None and pid != found:
            raise InvalidInput(f"libvirt domain {domain!r} is pid {found}, not {pid}")
        pid = found
    if fd is not None:
        pid, default_vcpu = _target.vcpu_fd_owner(fd, pid)
    return Vm(discover.find(pid=pid, name=name), default_vcpu)


def vms() -> List[Vm]:
    """Every KVM VM on the host that this process may inspect (as ``serrinj list``)."""
    from serrinj.ops.listing import list_vms

    return [Vm(vm) for vm in list_vms()]


def host_caps() -> HostCaps:
    """This host's KVM: API version and the injection capabilities (``/dev/kvm``, no VM)."""
    return _host.probe()


#: the names :func:`capability_missing` (and the pytest marker ``serrinj_needs``) know
CAPABILITIES: Tuple[str, ...] = (
    "kvm",
    "x86_64",
    "arm64",
    "nmi",
    "mce",
    "serror",
    "ras",
    "ext-dabt",
    "root",
)


def capability_missing(name: str) -> Optional[str]:
    """Why this host cannot do ``name`` (one of :data:`CAPABILITIES`), or ``None`` if it can.

    ``kvm``: /dev/kvm is usable; ``x86_64``/``arm64``: the host's architecture;
    ``nmi``, ``mce``: x86_64 faults (``mce`` needs KVM_CAP_MCE); ``serror``: an
    arm64 host; ``ras``: an SError with a given syndrome
    (KVM_CAP_ARM_INJECT_SERROR_ESR); ``ext-dabt``: KVM_CAP_ARM_INJECT_EXT_DABT;
    ``root``: ptrace of any VMM (root or CAP_SYS_PTRACE).
    """
    from serrinj.errors import SerrinjError
    from serrinj.host import procfs
    from serrinj.kvm import api as kvm_api

    key = name.strip().lower().replace("_", "-")
    key = {"aarch64": "arm64", "x86-64": "x86_64", "ext-dabt": "ext-dabt"}.get(key, key)
    arch = _host.machine()
    if key == "root":
        if procfs.has_capability(procfs.CAP_SYS_PTRACE):
            return None
        return "needs root or CAP_SYS_PTRACE to trace a VMM this process did not start"
    if key == Arch.X86_64:
        return None if arch == Arch.X86_64 else f"needs an x86_64 host; this one is {arch}"
    if key == "arm64":
        return None if arch == Arch.AARCH64 else f"needs an arm64 host; this one is {arch}"
    if key not in CAPABILITIES:
        raise InvalidInput(f"unknown capability {name!r}", hint=f"known: {', '.join(CAPABILITIES)}")
    try:
        caps = _host.probe()
    except SerrinjError as err:
        return err.message
    if key == "kvm":
        return None
    if key in ("nmi", "mce"):
        if arch != Arch.X86_64:
            return f"{key} injection is for x86_64; this host is {arch}"
        if key == "mce" and not caps.cap(kvm_api.KVM_CAP_MCE):
            return "this host's KVM has no machine-check support (KVM_CAP_MCE is 0)"
        return None
    if arch != Arch.AARCH64:
        return f"{key} injection is for arm64; this host is {arch}"
    if key == "ras" and not caps.serror_esr:
        return (
            "this host cannot inject an SError with a given syndrome:"
            " KVM_CAP_ARM_INJECT_SERROR_ESR is 0 (the CPU has no RAS extension)"
        )
    if key == "ext-dabt" and not caps.ext_dabt:
        return "this host cannot inject external data aborts: KVM_CAP_ARM_INJECT_EXT_DABT is 0"
    return None


def read_events(path: str) -> EventsSnapshot:
    """Read and check an events file (from :meth:`Vm.save_events` or ``serrinj events save``)."""
    return _events.parse(_events.read_file(path), path)


# ====================================================================== observers
_observers: List[Callable[[Injection], None]] = []


@contextlib.contextmanager
def _observe(callback: Callable[[Injection], None]) -> Iterator[None]:
    """Call ``callback`` with every injection made through the API meanwhile (the
    pytest plugin records them for the test's report). Internal."""
    _observers.append(callback)
    try:
        yield
    finally:
        _observers.remove(callback)


def _made(inj: Injection) -> Injection:
    for callback in list(_observers):
        callback(inj)
    return inj


# ====================================================================== the handles
VcpuSelection = Union[int, str, None]


class _Injector:
    """What a :class:`Vm` and a :class:`Session` share: one method per use case."""

    def __init__(self, vm: discover.Vm, default_vcpu: Optional[int] = None) -> None:
        self._vm = vm
        self._default_vcpu = default_vcpu

    # ------------------------------------------------------------ what it is
    @property
    def pid(self) -> int:
        """The VMM's process id."""
        return self._vm.pid

    @property
    def name(self) -> Optional[str]:
        """The VM's name (QEMU ``-name``, libvirt), if it has one."""
        return self._vm.name

    @property
    def arch(self) -> str:
        """``"x86_64"`` or ``"aarch64"``."""
        return self._vm.arch

    @property
    def vmm(self) -> str:
        """The kind of VMM: ``qemu``, ``kvmtool``, ``firecracker``, ... or ``unknown``."""
        return self._vm.vmm

    @property
    def vcpu_ids(self) -> Tuple[int, ...]:
        """KVM's vCPU ids (on x86_64 the APIC ids), as the VM was last seen."""
        return tuple(v.vcpu_id for v in self._vm.vcpus)

    @property
    def label(self) -> str:
        """How messages name the VM: ``'web1' (pid 1234)``."""
        return self._vm.label

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.label} {self.arch} vcpus={list(self.vcpu_ids)}>"

    # ------------------------------------------------------------ plumbing
    def _current(self) -> discover.Vm:
        raise NotImplementedError

    def _spec(self, vcpu: VcpuSelection) -> _target.VcpuSpec:
        if vcpu is None:
            return self._default_vcpu
        if isinstance(vcpu, bool) or (isinstance(vcpu, str) and vcpu != "all"):
            raise InvalidInput(f"vcpu takes a vCPU id or 'all', not {vcpu!r}")
        if isinstance(vcpu, int) and vcpu < 0:
            raise InvalidInput(f"vcpu {vcpu}: vCPU ids are not negative")
        return vcpu

    def _select(self, vcpu: VcpuSelection, kind: Optional[str] = None) -> _target.Target:
        vm, spec = self._current(), self._spec(vcpu)
        if kind is None:
            return self._mapped(_target.select(vm, spec))
        return self._mapped(_inject.select_target(kind, vm, spec))

    def _mapped(self, tgt: _target.Target) -> _target.Target:
        return tgt

    def _one(self, kind: str, vcpu: Optional[int]) -> _target.Target:
        if not (vcpu is None or (isinstance(vcpu, int) and not isinstance(vcpu, bool))):
            raise InvalidInput(
                f"vcpu={vcpu!r}: an injection goes to one vCPU id; loop over vm.vcpu_ids for more"
            )
        return self._select(vcpu, kind)

    # ------------------------------------------------------------ reading
    def status(self, vcpu: VcpuSelection = None) -> StatusReport:
        """The host's capabilities and a snapshot of each vCPU (or of ``vcpu``):
        its thread, where that thread was, and the decoded pending events.

        Each vCPU thread is stopped for a moment; nothing is changed.
        """
        return _status.status_of(self._select(vcpu))

    def save_events(
        self, path: Optional[str] = None, *, vcpu: VcpuSelection = None
    ) -> EventsSnapshot:
        """Read every vCPU's (or ``vcpu``'s) pending events; also write them to ``path``
        (JSON, schema ``serrinj-events/1``) when given."""
        snap = _events.save(self._select(vcpu))
        if path is not None:
            snap.write(path)
        return snap

    # ------------------------------------------------------------ injecting
    def inject_serror(
        self,
        esr: Union[int, str, None] = None,
        *,
        severity: Optional[str] = None,
        vcpu: Optional[int] = None,
        wait: Optional[float] = None,
        force: bool = False,
        dry_run: bool = False,
    ) -> Injection:
        """Make a virtual SError pending on an arm64 vCPU.

        ``esr`` is the ISS (bits [24:0] of the guest's ESR_EL1, a number or a
        severity name); ``severity`` (``ce``, ``ueo``, ``uer``, ``ueu``, ``uc``)
        builds a RAS syndrome instead; with neither, KVM and the CPU choose it.
        ``vcpu`` may be left out when the VM has one vCPU. ``wait`` polls up to
        that many seconds until the guest has taken it
        (:class:`~serrinj.errors.NotDelivered` if not). ``force`` injects even
        if an SError is already pending; ``dry_run`` checks and reads the vCPU
        but sends nothing.
        """
        req = _faults.SError.from_fields({"esr": esr, "severity": severity, "force": force})
        tgt = self._one("serror", vcpu)
        return _made(_inject.inject(tgt, req, _wait(wait), dry_run=dry_run)[0])

    def inject_ext_dabt(
        self,
        *,
        vcpu: Optional[int] = None,
        mmio_addr: Optional[int] = None,
        mmio_timeout: float = _ext_dabt.DEFAULT_MMIO_TIMEOUT_S,
        dry_run: bool = False,
    ) -> Injection:
        """Inject a synchronous external data abort at the vCPU's next MMIO exit (arm64).

        KVM aims the abort at the access of the vCPU's last exit, so serrinj
        waits up to ``mmio_timeout`` seconds for an MMIO exit (at
        ``mmio_addr`` if given) and injects there
        (:class:`~serrinj.errors.NotDelivered` when none comes). KVM never
        reports the abort as pending, so its delivery cannot be confirmed.
        """
        req = _faults.ExtDabt.from_fields({"mmio_addr": mmio_addr, "mmio_timeout": mmio_timeout})
        tgt = self._one("ext-dabt", vcpu)
        return _made(_inject.inject(tgt, req, dry_run=dry_run)[0])

    def mce(
        self,
        bank: int,
        *,
        preset: Optional[str] = None,
        status: Optional[int] = None,
        addr: Optional[int] = None,
        misc: Optional[int] = None,
        mcg_status: Optional[int] = None,
        vcpu: Optional[int] = None,
        wait: Optional[float] = None,
        force: bool = False,
        dry_run: bool = False,
        readback: bool = True,
    ) -> Injection:
        """Raise a machine check in ``bank`` of an x86_64 vCPU (KVM_X86_SET_MCE).

        ``preset`` is ``corrected``, ``ucna``, ``srao``, ``srar`` or
        ``uc-fatal``; ``status`` (MCi_STATUS), ``misc``, ``mcg_status`` override
        its fields, ``addr`` is MCi_ADDR. An error KVM would turn into a triple
        fault or drop is refused (:class:`~serrinj.errors.Conflict`) unless
        ``force``. ``wait``: poll until the guest took the #MC (a corrected
        error raises none and counts as delivered at once). ``readback=False``
        skips the event readings before and after the send (the report's
        ``before``/``after`` stay empty): the vCPU is held a shorter time.
        """
        req = _faults.MachineCheck.from_fields(
            {
                "bank": bank,
                "preset": preset,
                "status": status,
                "addr": addr,
                "misc": misc,
                "mcg_status": mcg_status,
                "force": force,
            }
        )
        tgt = self._one("mce", vcpu)
        return _made(_inject.inject(tgt, req, _wait(wait), dry_run=dry_run, readback=readback)[0])

    def nmi(
        self,
        *,
        vcpu: Optional[int] = None,
        wait: Optional[float] = None,
        dry_run: bool = False,
        readback: bool = True,
    ) -> Injection:
        """Queue an NMI on an x86_64 vCPU (KVM_NMI); ``wait``: poll until the guest took it;
        ``readback=False``: hold the vCPU for KVM_NMI alone (no ``before``/``after``)."""
        tgt = self._one("nmi", vcpu)
        return _made(_inject.inject_nmi(tgt, _wait(wait), dry_run=dry_run, readback=readback)[0])

    def load_events(
        self, snapshot: EventsSnapshot, *, vcpu: VcpuSelection = None, force: bool = False
    ) -> List[EventsLoad]:
        """Put saved events into the matching vCPUs (by vCPU id) of this VM.

        A pending SError cannot be cancelled: a vCPU that has one already is
        refused (:class:`~serrinj.errors.Conflict`) unless ``force``.
        """
        tgt = self._select("all" if vcpu is None else vcpu)
        return _events.load(tgt, snapshot, force=force)


def _wait(wait: Optional[float]) -> Optional[float]:
    if wait is not None and not wait > 0:
        raise InvalidInput(f"wait={wait!r}: the timeout must be a positive number of seconds")
    return wait


class Vm(_Injector):
    """A handle on one running VM (a VMM process). Get one from :func:`find` or :func:`vms`.

    Every call finds the process again: a VM that has exited raises
    :class:`~serrinj.errors.TargetNotFound` (or :class:`~serrinj.errors.TargetGone`
    when its pid now belongs to another process). Calls take the VM's lock,
    so they never interleave with another serrinj run on the same VM.
    """

    def _current(self) -> discover.Vm:
        old = self._vm
        try:
            vm = discover.find(pid=old.pid)
        except TargetNotFound as err:
            raise TargetGone(f"VM {old.label} is gone: {err.message}", hint=err.hint) from err
        if vm.starttime != old.starttime:
            raise TargetGone(f"VM {old.label} is gone: its pid now belongs to another process")
        self._vm = vm
        return vm

    def refresh(self) -> Vm:
        """Read the VM again (its vCPUs and threads); returns ``self``."""
        self._current()
        return self

    def session(self, *, lock_wait: Optional[float] = None) -> Session:
        """A :class:`Session` on this VM, to use in a ``with`` block.

        ``lock_wait``: how long to wait for another serrinj run on the VM
        (default: ``SERRINJ_LOCK_WAIT``, else 10 s).
        """
        return Session(self._vm, self._default_vcpu, lock_wait=lock_wait)


class Session(_Injector):
    """Many calls on one VM, fast: the VM lock is held and the VM is found once.

    ::

        with vm.session() as s:
            for _ in range(100):
                s.nmi(vcpu=0)

    The methods are those of :class:`Vm`. The vCPU-to-thread mapping is kept
    between calls; :meth:`refresh` reads the VM again (after the VMM has
    added or moved vCPU threads). Each call still seizes the vCPU thread only
    for its own ioctls, so the guest runs between calls (a thread held across
    calls would keep the guest from taking what it was sent).
    """

    def __init__(
        self, vm: discover.Vm, default_vcpu: Optional[int] = None, *, lock_wait: Optional[float]
    ) -> None:
        super().__init__(vm, default_vcpu)
        self._lock_wait = lock_wait
        self._stack: Optional[contextlib.ExitStack] = None

    def __enter__(self) -> Session:
        from serrinj.ops import guard, lock

        if self._stack is not None:
            raise InvalidInput("this session is already open")
        vm = self._vm
        wait = guard.LOCK_WAIT if self._lock_wait is None else self._lock_wait
        stack = contextlib.ExitStack()
        stack.enter_context(lock.vm_lock(vm.pid, vm.starttime, vm.label, wait=wait))
        self._stack = stack
        try:
            self.refresh()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()  # the exception, if any, goes on

    def close(self) -> None:
        """Release the VM lock (leaving the ``with`` block does it)."""
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    def refresh(self) -> Session:
        """Find the VM again (same process, checked by its start time); returns ``self``."""
        old = self._vm
        vm = discover.find(pid=old.pid)
        if vm.starttime != old.starttime:
            raise TargetGone(f"VM {old.label} is gone: its pid now belongs to another process")
        self._vm = vm
        return self

    def _current(self) -> discover.Vm:
        if self._stack is None:
            raise InvalidInput(
                "the session is not open: use it in a `with vm.session() as s:` block"
            )
        return self._vm

    def _mapped(self, tgt: _target.Target) -> _target.Target:
        # a busy vCPU's thread is found once (by a short probe) and kept for the session
        vm = _target.ensure_mapped(tgt.vm, tgt.vcpu_ids)
        if vm is not tgt.vm:
            self._vm = vm
            tgt = _target.Target(vm, tgt.vcpu_ids)
        return tgt
