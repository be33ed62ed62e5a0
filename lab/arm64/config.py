"""What the lab is made of: kernels, CPU models, packages, wheels, paths.

To change what goes into the lab, change this file: the images are cached by
content, so any change here (or to the builder) rebuilds them on the next run.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, Optional, Tuple

#: the Debian release the lab's userland comes from (Python, busybox, QEMU)
DEBIAN_RELEASE = "bookworm"
DEBIAN_MIRROR = os.environ.get("SERRINJ_DEBIAN_MIRROR", "http://deb.debian.org/debian")
DEBIAN_SECURITY_MIRROR = os.environ.get(
    "SERRINJ_DEBIAN_SECURITY_MIRROR", "http://deb.debian.org/debian-security"
)
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
#: (mirror, suite) pairs of the lab's private apt sources (arm64, main only)
APT_SUITES: Tuple[Tuple[str, str], ...] = (
    (DEBIAN_MIRROR, DEBIAN_RELEASE),
    (DEBIAN_MIRROR, f"{DEBIAN_RELEASE}-updates"),
    (DEBIAN_SECURITY_MIRROR, f"{DEBIAN_RELEASE}-security"),
    # backports is "NotAutomatic": apt takes from it only what is asked for by
    # release, so it brings the newer kernel without touching the userland
    (DEBIAN_MIRROR, f"{DEBIAN_RELEASE}-backports"),
)
#: the suite the "newest" kernel comes from. It is *only* ever asked for the kernel, and
#: it lives in an apt root of its own (``apt-kernel/``): the userland can never be
#: resolved against it, whatever the pins, and the stable root's lists stay as they are
UNSTABLE_SUITE = "unstable"
KERNEL_APT_SUITES: Tuple[Tuple[str, str], ...] = ((DEBIAN_MIRROR, UNSTABLE_SUITE),)


@dataclass(frozen=True)
class Kernel:
    """A kernel flavour: Debian's ``linux-image-arm64`` taken from ``release``."""

    label: str
    #: target release for apt (``None``: the default candidate, i.e. the stable suites)
    release: Optional[str]
    description: str
    #: resolved in the kernel-only apt root (:data:`KERNEL_APT_SUITES`), not the stable one
    kernel_root: bool = False
    #: what the suite must see: KVM commits an unmasked SError into the vCPU's registers
    #: inside KVM_SET_VCPU_EVENTS (Linux 6.17 and later). The lab states it per flavour
    #: and checks serrinj's own probe of the kernel against it (lab.commit on the command line)
    serror_commit_at_set: bool = False


KERNELS: Mapping[str, Kernel] = MappingProxyType(
    {
        "6.1": Kernel("6.1", None, f"Debian 12 ({DEBIAN_RELEASE}) stable kernel"),
        "6.12": Kernel(
            "6.12",
            f"{DEBIAN_RELEASE}-backports",
            f"Debian 12's newer kernel ({DEBIAN_RELEASE}-backports)",
        ),
        # whatever Debian unstable's linux-image-arm64 names at fetch time (7.2 in
        # 2026): the lab follows it; the run's header gives the resolved version
        "newest": Kernel(
            "newest",
            UNSTABLE_SUITE,
            f"newest arm64 kernel (Debian {UNSTABLE_SUITE}, kernel only)",
            kernel_root=True,
            serror_commit_at_set=True,
        ),
    }
)
DEFAULT_KERNEL = "6.1"


@dataclass(frozen=True)
class Cpu:
    """A QEMU CPU model for the emulated host, and whether it has the RAS extension."""

    name: str
    qemu: str
    ras: bool


CPUS: Mapping[str, Cpu] = MappingProxyType(
    {
        # pauth-impdef=on: QEMU's cheap pointer-auth algorithm, 2-3x faster under TCG
        "max": Cpu("max", "max,pauth-impdef=on", ras=True),
        # ARMv8.0: KVM works (nVHE) but there is no RAS, so cap 158 must read 0
        "cortex-a57": Cpu("cortex-a57", "cortex-a57", ras=False),
    }
)

#: the CI matrix: every kernel with -cpu max, plus one boot without RAS
DEFAULT_MATRIX: Tuple[Tuple[str, str], ...] = (
    ("6.1", "max"),
    ("6.12", "max"),
    ("newest", "max"),
    ("6.1", "cortex-a57"),
)

PYTHON_VERSION = "3.11"

#: packages installed whole (restricted to these path prefixes) in the base image
BASE_PAYLOAD: Mapping[str, Tuple[str, ...]] = MappingProxyType(
    {
        "busybox-static": ("bin/busybox",),
        f"python{PYTHON_VERSION}-minimal": (f"usr/bin/python{PYTHON_VERSION}",),
        f"libpython{PYTHON_VERSION}-minimal": (
            f"usr/lib/python{PYTHON_VERSION}/",
            f"etc/python{PYTHON_VERSION}/",
        ),
        f"libpython{PYTHON_VERSION}-stdlib": (f"usr/lib/python{PYTHON_VERSION}/",),
    }
)
#: the inner VMM for nested tests (its libraries come from the ELF closure)
NESTED_PAYLOAD: Mapping[str, Tuple[str, ...]] = MappingProxyType(
    {"qemu-system-arm": ("usr/bin/qemu-system-aarch64",)}
)
#: stdlib parts nothing in the lab uses (GUI, docs, packaging bootstrap)
PYTHON_PRUNE = ("idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data")
#: libraries loaded with dlopen, so absent from NEEDED: glibc needs libgcc_s to
#: unwind a thread in pthread_exit/pthread_cancel
DLOPEN_EXTRA = ("libgcc_s.so.1",)

#: wheels for the tests in the lab, on top of serrinj's runtime dependencies
LAB_WHEELS: Tuple[str, ...] = ("pytest", "hypothesis")
WHEEL_PLATFORMS: Tuple[str, ...] = (
    "manylinux2014_aarch64",
    "manylinux_2_28_aarch64",
    "manylinux_2_31_aarch64",
    "manylinux_2_34_aarch64",
    "manylinux_2_36_aarch64",  # bookworm's glibc is 2.36
)

#: QEMU settings of the emulated host (BRIEF section 9)
MACHINE = "virt,virtualization=on,gic-version=3"
SMP = 2
MEMORY_MB = 2048
KERNEL_APPEND = "console=ttyAMA0 rdinit=/init panic=-1 quiet"

#: wall-clock limit of one boot of `run`, and what the guest leaves itself for teardown
#: (a safety net, not a target: boots side by side, or a busy machine, take longer)
#: (a busy machine, or more boots than CPUs, gives each boot less than a CPU)
BOOT_TIMEOUT_S = 2400
GUEST_MARGIN_S = 20
#: the whole lab (every boot of the matrix, warm cache, 2 CPUs) should take at most this
#: long; ``run`` says on its closing line whether it did
WALL_TARGET_S = 600


def cache_root() -> str:
    """``$SERRINJ_CACHE`` or ``~/.cache/serrinj``: every download and image lives here."""
    return os.environ.get("SERRINJ_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "serrinj"
    )


def lab_cache() -> str:
    return os.path.join(cache_root(), "lab")


def repo_root() -> str:
    """The working tree the lab takes serrinj and the suite from."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


_T0 = time.monotonic()


def say(message: str) -> None:
    """A progress line on stderr (results go to stdout)."""
    print(f"lab [{time.monotonic() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)
