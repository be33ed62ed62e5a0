"""KVM vCPU events and arm64 exception registers, decoded for people. Pure code: no I/O."""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional, Union

from serrinj.kvm import x86_64 as kvm_x86

if TYPE_CHECKING:
    from serrinj.kvm import arm64 as kvm_arm64

#: the vCPU events of either arch (the arm64 tables and the syndrome codec are imported
#: only when arm64 events are decoded)
Events = Union["kvm_arm64.VcpuEvents", kvm_x86.VcpuEvents]


def decode_events(arch: str, events: Events, pstate: Optional[int] = None) -> Dict[str, object]:
    out = events.as_dict()
    if isinstance(events, kvm_x86.VcpuEvents):
        return out
    from serrinj.codec import esr
    from serrinj.kvm import arm64 as kvm_arm64

    if isinstance(events, kvm_arm64.VcpuEvents):
        out["serror_esr_decoded"] = (
            esr.decode(events.serror_esr, form="iss").as_dict() if events.serror_pending else None
        )
        if pstate is not None:
            out["serror_masked"] = bool(pstate & kvm_arm64.PSTATE_A)
    return out


def last_exception(regs: Dict[str, int]) -> Dict[str, object]:
    """The exception an arm64 guest took last, from its EL1 registers
    (:meth:`~serrinj.vcpu.base.Vcpu.exception_state`).

    ESR_EL1 keeps the syndrome of the last exception taken to EL1 until the next
    one, so EC 0x2F there means the last was an SError. ``at_serror_vector``: the
    PC is at an SError entry of VBAR_EL1, i.e. KVM has put the SError into the
    registers and the guest has not run its handler yet (Linux 6.17 and later do
    this inside KVM_SET_VCPU_EVENTS, even in a paused VM).
    """
    from serrinj.codec import esr
    from serrinj.kvm import arm64 as kvm_arm64

    esr_el1 = regs["esr_el1"]
    ec = (esr_el1 >> esr.ESR_EC_SHIFT) & 0x3F
    offset = regs["pc"] - regs["vbar_el1"]
    serror = ec == esr.EC_SERROR
    return {
        "esr_el1": esr_el1,
        "ec": ec,
        "ec_name": esr.ec_name(ec),
        "serror": serror,
        "syndrome": esr.decode(esr_el1, form="esr").as_dict() if serror else None,
        "elr_el1": regs["elr_el1"],
        "spsr_el1": regs["spsr_el1"],
        "far_el1": regs["far_el1"],
        "vbar_el1": regs["vbar_el1"],
        "pc": regs["pc"],
        "at_serror_vector": serror and offset in kvm_arm64.SERROR_VECTOR_OFFSETS,
    }
