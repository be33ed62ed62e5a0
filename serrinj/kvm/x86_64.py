"""x86_64 KVM uAPI (arch/x86/include/uapi/asm/kvm.h): vCPU events, MCE, registers.

``struct kvm_vcpu_events`` (x86, 64 bytes)::

    0   exception {u8 injected, nr, has_error_code, pending; u32 error_code}
    8   interrupt {u8 injected, nr, soft, shadow}
    12  nmi       {u8 injected, pending, masked, pad}
    16  u32 sipi_vector
    20  u32 flags
    24  smi       {u8 smm, pending, smm_inside_nmi, latched_init}
    28  triple_fault {u8 pending}
    29  u8  reserved[26]
    55  u8  exception_has_payload
    56  u64 exception_payload

KVM_SET_VCPU_EVENTS writes the exception and interrupt groups
unconditionally, so a SET must always be a read-modify-write of a GET.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, NamedTuple, Tuple

from serrinj._lazy import module_getattr
from serrinj.kvm.api import KVMIO, SIZEOF_KVM_VCPU_EVENTS
from serrinj.kvm.ioctl import _IO, _IOR, _IOW, _IOWR

if TYPE_CHECKING:
    from serrinj.kvm.vmm_structs import CpuidEntry as CpuidEntry
    from serrinj.kvm.vmm_structs import Segment as Segment


#: ``Segment`` and ``CpuidEntry``, only the test VM's (:mod:`serrinj.kvm.vmm_structs`)
__getattr__ = module_getattr(
    __name__, globals(), {n: ("serrinj.kvm.vmm_structs", n) for n in ("Segment", "CpuidEntry")}
)

SIZEOF_KVM_REGS = 144
SIZEOF_KVM_SREGS = 312
SIZEOF_KVM_X86_MCE = 64

KVM_GET_REGS = _IOR(KVMIO, 0x81, SIZEOF_KVM_REGS)
KVM_SET_REGS = _IOW(KVMIO, 0x82, SIZEOF_KVM_REGS)
KVM_GET_SREGS = _IOR(KVMIO, 0x83, SIZEOF_KVM_SREGS)
KVM_SET_SREGS = _IOW(KVMIO, 0x84, SIZEOF_KVM_SREGS)
KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(KVMIO, 0x48, 8)
KVM_NMI = _IO(KVMIO, 0x9A)
#: the vCPU's guest TSC frequency in kHz (a vCPU ioctl; KVM_CAP_GET_TSC_KHZ)
KVM_GET_TSC_KHZ = _IO(KVMIO, 0xA3)
#: ``struct kvm_msrs {u32 nmsrs; u32 pad;}`` followed by ``struct kvm_msr_entry`` items
SIZEOF_KVM_MSRS = 8
KVM_GET_MSRS = _IOWR(KVMIO, 0x88, SIZEOF_KVM_MSRS)
KVM_X86_SETUP_MCE = _IOW(KVMIO, 0x9C, 8)
#: ``struct kvm_cpuid2 {u32 nent; u32 padding;}`` followed by ``nent`` 40-byte entries
SIZEOF_KVM_CPUID2 = 8
SIZEOF_KVM_CPUID_ENTRY2 = 40
KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, SIZEOF_KVM_CPUID2)
KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, SIZEOF_KVM_CPUID2)
KVM_X86_GET_MCE_CAP_SUPPORTED = _IOR(KVMIO, 0x9D, 8)
KVM_X86_SET_MCE = _IOW(KVMIO, 0x9E, SIZEOF_KVM_X86_MCE)

# kvm_vcpu_events.flags
KVM_VCPUEVENT_VALID_NMI_PENDING = 0x00000001
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x00000002
KVM_VCPUEVENT_VALID_SHADOW = 0x00000004
KVM_VCPUEVENT_VALID_SMM = 0x00000008
KVM_VCPUEVENT_VALID_PAYLOAD = 0x00000010
KVM_VCPUEVENT_VALID_TRIPLE_FAULT = 0x00000020

# Machine-check architecture
MCG_CAP_COUNT_MASK = 0xFF
MCG_CTL_P = 1 << 8
MCG_SER_P = 1 << 24
MCG_STATUS_RIPV = 1 << 0
MCG_STATUS_EIPV = 1 << 1
MCG_STATUS_MCIP = 1 << 2
MCI_STATUS_VAL = 1 << 63
MCI_STATUS_OVER = 1 << 62
MCI_STATUS_UC = 1 << 61
MCI_STATUS_EN = 1 << 60
MCI_STATUS_MISCV = 1 << 59
MCI_STATUS_ADDRV = 1 << 58
MCI_STATUS_PCC = 1 << 57
MCI_STATUS_S = 1 << 56
MCI_STATUS_AR = 1 << 55
MSR_IA32_MCG_CAP = 0x179
MSR_IA32_MCG_STATUS = 0x17A
MSR_IA32_MCG_CTL = 0x17B
MSR_IA32_MC0_CTL = 0x400

#: the maximum number of banks KVM_X86_SETUP_MCE accepts (KVM_MAX_MCE_BANKS)
KVM_MAX_MCE_BANKS = 32

NMI_VECTOR = 2
MC_VECTOR = 18


def mci_msr(bank: int, reg: str) -> int:
    """The MSR number of MCi_CTL/STATUS/ADDR/MISC for ``bank``."""
    index = ("ctl", "status", "addr", "misc").index(reg)
    return MSR_IA32_MC0_CTL + 4 * bank + index


class Exception_(NamedTuple):
    """``struct kvm_vcpu_events.exception``."""

    injected: int = 0
    nr: int = 0
    has_error_code: int = 0
    pending: int = 0
    error_code: int = 0


class Interrupt(NamedTuple):
    """``struct kvm_vcpu_events.interrupt``."""

    injected: int = 0
    nr: int = 0
    soft: int = 0
    shadow: int = 0


class Nmi(NamedTuple):
    """``struct kvm_vcpu_events.nmi``."""

    injected: int = 0
    pending: int = 0
    masked: int = 0
    pad: int = 0


class Smi(NamedTuple):
    """``struct kvm_vcpu_events.smi``."""

    smm: int = 0
    pending: int = 0
    smm_inside_nmi: int = 0
    latched_init: int = 0


_EVENTS_FMT = struct.Struct("<4BI4B4BII4BB26sBQ")


class VcpuEvents(NamedTuple):
    """x86 ``struct kvm_vcpu_events``; ``pack(unpack(raw)) == raw`` for every input.

    This struct and its parts are named tuples, not dataclasses: they are read on
    every command's start-up path, where a dataclass costs several times more to define.
    """

    exception: Exception_ = Exception_()
    interrupt: Interrupt = Interrupt()
    nmi: Nmi = Nmi()
    sipi_vector: int = 0
    flags: int = 0
    smi: Smi = Smi()
    triple_fault_pending: int = 0
    reserved: bytes = bytes(26)
    exception_has_payload: int = 0
    exception_payload: int = 0

    @classmethod
    def unpack(cls, raw: bytes) -> VcpuEvents:
        if len(raw) != SIZEOF_KVM_VCPU_EVENTS:
            raise ValueError(
                f"x86 kvm_vcpu_events is {SIZEOF_KVM_VCPU_EVENTS} bytes, got {len(raw)}"
            )
        v = _EVENTS_FMT.unpack(raw)
        return cls(
            exception=Exception_(*v[0:5]),
            interrupt=Interrupt(*v[5:9]),
            nmi=Nmi(*v[9:13]),
            sipi_vector=v[13],
            flags=v[14],
            smi=Smi(*v[15:19]),
            triple_fault_pending=v[19],
            reserved=v[20],
            exception_has_payload=v[21],
            exception_payload=v[22],
        )

    def pack(self) -> bytes:
        e, i, n, s = self.exception, self.interrupt, self.nmi, self.smi
        return _EVENTS_FMT.pack(
            e.injected,
            e.nr,
            e.has_error_code,
            e.pending,
            e.error_code,
            i.injected,
            i.nr,
            i.soft,
            i.shadow,
            n.injected,
            n.pending,
            n.masked,
            n.pad,
            self.sipi_vector,
            self.flags,
            s.smm,
            s.pending,
            s.smm_inside_nmi,
            s.latched_init,
            self.triple_fault_pending,
            self.reserved,
            self.exception_has_payload,
            self.exception_payload,
        )

    def with_nmi_pending(self) -> VcpuEvents:
        """This state plus a pending NMI (flags gain VALID_NMI_PENDING)."""
        return self._replace(
            nmi=self.nmi._replace(pending=1),
            flags=self.flags | KVM_VCPUEVENT_VALID_NMI_PENDING,
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "exception": self.exception._asdict(),
            "interrupt": self.interrupt._asdict(),
            "nmi": self.nmi._asdict(),
            "sipi_vector": self.sipi_vector,
            "flags": self.flags,
            "smi": self.smi._asdict(),
            "triple_fault_pending": self.triple_fault_pending,
            "exception_has_payload": self.exception_has_payload,
            "exception_payload": self.exception_payload,
        }


_MCE_FMT = struct.Struct("<QQQQB7x24x")


class Mce(NamedTuple):
    """``struct kvm_x86_mce``: the argument of KVM_X86_SET_MCE."""

    status: int
    bank: int
    addr: int = 0
    misc: int = 0
    mcg_status: int = 0

    def pack(self) -> bytes:
        return _MCE_FMT.pack(self.status, self.addr, self.misc, self.mcg_status, self.bank)

    @classmethod
    def unpack(cls, raw: bytes) -> Mce:
        if len(raw) != SIZEOF_KVM_X86_MCE:
            raise ValueError(f"kvm_x86_mce is {SIZEOF_KVM_X86_MCE} bytes, got {len(raw)}")
        status, addr, misc, mcg_status, bank = _MCE_FMT.unpack(raw)
        return cls(status=status, bank=bank, addr=addr, misc=misc, mcg_status=mcg_status)


REGS_NAMES: Tuple[str, ...] = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
    "rip", "rflags",
)  # fmt: skip
_REGS_FMT = struct.Struct("<18Q")


def unpack_regs(raw: bytes) -> dict[str, int]:
    """``struct kvm_regs`` as a name -> value dict."""
    return dict(zip(REGS_NAMES, _REGS_FMT.unpack(raw)))


def pack_regs(regs: dict[str, int]) -> bytes:
    """``struct kvm_regs`` from a name -> value dict (missing names are 0)."""
    return _REGS_FMT.pack(*(regs.get(n, 0) for n in REGS_NAMES))


SREGS_SEGMENTS: Tuple[str, ...] = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
SREGS_CONTROL: Tuple[str, ...] = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")
_SREGS_OFF_DTABLES = 8 * 24
_SREGS_OFF_CONTROL = _SREGS_OFF_DTABLES + 2 * 16


def sregs_get_segment(raw: bytes, name: str) -> Segment:
    from serrinj.kvm.vmm_structs import Segment

    off = SREGS_SEGMENTS.index(name) * 24
    return Segment(*Segment._FMT.unpack_from(raw, off))


def sregs_set_segment(raw: bytearray, name: str, seg: Segment) -> None:
    from serrinj.kvm.vmm_structs import Segment

    off = SREGS_SEGMENTS.index(name) * 24
    Segment._FMT.pack_into(
        raw,
        off,
        seg.base,
        seg.limit,
        seg.selector,
        seg.type,
        seg.present,
        seg.dpl,
        seg.db,
        seg.s,
        seg.l,
        seg.g,
        seg.avl,
        seg.unusable,
    )


def sregs_get_control(raw: bytes, name: str) -> int:
    off = _SREGS_OFF_CONTROL + SREGS_CONTROL.index(name) * 8
    return int(struct.unpack_from("<Q", raw, off)[0])


def sregs_set_control(raw: bytearray, name: str, value: int) -> None:
    off = _SREGS_OFF_CONTROL + SREGS_CONTROL.index(name) * 8
    struct.pack_into("<Q", raw, off, value)


def sregs_set_dtable(raw: bytearray, name: str, base: int, limit: int) -> None:
    """Set ``gdt`` or ``idt`` (``struct kvm_dtable {u64 base; u16 limit; u16 padding[3]}``)."""
    off = _SREGS_OFF_DTABLES + ("gdt", "idt").index(name) * 16
    struct.pack_into("<QH6x", raw, off, base, limit)


CR4_MCE = 1 << 6


def pack_msrs(indices: Tuple[int, ...]) -> bytes:
    """``struct kvm_msrs`` asking for ``indices`` (data fields zeroed)."""
    head = struct.pack("<II", len(indices), 0)
    return head + b"".join(struct.pack("<IIQ", i, 0, 0) for i in indices)


def unpack_msrs(raw: bytes, count: int) -> dict[int, int]:
    """index -> value for the first ``count`` entries KVM filled in."""
    out = {}
    for k in range(count):
        index, _reserved, data = struct.unpack_from("<IIQ", raw, SIZEOF_KVM_MSRS + 16 * k)
        out[index] = data
    return out


def cpuid2_request(capacity: int) -> bytes:
    """An empty ``struct kvm_cpuid2`` with room for ``capacity`` entries (for GET ioctls)."""
    return struct.pack("<II", capacity, 0) + bytes(SIZEOF_KVM_CPUID_ENTRY2 * capacity)


def pack_cpuid2(entries: Tuple[CpuidEntry, ...]) -> bytes:
    """``struct kvm_cpuid2`` holding ``entries`` (the KVM_SET_CPUID2 argument)."""
    from serrinj.kvm.vmm_structs import CpuidEntry

    body = b"".join(
        CpuidEntry._FMT.pack(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
        for e in entries
    )
    return struct.pack("<II", len(entries), 0) + body


def unpack_cpuid2(raw: bytes) -> Tuple[CpuidEntry, ...]:
    """The entries of a ``struct kvm_cpuid2`` that KVM filled in."""
    from serrinj.kvm.vmm_structs import CpuidEntry

    (nent,) = struct.unpack_from("<I", raw)
    return tuple(
        CpuidEntry(
            *CpuidEntry._FMT.unpack_from(raw, SIZEOF_KVM_CPUID2 + SIZEOF_KVM_CPUID_ENTRY2 * i)
        )
        for i in range(nent)
    )
