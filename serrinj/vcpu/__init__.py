"""A vCPU serrinj can talk to: one class per arch behind :class:`~serrinj.vcpu.base.Vcpu`,
over an executor that runs the ioctls here or inside the VMM.

An arch's class (and its KVM tables) is imported the first time a vCPU of that
arch is opened, or ``vcpu.Arm64Vcpu`` / ``vcpu.X86Vcpu`` / ``CLASSES[arch]`` is read.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Dict, Iterator, Mapping, Tuple, Type

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


def _load(module: str, name: str) -> Type[Vcpu]:
    cls: Type[Vcpu] = getattr(importlib.import_module(module), name)
    return cls


class _Classes(Mapping[Arch, Type[Vcpu]]):
    """A read-only mapping of arch -> vCPU class that imports an arch's module on first use."""

    __slots__ = ("_cache",)

    def __init__(self) -> None:
        self._cache: Dict[Arch, Type[Vcpu]] = {}

    def __getitem__(self, arch: Arch) -> Type[Vcpu]:
        try:
            return self._cache[arch]
        except KeyError:
            pass
        cls = _load(*_MODULES[arch])
        self._cache[arch] = cls
        return cls

    def __iter__(self) -> Iterator[Arch]:
        return iter(_MODULES)

    def __len__(self) -> int:
        return len(_MODULES)

    def __repr__(self) -> str:
        return f"CLASSES({[a.value for a in _MODULES]})"


#: the vCPU class of each VM arch
CLASSES: Mapping[Arch, Type[Vcpu]] = _Classes()


def open_vcpu(executor: Executor, fd: int, vcpu_id: int, arch: str) -> Vcpu:
    """The vCPU ``vcpu_id`` (``fd`` in the process ``executor`` runs in) of an ``arch`` VM."""
    try:
        cls = CLASSES[Arch(arch)]
    except ValueError:
        raise Unsupported(f"vCPU {vcpu_id}: serrinj knows no {arch} vCPUs") from None
    return cls(executor, fd, vcpu_id, arch)


def __getattr__(name: str) -> object:
    """``vcpu.Arm64Vcpu`` and ``vcpu.X86Vcpu``, imported on first use."""
    for module, cls_name in _MODULES.values():
        if cls_name == name:
            value = _load(module, cls_name)
            globals()[name] = value
            return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CLASSES", "Arm64Vcpu", "Vcpu", "X86Vcpu", "open_vcpu"]
