"""Injections, the use case: one fault (:mod:`serrinj.faults`) into selected vCPUs.

Every request is validated completely before the VMM is touched; a refused
request sends nothing. Each attempt runs under the VM's lock and is audited
(:func:`~serrinj.ops.guard.guarded`); the policy for callers who are not root
is checked first. The injection itself, per vCPU, is the fault's own
(:meth:`~serrinj.faults.base.Fault.run`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, List, Optional, Union

from serrinj._lazy import module_getattr
from serrinj.errors import InvalidInput
from serrinj.faults import KINDS, base
from serrinj.faults.base import Delivery, Fault, Injection
from serrinj.host import kvmcaps
from serrinj.ops import guard
from serrinj.ops.guard import guarded
from serrinj.target import attach as target
from serrinj.target import discover

if TYPE_CHECKING:
    from serrinj.faults.ext_dabt import DEFAULT_MMIO_TIMEOUT_S, ExtDabt
    from serrinj.faults.mce import MachineCheck
    from serrinj.faults.nmi import Nmi
    from serrinj.faults.serror import SError
    from serrinj.kvm import x86_64 as kvm_x86

    #: the requests under the names this module has always had
    SErrorRequest = SError
    ExtDabtRequest = ExtDabt
    MceRequest = MachineCheck
    NmiRequest = Nmi

_SERROR = ("serrinj.faults.serror", "SError")
_EXT_DABT = ("serrinj.faults.ext_dabt", "ExtDabt")
_MCE = ("serrinj.faults.mce", "MachineCheck")
_NMI = ("serrinj.faults.nmi", "Nmi")
#: names imported on first use (a fault kind's module loads only when that kind is used)
__getattr__ = module_getattr(
    __name__,
    globals(),
    {
        "SErrorRequest": _SERROR,
        "ExtDabtRequest": _EXT_DABT,
        "MceRequest": _MCE,
        "NmiRequest": _NMI,
        "SError": _SERROR,
        "ExtDabt": _EXT_DABT,
        "MachineCheck": _MCE,
        "Nmi": _NMI,
        "DEFAULT_MMIO_TIMEOUT_S": ("serrinj.faults.ext_dabt", "DEFAULT_MMIO_TIMEOUT_S"),
    },
)


__all__ = [
    "DEFAULT_MMIO_TIMEOUT_S",
    "Delivery",
    "ExtDabtRequest",
    "Injection",
    "MceRequest",
    "NmiRequest",
    "SErrorRequest",
    "build_mce",
    "inject",
    "inject_ext_dabt",
    "inject_mce",
    "inject_nmi",
    "inject_serror",
    "require_arch",
    "resolve_target",
    "select_target",
    "serror_esr",
    "validate_ext_dabt",
]


def require_arch(vm_arch: str, kind: str) -> None:
    """Refuse a ``kind`` fault on a VM of ``vm_arch`` that cannot take it."""
    base.require_arch(vm_arch, kind, KINDS[kind].arch)


@guarded(
    lambda fault, *args, **kw: f"inject-{fault.kind}",
    lambda fault, wait=None, **kw: {
        **fault.audit(),
        "wait": wait,
        "dry_run": kw.get("dry_run", False),
    },
)
def inject(
    tgt: target.Target,
    fault: Fault,
    wait: Optional[float] = None,
    *,
    dry_run: bool = False,
    readback: bool = True,
) -> List[Injection]:
    """Send ``fault`` to each selected vCPU; with ``wait``, poll until the guest took it.

    ``dry_run`` runs every check and reads the vCPU, but sends nothing.
    ``readback=False`` skips the readings before and after the send that only feed the
    report (an NMI's and a machine check's events): the vCPU is held for the checks and
    the send alone, and the report shows ``{}`` for what was not read.
    """
    fault.validate(wait)
    require_arch(tgt.vm.arch, fault.kind)
    caps = kvmcaps.probe()
    fault.check(caps)
    out: List[Injection] = guard.results()
    return fault.run(tgt, caps, wait, dry_run, out, readback)


def inject_serror(
    tgt: target.Target,
    req: SError,
    wait: Optional[float] = None,
    *,
    dry_run: bool = False,
    readback: bool = True,
) -> List[Injection]:
    """Make an SError pending on each selected vCPU (its checks need both readings:
    ``readback`` changes nothing)."""
    return inject(tgt, req, wait, dry_run=dry_run, readback=readback)


def inject_ext_dabt(
    tgt: target.Target, req: ExtDabt, wait: Optional[float] = None, *, dry_run: bool = False
) -> List[Injection]:
    """Inject an external data abort right after the vCPU's next MMIO exit
    (``wait`` is refused: the abort cannot be read back)."""
    return inject(tgt, req, wait, dry_run=dry_run)


def inject_mce(
    tgt: target.Target,
    req: MachineCheck,
    wait: Optional[float] = None,
    *,
    dry_run: bool = False,
    readback: bool = True,
) -> List[Injection]:
    """Raise a machine check on each selected vCPU (``dry_run``: predict, send nothing)."""
    return inject(tgt, req, wait, dry_run=dry_run, readback=readback)


def inject_nmi(
    tgt: target.Target,
    wait: Optional[float] = None,
    *,
    dry_run: bool = False,
    readback: bool = True,
) -> List[Injection]:
    """Queue an NMI on each selected vCPU (``dry_run``: read the vCPU, send nothing;
    ``readback=False``: hold the vCPU for KVM_NMI alone)."""
    from serrinj.faults.nmi import Nmi

    return inject(tgt, Nmi(), wait, dry_run=dry_run, readback=readback)


# ---------------------------------------------------------------------- requests
def validate_ext_dabt(req: ExtDabt, wait: Optional[float] = None) -> None:
    """Refuse an external data abort request that cannot be carried out as asked."""
    req.validate(wait)


def serror_esr(esr_value: Union[int, str, None], severity: Optional[str] = None) -> Optional[int]:
    """The ISS an SError request carries: ``esr`` (a number, or a severity name as text),
    or the RAS syndrome of ``severity`` (``ce``, ``ueo``, ``uer``, ``ueu``, ``uc``), or
    ``None`` (KVM/the CPU choose it)."""
    from serrinj.faults.serror import SError

    return SError.from_fields({"esr": esr_value, "severity": severity}).esr


def build_mce(bank: Optional[int], **fields: Any) -> kvm_x86.Mce:
    """The ``struct kvm_x86_mce`` of a request: a preset, with any field given overriding it
    (``preset``, ``status``, ``addr``, ``misc``, ``mcg_status``)."""
    from serrinj.faults.mce import MachineCheck

    return MachineCheck.from_fields({"bank": bank, **fields}).mce


# ---------------------------------------------------------------------- the target
def resolve_target(
    kind: str,
    pid: Optional[int] = None,
    name: Optional[str] = None,
    vcpu: target.VcpuSpec = None,
) -> target.Target:
    """The target of an injection: one vCPU unless ``vcpu`` is ``"all"``.

    The VM's architecture is checked first: an SError for an x86_64 VM is
    pointed at ``mce``/``nmi`` (and the reverse) before anything else.
    """
    return select_target(kind, discover.find(pid=pid, name=name), vcpu)


def select_target(kind: str, vm: discover.Vm, vcpu: target.VcpuSpec = None) -> target.Target:
    """:func:`resolve_target` for a VM already found."""
    tgt = target.select(vm, vcpu)
    require_arch(tgt.vm.arch, kind)
    if vcpu is None and len(tgt.vcpu_ids) > 1:
        ids = ", ".join(str(i) for i in tgt.vcpu_ids)
        raise InvalidInput(
            f"VM {tgt.vm.label} has {len(tgt.vcpu_ids)} vCPUs; choose one with --vcpu ID,"
            " or --vcpu all",
            hint=f"vCPU ids: {ids}",
        )
    return tgt
