"""VMM profiles of the test VM: the thread, fd, vcpu-id and sandbox layout of real VMMs.

``python -m serrinj.testvm --profile NAME`` makes the built-in VMM look, from
outside the process, like that VMM does (``/proc/PID/task``, ``/proc/PID/fd``,
``Seccomp:`` and the filters themselves), so that serrinj's discovery and its
choice of a thread can be tested against every layout without the VMM. The facts
come from the VMMs' published sources (BRIEF section 10); nothing of their code:

==================  =====================  ===========  ===============  =============
profile             vCPU thread (comm)     fds made by  vcpu_id          seccomp
==================  =====================  ===========  ===============  =============
qemu                ``CPU N/KVM``          vCPU thread  x86 APIC id      none on ioctl
firecracker         ``fc_vcpu N``          main thread  index            per thread
cloud-hypervisor    ``vcpuN``              ``vmm``      x86 x2APIC id    vmm + vcpu
crosvm              ``crosvm_vcpuN``       vCPU thread  index            none
kvmtool             ``kvm-vcpu-N``         main thread  index            none
==================  =====================  ===========  ===============  =============

- QEMU (``accel/kvm/kvm-all.c`` ``kvm_init_vcpu``) opens one binary-stats fd per vCPU
  (``KVM_GET_STATS_FD``) on the vCPU thread and keeps it; its ``-sandbox on`` is a
  process-wide deny-list that never filters ioctl, so the profile installs none.
  Thread names are QEMU's with ``-name ...,debug-threads=on`` (always from QEMU 11).
- Firecracker (``src/vmm/src/vstate/vcpu.rs``) creates the vCPU fds on the main
  thread and ``dup``\\ s each one for the VMM side (``Vcpu::copy_kvm_vcpu_fd``, a
  plain ``dup``: the copy is not close-on-exec), so every vCPU has two fds. Its
  filters (``resources/seccomp/x86_64-unknown-linux-musl.json``) are per thread:
  ``vmm`` on the main thread, ``api`` on ``fc_api``, ``vcpu`` on each vCPU thread,
  each an allow-list whose default action is trap; the SIGSYS handler
  (``src/vmm/src/signal_handler.rs``) calls ``_exit(148)``. None of them allows
  KVM_SET_VCPU_EVENTS, KVM_NMI or KVM_X86_SET_MCE.
- cloud-hypervisor (``vmm/src/cpu.rs``, ``vmm/src/seccomp_filters.rs``): the ``vmm``
  thread creates the vCPUs, so a vCPU thread runs the ``vmm`` filter with the
  ``vcpu`` filter stacked on it. Of the injection ioctls the vCPU filter allows
  only KVM_NMI; the vmm filter allows KVM_GET/SET_VCPU_EVENTS, KVM_NMI,
  KVM_GET_MSRS/SREGS but not KVM_X86_SET_MCE; the main thread has no filter.
  The SIGSYS handler writes "Probable seccomp violation" and dies of SIGSYS.
- crosvm (``src/crosvm/sys/linux/vcpu.rs``) creates an x86 vCPU on its own thread;
  no filter on the VMM process. kvmtool (``builtin-run.c``, ``kvm-cpu.c``) creates
  them on the main thread; no filter.

Each filter is modelled on what matters to an injector: its verdict for every
``ioctl`` request (the listed ones are allowed, every other ioctl gets the
VMM's default action). Other syscalls are allowed: the test VM is a Python
program whose syscalls are not a VMM's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, List, Mapping, Optional, Sequence, Tuple

from serrinj.kvm import api
from serrinj.kvm import x86_64 as kx
from serrinj.kvm.ioctl import _IO, _IOR, _IOW, _IOWR
from serrinj.remote import seccomp

__all__ = [
    "KVM_GET_STATS_FD",
    "PROFILES",
    "Profile",
    "ThreadSpec",
    "allow_ioctls",
    "apic_ids",
]

#: ``_IO(KVMIO, 0xce)``: a vCPU's binary statistics fd (Linux 5.14+)
KVM_GET_STATS_FD = _IO(api.KVMIO, 0xCE)

# ioctl requests the VMMs' filters name that serrinj's KVM tables do not need;
# computed from their uAPI definitions (struct sizes from linux/kvm.h, x86_64)
_TCGETS, _TCSETS, _TIOCGWINSZ, _FIONBIO, _FIOCLEX = 0x5401, 0x5402, 0x5413, 0x5421, 0x5451
_TUNSETIFF = _IOW(0x54, 202, 4)
_TUNSETOFFLOAD = _IOW(0x54, 208, 4)
_TUNSETVNETHDRSZ = _IOW(0x54, 216, 4)
_K = api.KVMIO
_KVM_GET_API_VERSION = _IO(_K, 0x00)
_KVM_CREATE_VM = _IO(_K, 0x01)
_KVM_CHECK_EXTENSION = _IO(_K, 0x03)
_KVM_GET_VCPU_MMAP_SIZE = _IO(_K, 0x04)
_KVM_GET_SUPPORTED_CPUID = _IOWR(_K, 0x05, 8)
_KVM_CREATE_VCPU = _IO(_K, 0x41)
_KVM_GET_DIRTY_LOG = _IOW(_K, 0x42, 16)
_KVM_SET_USER_MEMORY_REGION = _IOW(_K, 0x46, 32)
_KVM_SET_TSS_ADDR = _IO(_K, 0x47)
_KVM_SET_IDENTITY_MAP_ADDR = _IOW(_K, 0x48, 8)
_KVM_SET_USER_MEMORY_REGION2 = _IOW(_K, 0x49, 160)
_KVM_CREATE_IRQCHIP = _IO(_K, 0x60)
_KVM_GET_IRQCHIP = _IOWR(_K, 0x62, 520)
_KVM_SET_GSI_ROUTING = _IOW(_K, 0x6A, 8)
_KVM_SET_CLOCK = _IOW(_K, 0x7B, 48)
_KVM_GET_CLOCK = _IOR(_K, 0x7C, 48)
_KVM_IRQFD = _IOW(_K, 0x76, 32)
_KVM_CREATE_PIT2 = _IOW(_K, 0x77, 64)
_KVM_IOEVENTFD = _IOW(_K, 0x79, 64)
_KVM_SET_REGS = _IOW(_K, 0x82, 144)
_KVM_SET_SREGS = _IOW(_K, 0x84, 312)
_KVM_TRANSLATE = _IOWR(_K, 0x85, 24)
_KVM_SET_MSRS = _IOW(_K, 0x89, 8)
_KVM_GET_FPU = _IOR(_K, 0x8C, 416)
_KVM_SET_FPU = _IOW(_K, 0x8D, 416)
_KVM_GET_LAPIC = _IOR(_K, 0x8E, 1024)
_KVM_SET_LAPIC = _IOW(_K, 0x8F, 1024)
_KVM_SET_CPUID2 = _IOW(_K, 0x90, 8)
_KVM_GET_CPUID2 = _IOWR(_K, 0x91, 8)
_KVM_SET_MP_STATE = _IOW(_K, 0x99, 4)
_KVM_SET_GUEST_DEBUG = _IOW(_K, 0x9B, 72)
_KVM_GET_PIT2 = _IOR(_K, 0x9F, 112)
_KVM_GET_DEBUGREGS = _IOR(_K, 0xA1, 128)
_KVM_SET_TSC_KHZ = _IO(_K, 0xA2)
_KVM_GET_TSC_KHZ = _IO(_K, 0xA3)
_KVM_ENABLE_CAP = _IOW(_K, 0xA3, 104)
_KVM_GET_XSAVE = _IOR(_K, 0xA4, 4096)
_KVM_SET_XSAVE = _IOW(_K, 0xA5, 4096)
_KVM_GET_XCRS = _IOR(_K, 0xA6, 392)
_KVM_SET_XCRS = _IOW(_K, 0xA7, 392)
_KVM_GET_ONE_REG = _IOW(_K, 0xAB, 16)
_KVM_SET_ONE_REG = _IOW(_K, 0xAC, 16)
_KVM_KVMCLOCK_CTRL = _IO(_K, 0xAD)
_KVM_GET_REG_LIST = _IOWR(_K, 0xB0, 8)
_KVM_GET_NESTED_STATE = _IOWR(_K, 0xBE, 128)
_KVM_SET_NESTED_STATE = _IOW(_K, 0xBF, 128)
_KVM_GET_XSAVE2 = _IOR(_K, 0xCF, 4096)
_KVM_CREATE_DEVICE = _IOWR(_K, 0xE0, 12)
_KVM_SET_DEVICE_ATTR = _IOW(_K, 0xE1, 24)
_KVM_GET_DEVICE_ATTR = _IOW(_K, 0xE2, 24)
_KVM_HAS_DEVICE_ATTR = _IOW(_K, 0xE3, 24)

_TTY = (_TCGETS, _TCSETS, _TIOCGWINSZ, _FIONBIO)

#: Firecracker, x86_64: the ioctls each thread's filter allows
_FC_VCPU = (
    api.KVM_RUN, api.KVM_GET_MP_STATE, api.KVM_GET_VCPU_EVENTS, _KVM_GET_LAPIC,
    kx.KVM_GET_SREGS, kx.KVM_GET_REGS, kx.KVM_GET_MSRS, _KVM_GET_CPUID2, _KVM_GET_DEBUGREGS,
    _KVM_GET_XSAVE, _KVM_GET_XSAVE2, _KVM_GET_XCRS, _KVM_GET_TSC_KHZ, _KVM_KVMCLOCK_CTRL,
    _KVM_SET_GSI_ROUTING, _KVM_IRQFD, _TUNSETOFFLOAD,
)  # fmt: skip
_FC_VMM = (
    *_TTY, _KVM_GET_DIRTY_LOG, _KVM_GET_IRQCHIP, _KVM_GET_CLOCK, _KVM_GET_PIT2,
    _KVM_SET_USER_MEMORY_REGION, _KVM_IOEVENTFD, _KVM_IRQFD, _TUNSETIFF, _TUNSETOFFLOAD,
    _TUNSETVNETHDRSZ,
)  # fmt: skip
_FC_API = (_FIONBIO,)

#: cloud-hypervisor, KVM on x86_64
_CH_VCPU = (
    _KVM_CHECK_EXTENSION, _KVM_IOEVENTFD, _KVM_IRQFD, _KVM_SET_DEVICE_ATTR, _KVM_SET_GSI_ROUTING,
    _KVM_SET_USER_MEMORY_REGION, _KVM_SET_USER_MEMORY_REGION2, api.KVM_RUN, kx.KVM_NMI,
    _KVM_GET_NESTED_STATE, _KVM_SET_NESTED_STATE,
)  # fmt: skip
_CH_VMM = (
    *_TTY, _FIOCLEX, _TUNSETIFF, _TUNSETOFFLOAD, _TUNSETVNETHDRSZ,
    _KVM_CHECK_EXTENSION, _KVM_CREATE_DEVICE, _KVM_CREATE_IRQCHIP, _KVM_CREATE_VCPU,
    _KVM_CREATE_VM, _KVM_ENABLE_CAP, _KVM_GET_API_VERSION, _KVM_GET_DEVICE_ATTR,
    _KVM_GET_DIRTY_LOG, api.KVM_GET_MP_STATE, _KVM_GET_ONE_REG, kx.KVM_GET_REGS,
    _KVM_GET_REG_LIST, _KVM_GET_SUPPORTED_CPUID, api.KVM_GET_VCPU_EVENTS,
    _KVM_GET_VCPU_MMAP_SIZE, _KVM_IOEVENTFD, _KVM_IRQFD, api.KVM_RUN, _KVM_SET_DEVICE_ATTR,
    _KVM_HAS_DEVICE_ATTR, _KVM_SET_GSI_ROUTING, _KVM_SET_MP_STATE, _KVM_SET_ONE_REG,
    _KVM_SET_REGS, _KVM_SET_USER_MEMORY_REGION, _KVM_SET_USER_MEMORY_REGION2,
    api.KVM_SET_VCPU_EVENTS, kx.KVM_NMI, _KVM_GET_NESTED_STATE, _KVM_SET_NESTED_STATE,
    _KVM_CREATE_PIT2, _KVM_GET_CLOCK, _KVM_GET_CPUID2, _KVM_GET_FPU, _KVM_GET_LAPIC,
    kx.KVM_GET_MSRS, kx.KVM_GET_SREGS, _KVM_GET_TSC_KHZ, _KVM_GET_XCRS, _KVM_GET_XSAVE,
    _KVM_GET_XSAVE2, _KVM_KVMCLOCK_CTRL, _KVM_SET_CLOCK, _KVM_SET_CPUID2, _KVM_SET_FPU,
    _KVM_SET_IDENTITY_MAP_ADDR, _KVM_SET_LAPIC, _KVM_SET_SREGS, _KVM_SET_TSC_KHZ,
    _KVM_SET_TSS_ADDR, _KVM_SET_MSRS, _KVM_SET_XCRS, _KVM_SET_XSAVE, _KVM_SET_GUEST_DEBUG,
    _KVM_TRANSLATE,
)  # fmt: skip
_CH_HTTP: Tuple[int, ...] = (_FIONBIO,)
_CH_SIGNAL = _TTY


def allow_ioctls(audit_arch: int, ioctl_nr: int, allowed: Sequence[int], default: int) -> bytes:
    """A filter that lets only the ``allowed`` ioctl requests through.

    Every other ioctl (and a foreign arch) gets ``default``; the request is
    compared on its low 32 bits, as the VMMs' filters do. Other syscalls are allowed.
    """
    requests = sorted({r & 0xFFFFFFFF for r in allowed})
    n = len(requests)
    b = seccomp
    prog: List[seccomp.Insn] = [
        (b.BPF_LD | b.BPF_W | b.BPF_ABS, 0, 0, b.OFF_ARCH),
        (b.BPF_JMP | b.BPF_JEQ | b.BPF_K, 0, n + 5, audit_arch),  # foreign arch: default
        (b.BPF_LD | b.BPF_W | b.BPF_ABS, 0, 0, b.OFF_NR),
        (b.BPF_JMP | b.BPF_JEQ | b.BPF_K, 0, n + 2, ioctl_nr),  # not ioctl: allow
        (b.BPF_LD | b.BPF_W | b.BPF_ABS, 0, 0, b.off_arg(1)),
    ]
    for i, req in enumerate(requests):
        prog.append((b.BPF_JMP | b.BPF_JEQ | b.BPF_K, n - i, 0, req))
    prog.append((b.BPF_JMP | b.BPF_JA, 0, 0, 1))  # no listed request matched: default
    prog.append((b.BPF_RET | b.BPF_K, 0, 0, b.SECCOMP_RET_ALLOW))
    prog.append((b.BPF_RET | b.BPF_K, 0, 0, default))
    return seccomp.encode_program(prog)


@dataclass(frozen=True)
class ThreadSpec:
    """A non-vCPU thread of a VMM: its name and the filters it runs under (oldest first)."""

    name: str
    filters: Tuple[str, ...] = ()


@dataclass(frozen=True)
class Profile:
    """How one VMM lays out its threads, fds, vcpu ids and sandbox."""

    name: str
    #: the main thread's comm (the process name the kernel shows, 15 bytes)
    main_name: str
    vcpu_name: Callable[[int], str]  # from the VMM's CPU index
    #: which thread creates the vCPU fds: "vcpu" (each its own), "main", or "vmm" (a
    #: thread of that name which then spawns the vCPU threads)
    creator: str
    #: threads started besides the main and vCPU threads (they idle)
    threads: Tuple[ThreadSpec, ...] = ()
    dup_vcpu_fds: bool = False  # a second, inheritable fd per vCPU (Firecracker)
    stats_fd: bool = False  # a KVM_GET_STATS_FD fd per vCPU (QEMU)
    apic_ids: bool = False  # x86 vcpu ids are APIC ids of the topology
    #: filter name -> allowed ioctl requests; each thread's filters are listed by
    #: name in order of installation
    filters: Mapping[str, Tuple[int, ...]] = field(default_factory=dict)
    main_filters: Tuple[str, ...] = ()
    vcpu_filters: Tuple[str, ...] = ()
    #: what a SIGSYS does to the VMM: "exit-148" (Firecracker) or "sigsys" (dies of it)
    on_sigsys: str = ""

    @property
    def sandboxed(self) -> bool:
        return bool(self.filters)

    def filter_program(self, name: str, audit_arch: int, ioctl_nr: int) -> bytes:
        return allow_ioctls(audit_arch, ioctl_nr, self.filters[name], seccomp.SECCOMP_RET_TRAP)


PROFILES: Mapping[str, Profile] = MappingProxyType(
    {
        "qemu": Profile(
            name="qemu",
            main_name="qemu-system-x86",
            vcpu_name=lambda n: f"CPU {n}/KVM",
            creator="vcpu",
            threads=(ThreadSpec("call_rcu"),),
            stats_fd=True,
            apic_ids=True,
        ),
        "firecracker": Profile(
            name="firecracker",
            main_name="firecracker",
            vcpu_name=lambda n: f"fc_vcpu {n}",
            creator="main",
            threads=(ThreadSpec("fc_api", ("api",)),),
            dup_vcpu_fds=True,
            filters=MappingProxyType({"vmm": _FC_VMM, "api": _FC_API, "vcpu": _FC_VCPU}),
            main_filters=("vmm",),
            vcpu_filters=("vcpu",),
            on_sigsys="exit-148",
        ),
        "cloud-hypervisor": Profile(
            name="cloud-hypervisor",
            main_name="cloud-hypervisor",
            vcpu_name=lambda n: f"vcpu{n}",
            creator="vmm",
            threads=(
                ThreadSpec("vmm", ("vmm",)),
                ThreadSpec("http-server", ("http",)),
                ThreadSpec("vmm_signal_handler", ("vmm", "signal")),
            ),
            apic_ids=True,
            filters=MappingProxyType(
                {"vmm": _CH_VMM, "vcpu": _CH_VCPU, "http": _CH_HTTP, "signal": _CH_SIGNAL}
            ),
            vcpu_filters=("vmm", "vcpu"),
            on_sigsys="sigsys",
        ),
        "crosvm": Profile(
            name="crosvm",
            main_name="crosvm",
            vcpu_name=lambda n: f"crosvm_vcpu{n}",
            creator="vcpu",
        ),
        "kvmtool": Profile(
            name="kvmtool",
            main_name="lkvm",
            vcpu_name=lambda n: f"kvm-vcpu-{n}",
            creator="main",
        ),
    }
)


def _width(count: int) -> int:
    """Bits for ``count`` values (x86 topology: ceil(log2(count)))."""
    return max(count - 1, 0).bit_length()


def apic_ids(count: int, sockets: int, cores: int, threads: int) -> Tuple[int, ...]:
    """The APIC ids of the first ``count`` CPUs of an x86 topology, as QEMU and
    cloud-hypervisor number them: each level gets ceil(log2(n)) bits, so that
    ``-smp 6,sockets=2,cores=3`` gives 0, 1, 2, 4, 5, 6."""
    thread_w, core_w = _width(threads), _width(cores)
    out = []
    for index in range(count):
        thread = index % threads
        core = (index // threads) % cores
        socket = index // (threads * cores)
        out.append(socket << (core_w + thread_w) | core << thread_w | thread)
    return tuple(out)


def parse_topology(text: str) -> Tuple[int, int, int]:
    """``SOCKETS,CORES,THREADS`` (each >= 1)."""
    parts = text.split(",")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 1:
        raise ValueError(f"--topology takes SOCKETS,CORES,THREADS (each >= 1), not {text!r}")
    return values[0], values[1], values[2]


def vcpu_ids(
    profile: Optional[Profile], vcpus: int, topology: Optional[Tuple[int, int, int]]
) -> Tuple[int, ...]:
    """The KVM vcpu ids of a VM with ``vcpus`` CPUs under ``profile``."""
    if topology is None:
        return tuple(range(vcpus))
    sockets, cores, threads = topology
    if vcpus > sockets * cores * threads:
        raise ValueError(f"--topology {sockets},{cores},{threads} has fewer than {vcpus} CPUs")
    if profile is not None and not profile.apic_ids:
        return tuple(range(vcpus))  # the VMM numbers its vCPUs by index
    return apic_ids(vcpus, sockets, cores, threads)
