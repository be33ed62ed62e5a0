"""The KVM structs only a VMM uses (the test VM, and the ext-dabt fault reading the
MMIO exit): ``struct kvm_userspace_memory_region`` and the ``io``/``mmio`` members of
``struct kvm_run``'s exit union; on x86_64 ``struct kvm_segment`` and
``struct kvm_cpuid_entry2``. :mod:`serrinj.kvm.api` and :mod:`serrinj.kvm.x86_64` export
them under the same names and import this module on first use, so an injection does not
build them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from serrinj.kvm.api import KVM_RUN_OFF_UNION


@dataclass(frozen=True)
class UserspaceMemoryRegion:
    """``struct kvm_userspace_memory_region``."""

    slot: int
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    flags: int = 0

    _FMT = struct.Struct("<IIQQQ")

    def pack(self) -> bytes:
        return self._FMT.pack(
            self.slot, self.flags, self.guest_phys_addr, self.memory_size, self.userspace_addr
        )


@dataclass(frozen=True)
class ExitIo:
    """The ``io`` member of ``struct kvm_run``'s exit union."""

    direction: int
    size: int
    port: int
    count: int
    data_offset: int

    _FMT = struct.Struct("<BBHIQ")

    @classmethod
    def unpack_from(cls, run: bytes) -> ExitIo:
        return cls(*cls._FMT.unpack_from(run, KVM_RUN_OFF_UNION))


@dataclass(frozen=True)
class ExitMmio:
    """The ``mmio`` member of ``struct kvm_run``'s exit union."""

    phys_addr: int
    data: bytes
    length: int
    is_write: bool

    _FMT = struct.Struct("<Q8sIB")

    @classmethod
    def unpack_from(cls, run: bytes) -> ExitMmio:
        addr, data, length, is_write = cls._FMT.unpack_from(run, KVM_RUN_OFF_UNION)
        return cls(addr, data, length, bool(is_write))

    #: offset of ``mmio.data`` inside ``struct kvm_run``
    DATA_OFFSET = KVM_RUN_OFF_UNION + 8


@dataclass(frozen=True)
class Segment:
    """``struct kvm_segment`` (24 bytes)."""

    base: int = 0
    limit: int = 0xFFFF
    selector: int = 0
    type: int = 3
    present: int = 1
    dpl: int = 0
    db: int = 0
    s: int = 1
    l: int = 0  # noqa: E741 - the kernel's field name
    g: int = 0
    avl: int = 0
    unusable: int = 0

    _FMT = struct.Struct("<QIH9Bx")


@dataclass(frozen=True)
class CpuidEntry:
    """``struct kvm_cpuid_entry2`` (40 bytes; ``padding[3]`` is zero)."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int

    _FMT = struct.Struct("<7I12x")
