"""An arm64 vCPU: its events, its core and EL1 registers (KVM_GET_ONE_REG), and the
SError and external data abort KVM_SET_VCPU_EVENTS can inject."""

from __future__ import annotations

import struct
from typing import Dict, Optional

from serrinj.errors import InvalidInput
from serrinj.kvm import api
from serrinj.kvm import arm64 as kvm_arm64
from serrinj.vcpu.base import Events, Vcpu


class Arm64Vcpu(Vcpu):
    """An arm64 vCPU."""

    def get_events(self) -> kvm_arm64.VcpuEvents:
        return kvm_arm64.VcpuEvents.unpack(self._get_events_raw())

    def set_events(self, events: Events) -> None:
        if (
            isinstance(events, kvm_arm64.VcpuEvents)
            and events.ext_dabt_pending
            and events.serror_pending
        ):
            # Since Linux 6.17 SET injects the abort before it validates the SError
            # fields: a refused ESR would return EINVAL with the abort delivered anyway.
            raise InvalidInput(
                f"vCPU {self.vcpu_id}: an external data abort and an SError are never sent"
                " in one KVM_SET_VCPU_EVENTS call; nothing was sent",
                hint="inject them one after the other",
            )
        super().set_events(events)

    def get_one_reg(self, reg_id: int) -> int:
        """A 64-bit register through KVM_GET_ONE_REG (the value lands right after the struct)."""

        def build(addr: int) -> bytes:
            return api.one_reg(reg_id, addr + api.SIZEOF_KVM_ONE_REG) + bytes(8)

        raw = self._buf(api.KVM_GET_ONE_REG, build)
        return int(struct.unpack_from("<Q", raw, api.SIZEOF_KVM_ONE_REG)[0])

    def set_one_reg(self, reg_id: int, value: int) -> None:
        """Write a 64-bit register (KVM_SET_ONE_REG); serrinj does this only to the
        throwaway vCPU of its own probe (:mod:`serrinj.vcpu.probe`), never to a VM's."""

        def build(addr: int) -> bytes:
            return api.one_reg(reg_id, addr + api.SIZEOF_KVM_ONE_REG) + struct.pack("<Q", value)

        self._buf(api.KVM_SET_ONE_REG, build)

    def pstate(self) -> int:
        return self.get_one_reg(kvm_arm64.REG_PSTATE)

    def exception_state(self) -> Dict[str, int]:
        """The EL1 registers that tell which exception the guest took last and where it
        is: ESR_EL1, ELR_EL1, SPSR_EL1, FAR_EL1, VBAR_EL1, PC and PSTATE."""
        regs = (
            ("esr_el1", kvm_arm64.REG_ESR_EL1),
            ("elr_el1", kvm_arm64.REG_ELR_EL1),
            ("spsr_el1", kvm_arm64.REG_SPSR_EL1),
            ("far_el1", kvm_arm64.REG_FAR_EL1),
            ("vbar_el1", kvm_arm64.REG_VBAR_EL1),
            ("pc", kvm_arm64.REG_PC),
            ("pstate", kvm_arm64.REG_PSTATE),
        )
        return {name: self.get_one_reg(reg) for name, reg in regs}

    def inject_serror(self, esr: Optional[int]) -> None:
        """Make a virtual SError pending, with ``esr`` (ISS) or a syndrome KVM chooses."""
        self.set_events(kvm_arm64.VcpuEvents.serror(esr))

    def inject_ext_dabt(self) -> None:
        self.set_events(kvm_arm64.VcpuEvents.ext_dabt())
