"""arm64 KVM uAPI (arch/arm64/include/uapi/asm/kvm.h): vCPU events, core registers.

``struct kvm_vcpu_events`` (arm64, 64 bytes)::

    0   u8  serror_pending
    1   u8  serror_has_esr
    2   u8  ext_dabt_pending
    3   u8  pad[5]          must be 0
    8   u64 serror_esr
    16  u32 reserved[12]    must be 0

KVM_SET_VCPU_EVENTS accepts only ISS bits [24:0] in ``serror_esr``; the
hardware supplies EC and IL (BRIEF section 2).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

from serrinj.kvm.api import KVMIO
from serrinj.kvm.ioctl import _IOR, _IOW

SIZEOF_KVM_VCPU_INIT = 32
KVM_ARM_VCPU_INIT = _IOW(KVMIO, 0xAE, SIZEOF_KVM_VCPU_INIT)
KVM_ARM_PREFERRED_TARGET = _IOR(KVMIO, 0xAF, SIZEOF_KVM_VCPU_INIT)

#: the bits of ``serror_esr`` that KVM accepts (ISS[24:0], IDS included)
SERROR_ESR_ACCEPTED_MASK = 0x1FFFFFF

# --- KVM_GET/SET_ONE_REG ids for the core registers
KVM_REG_ARM64 = 0x6000000000000000
KVM_REG_SIZE_U64 = 0x0030000000000000
KVM_REG_ARM_CORE = 0x0010 << 16

_USER_PT_REGS_X = 0  # offsetof(struct kvm_regs, regs.regs)
_USER_PT_REGS_SP = 31 * 8
_USER_PT_REGS_PC = 32 * 8
_USER_PT_REGS_PSTATE = 33 * 8


def core_reg_id(offset: int) -> int:
    """The ONE_REG id of the 64-bit core register at ``offsetof(struct kvm_regs, ...)``."""
    return KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | (offset // 4)


_KVM_REGS_ELR_EL1 = 34 * 8 + 8  # after user_pt_regs and sp_el1
_KVM_REGS_SPSR_EL1 = 34 * 8 + 16  # spsr[KVM_SPSR_EL1 = 0]

REG_PC = core_reg_id(_USER_PT_REGS_PC)
REG_ELR_EL1 = core_reg_id(_KVM_REGS_ELR_EL1)
REG_SPSR_EL1 = core_reg_id(_KVM_REGS_SPSR_EL1)
REG_PSTATE = core_reg_id(_USER_PT_REGS_PSTATE)
REG_SP = core_reg_id(_USER_PT_REGS_SP)


def reg_x(n: int) -> int:
    """The ONE_REG id of general-purpose register ``xN``."""
    if not 0 <= n <= 30:
        raise ValueError(f"x{n} is not a general-purpose register")
    return core_reg_id(_USER_PT_REGS_X + 8 * n)


# sys_regs for KVM_SET_ONE_REG: KVM_REG_ARM64_SYSREG encoding op0:op1:CRn:CRm:op2
KVM_REG_ARM64_SYSREG = 0x0013 << 16


def sysreg_id(op0: int, op1: int, crn: int, crm: int, op2: int) -> int:
    """The ONE_REG id of a system register, from its encoding."""
    return (
        KVM_REG_ARM64
        | KVM_REG_SIZE_U64
        | KVM_REG_ARM64_SYSREG
        | (op0 << 14)
        | (op1 << 11)
        | (crn << 7)
        | (crm << 3)
        | op2
    )


#: the EL1 exception registers serrinj reads to see which exception the guest last took
REG_ESR_EL1 = sysreg_id(3, 0, 5, 2, 0)
REG_FAR_EL1 = sysreg_id(3, 0, 6, 0, 0)
REG_VBAR_EL1 = sysreg_id(3, 0, 12, 0, 0)
#: offsets of the SError entries in the EL1 vector table (current EL with SP_EL0,
#: current EL with SP_ELx, lower EL AArch64, lower EL AArch32)
SERROR_VECTOR_OFFSETS = (0x180, 0x380, 0x580, 0x780)

# --- PSTATE bits
PSTATE_D = 1 << 9
PSTATE_A = 1 << 8  # SError masked
PSTATE_I = 1 << 7
PSTATE_F = 1 << 6
PSTATE_MODE_MASK = 0xF
PSTATE_MODE_NAMES: Mapping[int, str] = MappingProxyType(
    {0x0: "EL0t", 0x4: "EL1t", 0x5: "EL1h", 0x8: "EL2t", 0x9: "EL2h"}
)
#: EL1h with D, A, I and F masked: the state KVM resets a vCPU to
PSTATE_RESET_EL1H = PSTATE_D | PSTATE_A | PSTATE_I | PSTATE_F | 0x5

# KVM_ARM_VCPU_INIT feature bits
KVM_ARM_VCPU_POWER_OFF = 0
KVM_ARM_VCPU_PSCI_0_2 = 2


@dataclass(frozen=True)
class VcpuEvents:
    """arm64 ``struct kvm_vcpu_events``."""

    serror_pending: int = 0
    serror_has_esr: int = 0
    ext_dabt_pending: int = 0
    serror_esr: int = 0
    pad: bytes = bytes(5)
    reserved: bytes = bytes(48)

    _FMT = struct.Struct("<BBB5sQ48s")
    SIZE = 64

    @classmethod
    def unpack(cls, raw: bytes) -> VcpuEvents:
        if len(raw) != cls.SIZE:
            raise ValueError(f"arm64 kvm_vcpu_events is {cls.SIZE} bytes, got {len(raw)}")
        pending, has_esr, dabt, pad, esr, reserved = cls._FMT.unpack(raw)
        return cls(pending, has_esr, dabt, esr, pad, reserved)

    def pack(self) -> bytes:
        return self._FMT.pack(
            self.serror_pending,
            self.serror_has_esr,
            self.ext_dabt_pending,
            self.pad,
            self.serror_esr,
            self.reserved,
        )

    @classmethod
    def serror(cls, esr: int | None) -> VcpuEvents:
        """The SET argument that makes an SError pending, with ``esr`` or a CPU-chosen syndrome."""
        if esr is None:
            return cls(serror_pending=1)
        return cls(serror_pending=1, serror_has_esr=1, serror_esr=esr)

    @classmethod
    def ext_dabt(cls) -> VcpuEvents:
        """The SET argument that injects an external data abort (after an MMIO exit)."""
        return cls(ext_dabt_pending=1)

    def as_dict(self) -> dict[str, object]:
        return {
            "serror_pending": bool(self.serror_pending),
            "serror_has_esr": bool(self.serror_has_esr),
            "ext_dabt_pending": bool(self.ext_dabt_pending),
            "serror_esr": self.serror_esr,
        }


@dataclass(frozen=True)
class VcpuInit:
    """``struct kvm_vcpu_init {u32 target; u32 features[7]}``."""

    target: int
    features: tuple[int, ...] = (0,) * 7

    _FMT = struct.Struct("<I7I")
    SIZE = 32

    @classmethod
    def unpack(cls, raw: bytes) -> VcpuInit:
        if len(raw) != cls.SIZE:
            raise ValueError(f"kvm_vcpu_init is {cls.SIZE} bytes, got {len(raw)}")
        target, *features = cls._FMT.unpack(raw)
        return cls(target, tuple(features))

    def with_feature(self, bit: int) -> VcpuInit:
        feats = list(self.features)
        feats[bit // 32] |= 1 << (bit % 32)
        return VcpuInit(self.target, tuple(feats))

    def pack(self) -> bytes:
        return self._FMT.pack(self.target, *self.features)
