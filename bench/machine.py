"""What machine the figures were taken on: CPU, cores, kernel, the kind of KVM, tools."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from typing import Dict, List, Optional

__all__ = ["describe", "kvm_kind", "load_average", "tool_version"]


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _cpuinfo() -> Dict[str, str]:
    out: Dict[str, str] = {}
    for line in _read("/proc/cpuinfo").splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if out:
                break  # the first processor is enough
            continue
        out.setdefault(key.strip(), value.strip())
    return out


def kvm_kind(flags: List[str]) -> Dict[str, object]:
    """How KVM runs guests here, from the CPU flags this kernel sees.

    A host that is itself a VM ("hypervisor" flag) and shows no vmx/svm runs
    its KVM without hardware virtualization: every guest exit (and, for the
    real-mode test guest, most instructions) is handled in software by the
    outer hypervisor, so exits cost far more than on bare metal.
    """
    nested = "hypervisor" in flags
    hw = "vmx" in flags or "svm" in flags
    if hw and not nested:
        kind = "bare metal, hardware-assisted KVM"
    elif hw:
        kind = "nested KVM with virtualization extensions passed through"
    elif nested:
        kind = "nested KVM without vmx/svm in this guest (virtualization done in software)"
    else:
        kind = "no vmx/svm flags"
    return {
        "kind": kind,
        "dev_kvm": os.path.exists("/dev/kvm"),
        "hypervisor_flag": nested,
        "vmx_or_svm": hw,
    }


def load_average() -> List[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def tool_version(argv: List[str]) -> Optional[str]:
    """The first line of ``argv``'s output (``--version``), or None when missing."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (proc.stdout or proc.stderr).strip()
    return text.splitlines()[0] if text else None


def _meminfo_total() -> Optional[int]:
    m = re.search(r"^MemTotal:\s+(\d+) kB", _read("/proc/meminfo"), re.M)
    return int(m.group(1)) * 1024 if m else None


def _os_release() -> Optional[str]:
    m = re.search(r'^PRETTY_NAME="?([^"\n]*)"?', _read("/etc/os-release"), re.M)
    return m.group(1) if m else None


def describe() -> Dict[str, object]:
    """A JSON-able description of this machine and the tools the figures use."""
    info = _cpuinfo()
    flags = info.get("flags", "").split()
    uname = platform.uname()
    return {
        "cpu_model": info.get("model name") or platform.processor() or "unknown",
        "cpu_family_model_stepping": [info.get(k) for k in ("cpu family", "model", "stepping")],
        "cpu_flags_of_note": [
            f
            for f in ("hypervisor", "vmx", "svm", "avx512f", "amx_tile", "constant_tsc")
            if f in flags
        ],
        "cpus_online": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "memory_bytes": _meminfo_total(),
        "kernel": f"{uname.system} {uname.release} {uname.version}",
        "machine": uname.machine,
        "os": _os_release(),
        "python": sys.version.split()[0],
        "kvm": kvm_kind(flags),
        "clocksource": _read(
            "/sys/devices/system/clocksource/clocksource0/current_clocksource"
        ).strip()
        or None,
        "tools": {
            "gdb": tool_version(["gdb", "--version"]),
            "qemu": tool_version(["qemu-system-x86_64", "--version"]),
        },
        "load_average_start": load_average(),
    }
