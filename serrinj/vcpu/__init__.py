"""A vCPU serrinj can talk to: one class per arch behind :class:`~serrinj.vcpu.base.Vcpu`,
over an executor that runs the ioctls here or inside the VMM."""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping, Type

from serrinj.errors import Unsupported
from serrinj.kvm.arch import Arch
from serrinj.vcpu.arm64 import Arm64Vcpu
from serrinj.vcpu.base import Vcpu
from serrinj.vcpu.executor import Executor
from serrinj.vcpu.x86_64 import X86Vcpu

#: the vCPU class of each VM arch
CLASSES: Mapping[Arch, Type[Vcpu]] = MappingProxyType(
    {Arch.AARCH64: Arm64Vcpu, Arch.X86_64: X86Vcpu}
)


def open_vcpu(executor: Executor, fd: int, vcpu_id: int, arch: str) -> Vcpu:
    """The vCPU ``vcpu_id`` (``fd`` in the process ``executor`` runs in) of an ``arch`` VM."""
    try:
        cls = CLASSES[Arch(arch)]
    except ValueError:
        raise Unsupported(f"vCPU {vcpu_id}: serrinj knows no {arch} vCPUs") from None
    return cls(executor, fd, vcpu_id, arch)


__all__ = ["CLASSES", "Arm64Vcpu", "Vcpu", "X86Vcpu", "open_vcpu"]
