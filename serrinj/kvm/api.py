"""Architecture-independent KVM uAPI: ioctl numbers, capabilities, exit reasons.

Values are those of include/uapi/linux/kvm.h. ``tests/test_kvm_abi.py``
compiles a C program against the real headers and compares every number here.
Capabilities are *probed* with KVM_CHECK_EXTENSION at run time; serrinj never
compares kernel versions.
"""

from __future__ import annotations

import struct
from types import MappingProxyType
from typing import TYPE_CHECKING, Mapping

from serrinj._lazy import module_getattr
from serrinj.kvm.ioctl import _IO, _IOR, _IOW

if TYPE_CHECKING:
    from serrinj.kvm.vmm_structs import ExitIo as ExitIo
    from serrinj.kvm.vmm_structs import ExitMmio as ExitMmio
    from serrinj.kvm.vmm_structs import UserspaceMemoryRegion as UserspaceMemoryRegion

#: the structs only a VMM (the test VM) or the ext-dabt fault use, in
#: :mod:`serrinj.kvm.vmm_structs`: imported on first use
_VMM_STRUCTS = ("ExitIo", "ExitMmio", "UserspaceMemoryRegion")


__getattr__ = module_getattr(
    __name__, globals(), {n: ("serrinj.kvm.vmm_structs", n) for n in _VMM_STRUCTS}
)


KVMIO = 0xAE

# struct sizes that appear in ioctl numbers
SIZEOF_KVM_VCPU_EVENTS = 64
SIZEOF_KVM_ONE_REG = 16
SIZEOF_KVM_USERSPACE_MEMORY_REGION = 32
SIZEOF_KVM_MP_STATE = 4

# --- system ioctls (on /dev/kvm; no mm check, so serrinj may issue them itself)
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)

# --- VM ioctls
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, SIZEOF_KVM_USERSPACE_MEMORY_REGION)
KVM_CREATE_IRQCHIP = _IO(KVMIO, 0x60)

# --- vCPU ioctls (only from a thread of the VM's creator: BRIEF section 1)
KVM_RUN = _IO(KVMIO, 0x80)
KVM_GET_MP_STATE = _IOR(KVMIO, 0x98, SIZEOF_KVM_MP_STATE)
KVM_SET_MP_STATE = _IOW(KVMIO, 0x99, SIZEOF_KVM_MP_STATE)
KVM_GET_VCPU_EVENTS = _IOR(KVMIO, 0x9F, SIZEOF_KVM_VCPU_EVENTS)
KVM_SET_VCPU_EVENTS = _IOW(KVMIO, 0xA0, SIZEOF_KVM_VCPU_EVENTS)
KVM_GET_ONE_REG = _IOW(KVMIO, 0xAB, SIZEOF_KVM_ONE_REG)
KVM_SET_ONE_REG = _IOW(KVMIO, 0xAC, SIZEOF_KVM_ONE_REG)

KVM_API_VERSION = 12

# --- capabilities (KVM_CHECK_EXTENSION arguments)
KVM_CAP_IRQCHIP = 0
KVM_CAP_USER_MEMORY = 3
KVM_CAP_MCE = 31
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_ONE_REG = 70
KVM_CAP_ARM_INJECT_SERROR_ESR = 158
KVM_CAP_EXCEPTION_PAYLOAD = 164
KVM_CAP_ARM_NISV_TO_USER = 177
KVM_CAP_ARM_INJECT_EXT_DABT = 178
KVM_CAP_X86_TRIPLE_FAULT_EVENT = 218
# Added in the Linux 6.19 cycle (with KVM_EXIT_ARM_SEA); absent from older headers.
KVM_CAP_ARM_SEA_TO_USER = 245

CAP_NAMES: Mapping[int, str] = MappingProxyType(
    {
        KVM_CAP_IRQCHIP: "KVM_CAP_IRQCHIP",
        KVM_CAP_USER_MEMORY: "KVM_CAP_USER_MEMORY",
        KVM_CAP_MCE: "KVM_CAP_MCE",
        KVM_CAP_VCPU_EVENTS: "KVM_CAP_VCPU_EVENTS",
        KVM_CAP_ONE_REG: "KVM_CAP_ONE_REG",
        KVM_CAP_ARM_INJECT_SERROR_ESR: "KVM_CAP_ARM_INJECT_SERROR_ESR",
        KVM_CAP_EXCEPTION_PAYLOAD: "KVM_CAP_EXCEPTION_PAYLOAD",
        KVM_CAP_ARM_NISV_TO_USER: "KVM_CAP_ARM_NISV_TO_USER",
        KVM_CAP_ARM_INJECT_EXT_DABT: "KVM_CAP_ARM_INJECT_EXT_DABT",
        KVM_CAP_X86_TRIPLE_FAULT_EVENT: "KVM_CAP_X86_TRIPLE_FAULT_EVENT",
        KVM_CAP_ARM_SEA_TO_USER: "KVM_CAP_ARM_SEA_TO_USER",
    }
)

# --- struct kvm_run exit reasons
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_ARM_NISV = 28
KVM_EXIT_ARM_SEA = 41

EXIT_REASON_NAMES: Mapping[int, str] = MappingProxyType(
    {
        KVM_EXIT_UNKNOWN: "UNKNOWN",
        KVM_EXIT_EXCEPTION: "EXCEPTION",
        KVM_EXIT_IO: "IO",
        KVM_EXIT_HYPERCALL: "HYPERCALL",
        KVM_EXIT_DEBUG: "DEBUG",
        KVM_EXIT_HLT: "HLT",
        KVM_EXIT_MMIO: "MMIO",
        KVM_EXIT_IRQ_WINDOW_OPEN: "IRQ_WINDOW_OPEN",
        KVM_EXIT_SHUTDOWN: "SHUTDOWN",
        KVM_EXIT_FAIL_ENTRY: "FAIL_ENTRY",
        KVM_EXIT_INTR: "INTR",
        KVM_EXIT_INTERNAL_ERROR: "INTERNAL_ERROR",
        KVM_EXIT_SYSTEM_EVENT: "SYSTEM_EVENT",
        KVM_EXIT_ARM_NISV: "ARM_NISV",
        KVM_EXIT_ARM_SEA: "ARM_SEA",
    }
)

# --- struct kvm_run layout (the parts serrinj reads)
#: ``u8 immediate_exit``: KVM_RUN returns -EINTR at once while it is set (a race-free kick)
KVM_RUN_OFF_IMMEDIATE_EXIT = 1
KVM_RUN_OFF_EXIT_REASON = 8
KVM_RUN_OFF_UNION = 32
KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

# --- mp_state values (KVM_GET_MP_STATE)
KVM_MP_STATE_RUNNABLE = 0
MP_STATE_NAMES: Mapping[int, str] = MappingProxyType(
    {
        0: "runnable",
        1: "uninitialized",
        2: "init-received",
        3: "halted",
        4: "sipi-received",
        5: "stopped",
        6: "check-stop",
        7: "operating",
        8: "load",
        9: "ap-reset-hold",
        10: "suspended",
    }
)


def exit_reason_of(run: bytes) -> int:
    """``kvm_run->exit_reason`` from the raw bytes of a vCPU's kvm_run page."""
    return int(struct.unpack_from("<I", run, KVM_RUN_OFF_EXIT_REASON)[0])


def one_reg(reg_id: int, addr: int) -> bytes:
    """``struct kvm_one_reg {u64 id; u64 addr}``."""
    return struct.pack("<QQ", reg_id, addr)
