"""Injections: arm64 SError and external data abort, x86_64 machine check and NMI.

Every request is validated completely before the VMM is touched; a refused
request sends nothing. After the injection the events are read back, and with
``wait`` the vCPU is polled until the fault is no longer pending (the guest
took it), which gives the delivery latency, or until the timeout, which is
then explained from the vCPU's state.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Tuple, Union

from serrinj.codec import esr, mce
from serrinj.errors import Conflict, InvalidInput, NotDelivered, Unsupported
from serrinj.host import kvmcaps as host
from serrinj.kvm import api
from serrinj.kvm import arm64 as kvm_arm64
from serrinj.kvm import x86_64 as kvm_x86
from serrinj.ops import guard, kvmprobe
from serrinj.ops.guard import guarded
from serrinj.ops.status import decode_events, last_exception, thread_state
from serrinj.remote.session import RemoteThread
from serrinj.target import attach as target
from serrinj.target import discover
from serrinj.vcpu.base import Vcpu

SERROR_REQUESTS = (api.KVM_GET_VCPU_EVENTS, api.KVM_SET_VCPU_EVENTS, api.KVM_GET_ONE_REG)
NMI_REQUESTS = (api.KVM_GET_VCPU_EVENTS, kvm_x86.KVM_NMI)
MCE_REQUESTS = (
    api.KVM_GET_VCPU_EVENTS,
    kvm_x86.KVM_GET_MSRS,
    kvm_x86.KVM_GET_SREGS,
    kvm_x86.KVM_X86_SET_MCE,
)
_POLL_START = 0.0005
#: how long ``--ext-dabt`` waits for the vCPU's next MMIO exit by default
DEFAULT_MMIO_TIMEOUT_S = 5.0
_POLL_MAX = 0.02


@dataclass(frozen=True)
class Delivery:
    """The outcome of ``--wait``."""

    delivered: bool
    latency_s: Optional[float]
    polls: int
    reason: str = ""

    def as_dict(self) -> Dict[str, object]:
        return {
            "delivered": self.delivered,
            "latency_s": self.latency_s,
            "polls": self.polls,
            "reason": self.reason or None,
        }


@dataclass(frozen=True)
class Injection:
    """What was injected where, and what the vCPU looked like before and after."""

    kind: str
    vm_pid: int
    vm_name: Optional[str]
    vcpu_id: int
    tid: int
    thread_state: str
    request: Dict[str, object]
    before: Dict[str, object]
    after: Dict[str, object]
    prediction: Dict[str, object] = field(default_factory=dict)
    delivery: Optional[Delivery] = None
    registers_restored: bool = True
    #: whether the thread could have put itself back had serrinj been killed
    #: (docs/SAFETY.md); ``None`` when no thread was held
    kill_safe: Optional[bool] = None
    kill_safe_reason: str = ""
    timings_us: Dict[str, float] = field(default_factory=dict)
    #: validated and planned, but nothing was sent (``--dry-run``)
    dry_run: bool = False

    @property
    def delivered(self) -> Optional[bool]:
        """Whether the guest took the fault (``None`` when delivery was not waited for)."""
        return None if self.delivery is None else self.delivery.delivered

    def as_dict(self) -> Dict[str, object]:
        return {
            "kind": self.kind,
            "vm": {"pid": self.vm_pid, "name": self.vm_name},
            "vcpu_id": self.vcpu_id,
            "tid": self.tid,
            "thread_state": self.thread_state,
            "request": self.request,
            "before": self.before,
            "after": self.after,
            "prediction": self.prediction,
            "delivery": self.delivery.as_dict() if self.delivery else None,
            "registers_restored": self.registers_restored,
            "kill_safe": self.kill_safe,
            "kill_safe_reason": self.kill_safe_reason,
            "timings_us": self.timings_us,
            "dry_run": self.dry_run,
        }


# ---------------------------------------------------------------------- requests
@dataclass(frozen=True)
class SErrorRequest:
    """``esr=None``: let KVM/the CPU choose the syndrome."""

    esr: Optional[int] = None
    force: bool = False


@dataclass(frozen=True)
class ExtDabtRequest:
    """``mmio_timeout``: how long to wait for the vCPU's next MMIO exit; ``mmio_addr``:
    only an exit at this guest-physical address."""

    mmio_timeout: float = DEFAULT_MMIO_TIMEOUT_S
    mmio_addr: Optional[int] = None


@dataclass(frozen=True)
class MceRequest:
    mce: kvm_x86.Mce
    force: bool = False


@dataclass(frozen=True)
class NmiRequest:
    pass


def require_arch(vm_arch: str, kind: str) -> None:
    wanted = "aarch64" if kind in ("serror", "ext-dabt") else "x86_64"
    if vm_arch == wanted:
        return
    if wanted == "aarch64":
        raise Unsupported(
            f"{kind} injection is for arm64 VMs; this VM is {vm_arch}",
            hint="on x86_64 use `serrinj mce` (machine checks) or `serrinj nmi`",
        )
    raise Unsupported(
        f"{kind} injection is for x86_64 VMs; this VM is {vm_arch}",
        hint="on arm64 use `serrinj inject` (SError) or `serrinj inject --ext-dabt`",
    )


def validate_serror(req: SErrorRequest, caps: host.HostCaps) -> None:
    if req.esr is None:
        return
    esr.validate_injectable(req.esr)
    if not caps.serror_esr:
        raise Unsupported(
            "this host cannot inject an SError with a given ESR:"
            " KVM_CAP_ARM_INJECT_SERROR_ESR is 0 (the CPU has no RAS extension)",
            hint="leave out --esr/--severity and KVM injects an SError with an"
            " implementation-defined syndrome",
        )


def validate_ext_dabt(req: ExtDabtRequest, wait: Optional[float] = None) -> None:
    """Refuse an external data abort request that cannot be carried out as asked.

    ``wait`` (delivery confirmation) is refused: KVM_GET_VCPU_EVENTS never
    shows a pending external data abort (BRIEF section 2), so nothing could
    tell whether the guest took it. The wait the injection does have, for the
    MMIO exit the abort is aimed at, is bounded by ``req.mmio_timeout``.
    """
    if wait is not None:
        raise InvalidInput(
            "--wait does not apply to --ext-dabt: KVM never reports an external data abort"
            " as pending, so its delivery cannot be confirmed; nothing was sent",
            hint="leave out --wait; --mmio-timeout bounds the wait for the MMIO exit, and the"
            " guest takes the abort when its vCPU next enters the guest",
        )
    if not req.mmio_timeout > 0:
        raise InvalidInput("--mmio-timeout must be positive")


def serror_esr(esr_value: Union[int, str, None], severity: Optional[str] = None) -> Optional[int]:
    """The ISS an SError request carries: ``esr`` (a number, or a severity name as text),
    or the RAS syndrome of ``severity`` (``ce``, ``ueo``, ``uer``, ``ueu``, ``uc``), or
    ``None`` (KVM/the CPU choose it)."""
    if esr_value is not None and severity is not None:
        raise InvalidInput("give either --esr or --severity, not both")
    if severity is not None:
        try:
            return esr.PRESETS[severity.strip().lower()]
        except KeyError:
            raise InvalidInput(
                f"unknown severity {severity!r}", hint=f"choose one of {', '.join(esr.PRESETS)}"
            ) from None
    if esr_value is None:
        return None
    if isinstance(esr_value, str):
        return esr.resolve_iss(esr_value)
    if isinstance(esr_value, bool) or not isinstance(esr_value, int):
        raise InvalidInput(f"--esr takes a number or a severity name, not {esr_value!r}")
    return esr.validate_injectable(esr_value)


def build_mce(
    bank: Optional[int],
    *,
    preset: Optional[str] = None,
    status: Optional[int] = None,
    addr: Optional[int] = None,
    misc: Optional[int] = None,
    mcg_status: Optional[int] = None,
) -> kvm_x86.Mce:
    """The ``struct kvm_x86_mce`` of a request: a preset, with any field given overriding it.

    Checked as KVM_X86_SET_MCE would check it (``mce.validate``); the bank count
    of the vCPU itself is checked when it is read.
    """
    if bank is None:
        raise InvalidInput("--bank is required", hint="`serrinj status` shows the bank count")
    if bank < 0:
        raise InvalidInput(f"--bank {bank}: banks are numbered from 0")
    p = mce.preset(preset) if preset else None
    if status is None:
        if p is None:
            raise InvalidInput(
                "give --status or --preset", hint=f"presets: {', '.join(mce.PRESETS)}"
            )
        status = p.status
    if mcg_status is None:
        mcg_status = p.mcg_status if p else 0
    if misc is None:
        misc = p.misc if p else 0
    m = kvm_x86.Mce(status=status, bank=bank, addr=addr or 0, misc=misc, mcg_status=mcg_status)
    mce.validate(m, kvm_x86.KVM_MAX_MCE_BANKS)
    return m


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


# ---------------------------------------------------------------------- helpers
def _timings(rt: RemoteThread) -> Dict[str, float]:
    return {k[: -len("_ns")]: v / 1000 for k, v in rt.timings.items()}


def _poll(
    tgt: target.Target,
    vcpu_id: int,
    requests: Tuple[int, ...],
    pending: Callable[[Vcpu], bool],
    explain: Callable[[Vcpu, RemoteThread], str],
    timeout: float,
    t0: float,
) -> Delivery:
    """Re-read the vCPU until ``pending`` is false (delivered) or ``timeout`` passes."""
    delay = _POLL_START
    polls = 0
    reason = ""
    while True:
        with target.attach(tgt.vm, vcpu_id, requests) as (vc, rt):
            polls += 1
            still = pending(vc)
            now = time.monotonic()
            if not still:
                return Delivery(True, now - t0, polls)
            if now - t0 >= timeout:
                reason = explain(vc, rt)
                return Delivery(False, None, polls, reason)
        time.sleep(delay)
        delay = min(delay * 2, _POLL_MAX)


def _finish(inj: Injection, wait: Optional[float]) -> Injection:
    if wait is not None and inj.delivery is not None and not inj.delivery.delivered:
        raise NotDelivered(
            f"the {inj.kind} was still pending on vCPU {inj.vcpu_id} after {wait:g} s:"
            f" {inj.delivery.reason}",
            hint="the fault stays pending; the guest takes it when it can",
        )
    return inj


# ---------------------------------------------------------------------- arm64
@guarded(
    "inject-serror",
    lambda req, wait=None, **kw: {
        "esr": req.esr,
        "force": req.force,
        "wait": wait,
        "dry_run": kw.get("dry_run", False),
    },
)
def inject_serror(
    tgt: target.Target,
    req: SErrorRequest,
    wait: Optional[float] = None,
    *,
    dry_run: bool = False,
) -> List[Injection]:
    """Make an SError pending on each selected vCPU.

    ``dry_run`` runs every check and reads the vCPU, but sends no SET.
    """
    require_arch(tgt.vm.arch, "serror")
    caps = host.probe()
    validate_serror(req, caps)
    vm = target.ensure_mapped(tgt.vm, tgt.vcpu_ids)
    tgt = replace(tgt, vm=vm)
    linux = esr.predict_linux(req.esr, host_ras=caps.serror_esr).as_dict()
    behaviour = kvmprobe.serror_behaviour()
    out: List[Injection] = guard.results()
    for vid in tgt.vcpu_ids:
        t0 = time.monotonic()
        with target.attach(vm, vid, SERROR_REQUESTS) as (vc, rt):
            before_ev = vc.get_events()
            assert isinstance(before_ev, kvm_arm64.VcpuEvents)
            pstate = vc.pstate()
            if before_ev.serror_pending and not req.force:
                raise Conflict(
                    f"vCPU {vid} already has an SError pending"
                    f" (ESR {before_ev.serror_esr:#x}); nothing was sent",
                    hint="a pending SError cannot be cancelled, and the RAS rules for"
                    " multiple SErrors apply; use --force to inject anyway",
                )
            if not dry_run:
                vc.inject_serror(req.esr)
            t_set = time.monotonic()
            after_ev = before_ev if dry_run else vc.get_events()
            assert isinstance(after_ev, kvm_arm64.VcpuEvents)
            after_pstate = pstate if dry_run else vc.pstate()
            taken: Optional[Dict[str, object]] = None
            if not dry_run and not after_ev.serror_pending:
                # Linux 6.17+ commits an unmasked SError inside SET: see where it went
                taken = last_exception(vc.exception_state())
            state = thread_state(vm.vcpu(vid).thread, rt, vm.vcpu(vid).fds)
        after = decode_events("aarch64", after_ev, after_pstate)
        if taken is not None:
            after["last_exception"] = taken
        inj = Injection(
            kind="serror",
            vm_pid=vm.pid,
            vm_name=vm.name,
            vcpu_id=vid,
            tid=rt.tid,
            thread_state=state,
            request={"esr": req.esr, "has_esr": req.esr is not None, "force": req.force},
            before=decode_events("aarch64", before_ev, pstate),
            after=after,
            prediction={**linux, **serror_timing(behaviour, pstate)},
            registers_restored=bool(rt.verified),
            kill_safe=rt.kill_safe,
            kill_safe_reason=rt.kill_safe_reason,
            timings_us=_timings(rt),
            dry_run=dry_run,
        )
        if taken is not None and taken["at_serror_vector"]:
            # in the guest's registers already: delivered, with or without --wait
            inj = replace(inj, delivery=Delivery(True, t_set - t0, 0, _taken_reason(state)))
        elif wait is not None and not dry_run:
            if not after_ev.serror_pending:
                delivery = Delivery(True, t_set - t0, 0, "taken at injection time")
            else:
                delivery = _poll(
                    tgt, vid, SERROR_REQUESTS, _serror_pending, _explain_serror, wait, t0
                )
            inj = replace(inj, delivery=delivery)
        out.append(_finish(inj, wait))
    return out


def serror_timing(behaviour: kvmprobe.SErrorBehaviour, pstate: int) -> Dict[str, object]:
    """When the vCPU takes an SError SET now, from its PSTATE.A and the probed kernel.

    ``timing``: ``at-injection`` (this kernel commits an unmasked SError inside
    KVM_SET_VCPU_EVENTS), ``when-unmasked`` (the guest masks SErrors: it stays
    pending with its ESR until the guest clears PSTATE.A), ``when-run`` (it stays
    pending until the vCPU next runs the guest), or ``unknown`` (the probe failed).
    """
    commits = behaviour.commits_at_set
    if pstate & kvm_arm64.PSTATE_A:
        timing = "when-unmasked"
        why = (
            "the guest masks SErrors (PSTATE.A=1): it stays pending with its ESR"
            " (VSESR_EL2) until the guest unmasks them"
        )
    elif commits:
        timing = "at-injection"
        why = (
            "the guest has SErrors unmasked and this host's KVM puts an unmasked SError"
            " into the vCPU's registers inside KVM_SET_VCPU_EVENTS (Linux 6.17 and later)"
        )
    elif commits is False:
        timing = "when-run"
        why = (
            "the guest has SErrors unmasked; this host's KVM keeps the SError pending"
            " until the vCPU next runs the guest (Linux 6.16 and earlier)"
        )
    else:
        timing = "unknown"
        why = f"KVM's behaviour could not be probed: {behaviour.observed}"
    return {"timing": timing, "timing_reason": why, "kvm_commits_at_set": commits}


def _taken_reason(state: str) -> str:
    where = "KVM put it into the guest's registers (PC at the SError vector)"
    if state in ("userspace", "stopped"):
        return (
            f"taken at injection: {where}; the vCPU is not running the guest now (VM paused"
            " or the VMM busy), so the guest handles it when the VM resumes"
        )
    return f"taken at injection: {where}; the guest runs its handler as the vCPU continues"


def _serror_pending(vc: Vcpu) -> bool:
    ev = vc.get_events()
    assert isinstance(ev, kvm_arm64.VcpuEvents)
    return bool(ev.serror_pending)


def _explain_serror(vc: Vcpu, rt: RemoteThread) -> str:
    pstate = vc.pstate()
    if pstate & kvm_arm64.PSTATE_A:
        return "the guest masks SErrors (PSTATE.A=1); it takes the SError when it unmasks"
    return _explain_common(vc, rt)


def _explain_common(vc: Vcpu, rt: RemoteThread) -> str:
    """Why the vCPU has not taken a fault, from where its thread was at the last poll.

    The same facts as ``status`` shows (:func:`~serrinj.ops.status.thread_state`),
    on both architectures: a group stop (the VMM is stopped), a thread outside
    KVM_RUN (x86_64: its registers name no KVM_RUN; arm64: x8/x1 are not
    ``ioctl``/KVM_RUN), or a thread inside KVM_RUN whose guest did not run
    into the fault (halted, or not scheduled).
    """
    where = thread_state(None, rt, (vc.fd,))
    if where == "stopped":
        assert rt.first_stop is not None
        name = signal.Signals(rt.first_stop.signo).name
        return f"the VMM process is stopped ({name}); continue it with SIGCONT"
    if where == "userspace":
        return "the vCPU thread is not running the guest (VM paused or the VMM is busy)"
    return "the vCPU has not entered the guest since (halted, or not scheduled)"


@guarded(
    "inject-ext-dabt",
    lambda req, wait=None, **kw: {
        "mmio_addr": req.mmio_addr,
        "mmio_timeout": req.mmio_timeout,
        "wait": wait,
        "dry_run": kw.get("dry_run", False),
    },
)
def inject_ext_dabt(
    tgt: target.Target,
    req: ExtDabtRequest,
    wait: Optional[float] = None,
    *,
    dry_run: bool = False,
) -> List[Injection]:
    """Inject an external data abort right after the vCPU's next MMIO exit.

    KVM uses the fault address of the last exit, so the abort is only
    meaningful directly after a KVM_EXIT_MMIO (api.rst calls anything else a
    programming error). serrinj therefore lets the vCPU thread run under
    syscall tracing until its KVM_RUN returns with an MMIO exit, and injects
    there, before the VMM completes the access.

    ``dry_run`` stops after the checks: the thread is not traced at all.
    ``wait`` is refused (:func:`validate_ext_dabt`): the abort cannot be read back.
    """
    validate_ext_dabt(req, wait)
    require_arch(tgt.vm.arch, "ext-dabt")
    caps = host.probe()
    if not caps.ext_dabt:
        raise Unsupported(
            "this host cannot inject external data aborts: KVM_CAP_ARM_INJECT_EXT_DABT is 0"
        )
    if len(tgt.vcpu_ids) != 1:
        raise InvalidInput("--ext-dabt acts on one vCPU; choose it with --vcpu")
    vm = target.ensure_mapped(tgt.vm, tgt.vcpu_ids)
    vid = tgt.vcpu_ids[0]
    v = vm.vcpu(vid)
    run_addr = _kvm_run_address(vm.pid, vid)
    if dry_run:
        assert v.thread is not None
        return [
            Injection(
                kind="ext-dabt",
                vm_pid=vm.pid,
                vm_name=vm.name,
                vcpu_id=vid,
                tid=v.thread.tid,
                thread_state="not-attached",
                request={"mmio_addr": req.mmio_addr, "mmio_timeout": req.mmio_timeout},
                before={},
                after={},
                dry_run=True,
            )
        ]
    with target.attach(vm, vid, (api.KVM_SET_VCPU_EVENTS,)) as (vc, rt):
        seen: Dict[str, object] = {}

        def is_mmio(fd: int) -> bool:
            if fd not in v.fds:
                return False
            run = rt.read_memory(run_addr, 64)
            if api.exit_reason_of(run) != api.KVM_EXIT_MMIO:
                return False
            mmio = api.ExitMmio.unpack_from(run)
            if req.mmio_addr is not None and mmio.phys_addr != req.mmio_addr:
                return False
            seen.update(phys_addr=mmio.phys_addr, is_write=mmio.is_write, len=mmio.length)
            return True

        fd = rt.step_to_kvm_run_exit(is_mmio, req.mmio_timeout)
        if fd is None:
            raise NotDelivered(
                f"vCPU {vid} made no MMIO exit within {req.mmio_timeout:g} s; nothing was sent",
                hint="an external data abort needs a guest access to an emulated (MMIO)"
                " address right before it; KVM uses that access's fault address",
            )
        vc.inject_ext_dabt()
    return [
        Injection(
            kind="ext-dabt",
            vm_pid=vm.pid,
            vm_name=vm.name,
            vcpu_id=vid,
            tid=rt.tid,
            thread_state="mmio-exit",
            request={"mmio_addr": req.mmio_addr, "mmio_timeout": req.mmio_timeout},
            before={"mmio_exit": seen},
            after={},
            registers_restored=bool(rt.verified),
            kill_safe=rt.kill_safe,
            kill_safe_reason=rt.kill_safe_reason,
            timings_us=_timings(rt),
        )
    ]


def _kvm_run_address(pid: int, vcpu_id: int) -> int:
    from serrinj.host import procfs

    for m in procfs.maps(pid):
        if m.path == f"anon_inode:kvm-vcpu:{vcpu_id}" and m.offset == 0:
            return m.start
    raise Unsupported(f"the VMM has not mapped vCPU {vcpu_id}'s kvm_run page")


# ---------------------------------------------------------------------- x86_64
@guarded("inject-nmi", lambda wait=None, **kw: {"wait": wait, "dry_run": kw.get("dry_run", False)})
def inject_nmi(
    tgt: target.Target, wait: Optional[float] = None, *, dry_run: bool = False
) -> List[Injection]:
    """Queue an NMI on each selected vCPU (``dry_run``: read the vCPU, send nothing)."""
    require_arch(tgt.vm.arch, "nmi")
    vm = target.ensure_mapped(tgt.vm, tgt.vcpu_ids)
    tgt = replace(tgt, vm=vm)
    out: List[Injection] = guard.results()
    for vid in tgt.vcpu_ids:
        t0 = time.monotonic()
        with target.attach(vm, vid, NMI_REQUESTS) as (vc, rt):
            before = vc.get_events()
            if not dry_run:
                vc.inject_nmi()
            after = before if dry_run else vc.get_events()
            state = thread_state(vm.vcpu(vid).thread, rt, vm.vcpu(vid).fds)
        inj = Injection(
            kind="nmi",
            vm_pid=vm.pid,
            vm_name=vm.name,
            vcpu_id=vid,
            tid=rt.tid,
            thread_state=state,
            request={},
            before=before.as_dict(),
            after=after.as_dict(),
            registers_restored=bool(rt.verified),
            kill_safe=rt.kill_safe,
            kill_safe_reason=rt.kill_safe_reason,
            timings_us=_timings(rt),
            dry_run=dry_run,
        )
        if wait is not None and not dry_run:
            inj = replace(
                inj,
                delivery=_poll(tgt, vid, NMI_REQUESTS, _nmi_pending, _explain_nmi, wait, t0),
            )
        out.append(_finish(inj, wait))
    return out


def _nmi_pending(vc: Vcpu) -> bool:
    ev = vc.get_events()
    assert isinstance(ev, kvm_x86.VcpuEvents)
    return bool(ev.nmi.pending or ev.nmi.injected)


def _explain_nmi(vc: Vcpu, rt: RemoteThread) -> str:
    ev = vc.get_events()
    assert isinstance(ev, kvm_x86.VcpuEvents)
    if ev.nmi.masked:
        return "NMIs are blocked (the guest is inside an NMI handler and has not returned)"
    return _explain_common(vc, rt)


def _mce_state(vc: Vcpu, bank: int) -> Tuple[mce.GuestMceState, int]:
    msrs = vc.get_msrs(
        (
            kvm_x86.MSR_IA32_MCG_CAP,
            kvm_x86.MSR_IA32_MCG_STATUS,
            kvm_x86.MSR_IA32_MCG_CTL,
            kvm_x86.mci_msr(bank, "ctl"),
            kvm_x86.mci_msr(bank, "status"),
        )
    )
    cap = msrs.get(kvm_x86.MSR_IA32_MCG_CAP, 0)
    cr4 = kvm_x86.sregs_get_control(vc.get_sregs(), "cr4")
    ones = (1 << 64) - 1
    state = mce.GuestMceState(
        cr4_mce=bool(cr4 & kvm_x86.CR4_MCE),
        mcip=bool(msrs.get(kvm_x86.MSR_IA32_MCG_STATUS, 0) & kvm_x86.MCG_STATUS_MCIP),
        mcg_ctl_all_ones=msrs.get(kvm_x86.MSR_IA32_MCG_CTL) == ones
        if cap & kvm_x86.MCG_CTL_P
        else None,
        mci_ctl_all_ones=msrs.get(kvm_x86.mci_msr(bank, "ctl")) == ones,
        bank_status=msrs.get(kvm_x86.mci_msr(bank, "status")),
        mcg_cap=cap,
    )
    return state, cap & kvm_x86.MCG_CAP_COUNT_MASK


@guarded(
    "inject-mce",
    lambda req, wait=None, **kw: {
        "bank": req.mce.bank,
        "status": req.mce.status,
        "addr": req.mce.addr,
        "misc": req.mce.misc,
        "mcg_status": req.mce.mcg_status,
        "force": req.force,
        "wait": wait,
        "dry_run": kw.get("dry_run", False),
    },
)
def inject_mce(
    tgt: target.Target,
    req: MceRequest,
    wait: Optional[float] = None,
    *,
    dry_run: bool = False,
) -> List[Injection]:
    """Raise a machine check on each selected vCPU (``dry_run``: predict, send nothing)."""
    require_arch(tgt.vm.arch, "mce")
    caps = host.probe()
    if not caps.cap(api.KVM_CAP_MCE):
        raise Unsupported("this host's KVM has no machine-check support (KVM_CAP_MCE is 0)")
    mce.validate(req.mce, kvm_x86.KVM_MAX_MCE_BANKS)
    vm = target.ensure_mapped(tgt.vm, tgt.vcpu_ids)
    tgt = replace(tgt, vm=vm)
    out: List[Injection] = guard.results()
    for vid in tgt.vcpu_ids:
        t0 = time.monotonic()
        with target.attach(vm, vid, MCE_REQUESTS) as (vc, rt):
            state, banks = _mce_state(vc, req.mce.bank)
            effect = mce.predict(req.mce, bank_count=banks, state=state)
            if effect.outcome in ("triple-fault", "dropped") and not req.force:
                raise Conflict(
                    f"vCPU {vid}: this machine check would be {effect.outcome}:"
                    f" {effect.reason}; nothing was sent",
                    hint="use --force to inject it anyway",
                )
            before = vc.get_events()
            if not dry_run:
                vc.inject_mce(req.mce)
            after = before if dry_run else vc.get_events()
            thread = thread_state(vm.vcpu(vid).thread, rt, vm.vcpu(vid).fds)
        inj = Injection(
            kind="mce",
            vm_pid=vm.pid,
            vm_name=vm.name,
            vcpu_id=vid,
            tid=rt.tid,
            thread_state=thread,
            request={
                "bank": req.mce.bank,
                "status": req.mce.status,
                "addr": req.mce.addr,
                "misc": req.mce.misc,
                "mcg_status": req.mce.mcg_status,
                "status_decoded": mce.decode_status(req.mce.status).as_dict(),
            },
            before=before.as_dict(),
            after=after.as_dict(),
            prediction=effect.as_dict(),
            registers_restored=bool(rt.verified),
            kill_safe=rt.kill_safe,
            kill_safe_reason=rt.kill_safe_reason,
            timings_us=_timings(rt),
            dry_run=dry_run,
        )
        if wait is not None and not dry_run:
            if effect.raises_mc:
                delivery = _poll(tgt, vid, MCE_REQUESTS, _mc_pending, _explain_common, wait, t0)
            else:
                delivery = Delivery(
                    True, None, 0, "logged in the bank; it raises no exception (the guest polls)"
                )
            inj = replace(inj, delivery=delivery)
        out.append(_finish(inj, wait))
    return out


def _mc_pending(vc: Vcpu) -> bool:
    ev = vc.get_events()
    assert isinstance(ev, kvm_x86.VcpuEvents)
    exc = ev.exception
    return bool((exc.pending or exc.injected) and exc.nr == kvm_x86.MC_VECTOR)
