"""What the host told this boot, through ``lab.*`` words on the kernel command line.

The host decides what a boot is expected to show (for instance whether the
emulated CPU has RAS); the suite compares what KVM reports against that, never
against something it probed itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

CMDLINE = "/proc/cmdline"


def params(cmdline: Optional[str] = None) -> Dict[str, str]:
    """``lab.KEY=VALUE`` words as ``{KEY: VALUE}``."""
    if cmdline is None:
        try:
            with open(CMDLINE) as fh:
                cmdline = fh.read()
        except OSError:
            return {}
    out: Dict[str, str] = {}
    for word in cmdline.split():
        key, sep, value = word.partition("=")
        if sep and key.startswith("lab."):
            out[key[len("lab.") :]] = value
    return out


@dataclass(frozen=True)
class LabConfig:
    """One boot's settings, as given by the host."""

    mode: str
    cpu: str
    kernel: str
    expect_ras: bool
    with_qemu: bool
    timeout: int
    #: the kernel commits an unmasked SError inside KVM_SET_VCPU_EVENTS (6.17 and later)
    expect_commit: bool = False

    @classmethod
    def from_params(cls, p: Dict[str, str]) -> LabConfig:
        return cls(
            mode=p.get("mode", ""),
            cpu=p.get("cpu", "?"),
            kernel=p.get("kernel", "?"),
            expect_ras=p.get("ras") == "1",
            with_qemu=p.get("qemu") == "1",
            timeout=int(p.get("timeout", "0") or 0),
            expect_commit=p.get("commit") == "1",
        )

    @property
    def inside_lab(self) -> bool:
        return self.mode in ("run", "shell")


def current() -> LabConfig:
    """The configuration of the running boot (``inside_lab`` is False elsewhere)."""
    return LabConfig.from_params(params())
