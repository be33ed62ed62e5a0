"""A vCPU serrinj can talk to: one class per arch behind :class:`~serrinj.vcpu.base.Vcpu`,
over an executor that runs the ioctls here or inside the VMM.

An arch's class (and its KVM tables) is imported the first time a vCPU of that
arch is opened, or ``vcpu.Arm64Vcpu`` / ``vcpu.X86Vcpu`` / ``CLASSES[arch]`` is read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Tuple, Type

from serrinj._lazy import LazyMap, module_getattr
from serrinj.errors import Unsupported
from serrinj.kvm.arch import Arch
from serrinj.vcpu.base import Vcpu

if TYPE_CHECKING:
    from serrinj.vcpu.arm64 import Arm64Vcpu
    from serrinj.vcpu.executor import Executor
    from serrinj.vcpu.x86_64 import X86Vcpu

#: each VM arch's vCPU class, as (module, class name)
_MODULES: Mapping[Arch, Tuple[str, str]] = {
    Arch.AARCH64: ("serrinj.vcpu.arm64", "Arm64Vcpu"),
    Arch.X86_64: ("serrinj.vcpu.x86_64", "X86Vcpu"),
}


#: the vCPU class of each VM arch
CLASSES: Mapping[Arch, Type[Vcpu]] = LazyMap(_MODULES, "CLASSES")


def open_vcpu(executor: Executor, fd: int, vcpu_id: int, arch: str) -> Vcpu:
    """The vCPU ``vcpu_id`` (``fd`` in the process ``executor`` runs in) of an ``arch`` VM."""
    try:
        cls = CLASSES[Arch(arch)]
    except ValueError:
        raise Unsupported(f"vCPU {vcpu_id}: serrinj knows no {arch} vCPUs") from None
    return cls(executor, fd, vcpu_id, arch)


#: ``vcpu.Arm64Vcpu`` and ``vcpu.X86Vcpu``, imported on first use
__getattr__ = module_getattr(
    __name__, globals(), {name: (mod, name) for mod, name in _MODULES.values()}
)


__all__ = ["CLASSES", "Arm64Vcpu", "Vcpu", "X86Vcpu", "open_vcpu"]
