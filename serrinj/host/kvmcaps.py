"""Host capabilities, probed with system ioctls on /dev/kvm from serrinj's own process.

System ioctls have no ``mm`` check (BRIEF section 1), so no VMM is involved. The
answer is kept for the life of the process (per device path and architecture):
an injection loop asks for it every time, and the host's KVM does not change
under a running serrinj.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from serrinj import _native
from serrinj.errors import PermissionDenied, Unsupported
from serrinj.kvm import api
from serrinj.kvm import x86_64 as kvm_x86
from serrinj.kvm.arch import Arch

KVM_DEV = "/dev/kvm"

_CAPS = {
    "x86_64": (api.KVM_CAP_VCPU_EVENTS, api.KVM_CAP_MCE, api.KVM_CAP_EXCEPTION_PAYLOAD),
    "aarch64": (
        api.KVM_CAP_VCPU_EVENTS,
        api.KVM_CAP_ARM_INJECT_SERROR_ESR,
        api.KVM_CAP_ARM_INJECT_EXT_DABT,
        api.KVM_CAP_ONE_REG,
        api.KVM_CAP_ARM_SEA_TO_USER,
    ),
}


@dataclass(frozen=True)
class HostCaps:
    """What this host's KVM offers for fault injection."""

    arch: str
    api_version: int
    caps: Dict[str, int] = field(default_factory=dict)
    mce_cap_supported: Optional[int] = None

    def cap(self, number: int) -> int:
        return self.caps.get(api.CAP_NAMES[number], 0)

    @property
    def serror_esr(self) -> bool:
        """KVM_CAP_ARM_INJECT_SERROR_ESR: the host has RAS, and an ESR may be given."""
        return self.cap(api.KVM_CAP_ARM_INJECT_SERROR_ESR) > 0

    @property
    def ext_dabt(self) -> bool:
        return self.cap(api.KVM_CAP_ARM_INJECT_EXT_DABT) > 0

    def as_dict(self) -> Dict[str, object]:
        out: Dict[str, object] = {
            "arch": self.arch,
            "api_version": self.api_version,
            "caps": dict(self.caps),
        }
        if self.mce_cap_supported is not None:
            out["mce_cap_supported"] = self.mce_cap_supported
        return out


def machine() -> str:
    # what platform.machine() returns on Linux, without importing platform (~1 ms)
    m = os.uname().machine
    return "aarch64" if m == "arm64" else m


def open_kvm() -> int:
    try:
        return os.open(KVM_DEV, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise Unsupported(
            f"{KVM_DEV} does not exist: KVM is not available on this host",
            hint="load kvm (and kvm_intel/kvm_amd), or enable virtualization",
        ) from None
    except PermissionError:
        raise PermissionDenied(
            f"no access to {KVM_DEV}",
            hint="add your user to the kvm group, or run as root",
        ) from None


#: (device, arch) -> what probing it found, once per process
_probed: Dict[Tuple[str, str], HostCaps] = {}


def probe(*, fresh: bool = False) -> HostCaps:
    """The host's KVM (API version, injection capabilities, MCE support).

    Probed once per process; ``fresh`` asks /dev/kvm again. A failed probe (no KVM,
    no access) is not kept: the next call tries again.
    """
    arch = machine()
    key = (KVM_DEV, arch)
    if not fresh:
        known = _probed.get(key)
        if known is not None:
            return known
    caps = _probe(arch)
    _probed[key] = caps
    return caps


def _probe(arch: str) -> HostCaps:
    fd = open_kvm()
    try:
        version = _native.ioctl_int(fd, api.KVM_GET_API_VERSION)
        caps = {}
        for number in _CAPS.get(arch, (api.KVM_CAP_VCPU_EVENTS,)):
            try:
                caps[api.CAP_NAMES[number]] = _native.ioctl_int(fd, api.KVM_CHECK_EXTENSION, number)
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise
                caps[api.CAP_NAMES[number]] = 0
        mce = None
        if arch == Arch.X86_64 and caps.get("KVM_CAP_MCE"):
            buf = bytearray(8)
            _native.ioctl_buf(fd, kvm_x86.KVM_X86_GET_MCE_CAP_SUPPORTED, buf)
            mce = struct.unpack("<Q", buf)[0]
        return HostCaps(arch=arch, api_version=version, caps=caps, mce_cap_supported=mce)
    finally:
        os.close(fd)
