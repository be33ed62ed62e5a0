"""serrinj: a RAS fault injector for KVM.

serrinj attaches to a running VM's vCPU thread and injects a virtual SError
(arm64), a machine check or an NMI (x86_64). KVM only accepts vCPU ioctls
from the process that created the VM, so the ioctl is executed *inside* the
VMM, as a ptrace-driven remote syscall in the vCPU's own thread.

The public Python API is what this package exports (``serrinj.__all__``)::

    import serrinj

    vm = serrinj.find(name="web1")          # or pid=, domain=, fd=
    print(vm.status().as_dict())
    vm.mce(9, preset="srao", addr=0x12345000, vcpu=0, wait=5.0)
    with vm.session() as s:                 # many injections: the fast path
        for _ in range(10):
            s.nmi(vcpu=1)

docs/api.md is the guide, with the stability and deprecation rules. Every
exception is a :class:`SerrinjError` whose ``exit_code`` is the one the
``serrinj`` command exits with. The names are imported on first use, so
``import serrinj`` (and the command line's start-up) stays cheap.

Layers, from the kernel up (internal; not part of the API; docs/ARCHITECTURE.md):

- ``serrinj._native``  cffi bindings to libc (the only module that imports cffi)
- ``serrinj.kvm``      the KVM uAPI as data: ioctl numbers, caps, struct codecs
- ``serrinj.codec``    pure codecs: numbers, SError syndromes, MCA status, vCPU events
- ``serrinj.host``     this machine: /proc, KVM capabilities, the caller's privileges
- ``serrinj.remote``   the ptrace remote-syscall engine
- ``serrinj.vcpu``     a vCPU reachable through a local or remote executor
- ``serrinj.target``   discovery (VMs, vCPU fds, vCPU threads) and attaching to a vCPU
- ``serrinj.faults``   one module per fault kind, and the one injection loop
- ``serrinj.ops``      use cases (status, inject, events, list, demo)
- ``serrinj.campaign`` campaign files and their runner
- ``serrinj.api``      the public API above, on the same use cases as the CLI
- ``serrinj.cli``      click commands and rich/JSON output
- ``serrinj.pytest_plugin``  the pytest plugin (loaded by pytest only)
"""

__version__ = "0.1.0"

# Not typing.TYPE_CHECKING (nor `from __future__ import annotations`): a bare
# `import serrinj` imports nothing else (type checkers treat any TYPE_CHECKING so).
TYPE_CHECKING = False
if TYPE_CHECKING:  # what a type checker sees; at run time __getattr__ imports on first use
    from typing import Any, List

    from serrinj.api import (
        CAPABILITIES,
        Delivery,
        EventsLoad,
        EventsSnapshot,
        HostCaps,
        Injection,
        Session,
        StatusReport,
        VcpuStatus,
        Vm,
        capability_missing,
        find,
        host_caps,
        read_events,
        vms,
    )
    from serrinj.errors import (
        Conflict,
        ExitCode,
        ExpectationFailed,
        Interrupted,
        InvalidInput,
        KvmRejected,
        NotDelivered,
        PermissionDenied,
        SeccompBlocked,
        SerrinjError,
        TargetGone,
        TargetNotFound,
        Unsupported,
    )

__all__ = [  # what `from serrinj import *` gives; every name is documented in docs/api.md
    "CAPABILITIES",
    "Conflict",
    "Delivery",
    "EventsLoad",
    "EventsSnapshot",
    "ExitCode",
    "ExpectationFailed",
    "HostCaps",
    "Injection",
    "Interrupted",
    "InvalidInput",
    "KvmRejected",
    "NotDelivered",
    "PermissionDenied",
    "SeccompBlocked",
    "SerrinjError",
    "Session",
    "StatusReport",
    "TargetGone",
    "TargetNotFound",
    "Unsupported",
    "VcpuStatus",
    "Vm",
    "__version__",
    "capability_missing",
    "find",
    "host_caps",
    "read_events",
    "vms",
]


def __getattr__(name: str) -> "Any":
    if name not in __all__ or name == "__version__":
        raise AttributeError(f"module 'serrinj' has no attribute {name!r}")
    import importlib

    # the exceptions are serrinj.errors' (small: importing it costs nothing), the rest the API's
    errors = importlib.import_module("serrinj.errors")
    home = errors if hasattr(errors, name) else importlib.import_module("serrinj.api")
    value = getattr(home, name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> "List[str]":
    return sorted(set(globals()) | set(__all__))
