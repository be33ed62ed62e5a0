"""arm64 SError: a virtual SError made pending with KVM_SET_VCPU_EVENTS.

The syndrome is the ISS (bits [24:0] of the guest's ESR_EL1), given as a number or a
severity name (``esr``), or built from a RAS severity (``severity``); with neither,
KVM and the CPU choose it (IDS=1), which works on hosts without RAS too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Mapping, Optional, Tuple

from serrinj.codec import esr
from serrinj.codec.events import decode_events, last_exception
from serrinj.errors import Conflict, InvalidInput, Unsupported
from serrinj.faults.base import Delivery
from serrinj.faults.fields import Fields, show, type_name
from serrinj.faults.loop import Reading, VcpuFault
from serrinj.host.kvmcaps import HostCaps
from serrinj.kvm import api
from serrinj.kvm import arm64 as kvm_arm64
from serrinj.kvm.arch import Arch
from serrinj.remote.session import RemoteThread
from serrinj.vcpu import probe
from serrinj.vcpu.arm64 import Arm64Vcpu


@dataclass(frozen=True)
class SError(VcpuFault[Arm64Vcpu]):
    """``esr=None``: let KVM/the CPU choose the syndrome; ``force``: inject even when one
    is pending already."""

    kind: ClassVar[str] = "serror"
    arch: ClassVar[Arch] = Arch.AARCH64
    requests: ClassVar[Tuple[int, ...]] = (
        api.KVM_GET_VCPU_EVENTS,
        api.KVM_SET_VCPU_EVENTS,
        api.KVM_GET_ONE_REG,
    )
    fields: ClassVar[Tuple[str, ...]] = ("esr", "severity", "force")
    title: ClassVar[str] = "an SError"

    esr: Optional[int] = None
    force: bool = False

    @classmethod
    def from_fields(cls, data: Mapping[str, Any]) -> SError:
        f = Fields(cls.kind, data)
        value: Optional[int] = None
        if f.given("esr") and f.given("severity"):
            f.fail("severity", "give either {esr} or {severity}, not both")
        elif f.given("severity"):
            severity = f.choice("severity", tuple(esr.SEVERITIES))
            value = None if severity is None else esr.PRESETS[severity]
        elif f.given("esr"):
            value = _syndrome(f, data["esr"])
        force = f.boolean("force")
        f.done()
        return cls(value, force)

    def validate(self, wait: Optional[float] = None) -> None:
        if self.esr is not None:
            esr.validate_injectable(self.esr)

    def check(self, caps: HostCaps) -> None:
        if self.esr is not None and not caps.serror_esr:
            raise Unsupported(
                "this host cannot inject an SError with a given ESR:"
                " KVM_CAP_ARM_INJECT_SERROR_ESR is 0 (the CPU has no RAS extension)",
                hint="leave out --esr/--severity and KVM injects an SError with an"
                " implementation-defined syndrome",
            )

    def audit(self) -> Dict[str, object]:
        return {"esr": self.esr, "force": self.force}

    def request(self) -> Dict[str, object]:
        return {"esr": self.esr, "has_esr": self.esr is not None, "force": self.force}

    def severity(self) -> str:
        return "survivable" if esr.predict_linux(self.esr).survives else "fatal"

    def label(self) -> str:
        return "KVM's syndrome" if self.esr is None else f"esr {self.esr:#x}"

    # ---- the loop's steps
    def plan(self, caps: HostCaps) -> Tuple[Dict[str, object], probe.SErrorBehaviour]:
        linux = esr.predict_linux(self.esr, host_ras=caps.serror_esr).as_dict()
        return linux, probe.serror_behaviour()

    def read(self, vc: Arm64Vcpu) -> Reading:
        ev = vc.get_events()
        pstate = vc.pstate()
        return Reading((ev, pstate), lambda: decode_events(Arch.AARCH64, ev, pstate))

    def admit(self, vcpu_id: int, vc: Arm64Vcpu, before: Reading, plan: Any) -> Dict[str, object]:
        ev, pstate = before.raw
        linux, behaviour = plan
        if ev.serror_pending and not self.force:
            raise Conflict(
                f"vCPU {vcpu_id} already has an SError pending"
                f" (ESR {ev.serror_esr:#x}); nothing was sent",
                hint="a pending SError cannot be cancelled, and the RAS rules for"
                " multiple SErrors apply; use --force to inject anyway",
            )
        return {**linux, **serror_timing(behaviour, pstate)}

    def send(self, vc: Arm64Vcpu) -> None:
        vc.inject_serror(self.esr)

    def landed(self, vc: Arm64Vcpu, after: Reading) -> Optional[Dict[str, object]]:
        if after.raw[0].serror_pending:
            return None
        # Linux 6.17+ commits an unmasked SError inside SET: see where it went
        return last_exception(vc.exception_state())

    def taken_at_once(self, taken: Optional[Dict[str, object]], state: str) -> Optional[str]:
        if taken is None or not taken["at_serror_vector"]:
            return None
        # in the guest's registers already: delivered, with or without --wait
        where = "KVM put it into the guest's registers (PC at the SError vector)"
        if state in ("userspace", "stopped"):
            return (
                f"taken at injection: {where}; the vCPU is not running the guest now (VM paused"
                " or the VMM busy), so the guest handles it when the VM resumes"
            )
        return f"taken at injection: {where}; the guest runs its handler as the vCPU continues"

    def settled(
        self, after: Reading, prediction: Dict[str, object], sent_after: float
    ) -> Optional[Delivery]:
        if after.raw[0].serror_pending:
            return None
        return Delivery(True, sent_after, 0, "taken at injection time")

    def pending(self, vc: Arm64Vcpu) -> bool:
        return bool(vc.get_events().serror_pending)

    def explain(self, vc: Arm64Vcpu, rt: RemoteThread) -> str:
        if vc.pstate() & kvm_arm64.PSTATE_A:
            return "the guest masks SErrors (PSTATE.A=1); it takes the SError when it unmasks"
        return super().explain(vc, rt)


def _syndrome(f: Fields, value: object) -> Optional[int]:
    try:
        if type(value) is int:
            return esr.validate_injectable(value)
        if type(value) is str:
            return esr.resolve_iss(value)
    except InvalidInput as err:
        f.fail("esr", err.message, err.hint)
        return None
    f.fail("esr", f"must be a number or a severity name, not {type_name(value)} ({show(value)})")
    return None


def serror_timing(behaviour: probe.SErrorBehaviour, pstate: int) -> Dict[str, object]:
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
