"""x86_64 NMI: queued with KVM_NMI (which adds to KVM's queue; it cannot drop a pending one)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Tuple

from serrinj.faults.fields import Fields
from serrinj.faults.loop import Reading, VcpuFault
from serrinj.kvm import api
from serrinj.kvm import x86_64 as kvm_x86
from serrinj.kvm.arch import Arch
from serrinj.remote.session import RemoteThread
from serrinj.vcpu.x86_64 import X86Vcpu


@dataclass(frozen=True)
class Nmi(VcpuFault[X86Vcpu]):
    """An NMI has no fields."""

    kind: ClassVar[str] = "nmi"
    arch: ClassVar[Arch] = Arch.X86_64
    requests: ClassVar[Tuple[int, ...]] = (api.KVM_GET_VCPU_EVENTS, kvm_x86.KVM_NMI)
    fields: ClassVar[Tuple[str, ...]] = ()
    title: ClassVar[str] = "an NMI"
    # the NMI is sent whatever the vCPU holds: the readings only feed the report
    admit_reads: ClassVar[bool] = False
    outcome_reads: ClassVar[bool] = False

    @classmethod
    def from_fields(cls, data: Mapping[str, Any]) -> Nmi:
        Fields(cls.kind, data).done()
        return cls()

    def read(self, vc: X86Vcpu) -> Reading:
        ev = vc.get_events()
        return Reading(ev, ev.as_dict)

    def send(self, vc: X86Vcpu) -> None:
        vc.inject_nmi()

    def pending(self, vc: X86Vcpu) -> bool:
        ev = vc.get_events()
        return bool(ev.nmi.pending or ev.nmi.injected)

    def explain(self, vc: X86Vcpu, rt: RemoteThread) -> str:
        if vc.get_events().nmi.masked:
            return "NMIs are blocked (the guest is inside an NMI handler and has not returned)"
        return super().explain(vc, rt)
