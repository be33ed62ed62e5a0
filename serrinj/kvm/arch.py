"""The VM architectures serrinj knows, as a type.

An :class:`Arch` is also the string KVM's users know it by (``"x86_64"``, ``"aarch64"``),
so it goes into JSON and messages as that string.
"""

from __future__ import annotations

import enum


class Arch(str, enum.Enum):
    """A VM's (and this host's) architecture."""

    X86_64 = "x86_64"
    AARCH64 = "aarch64"

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def of(cls, name: str) -> Arch:
        """The arch of a machine name as ``uname -m`` or users write it (``arm64`` too)."""
        return cls.AARCH64 if name == "arm64" else cls(name)
