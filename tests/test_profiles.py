"""The test VM's VMM profiles, and serrinj against every one of them.

``python -m serrinj.testvm --profile NAME`` lays the built-in VMM out as that VMM
does (serrinj.testvm.profiles): thread names, which thread creates the vCPU fds,
Firecracker's duplicated fds, QEMU's stats fds, APIC vcpu ids, per-thread seccomp
filters whose default action is trap, and a SIGSYS that kills the VMM as the real
one does.

The matrix runs every profile x guest mode (halt, spin, futex) x debugfs (not
mounted; mounted in a private mount namespace of the serrinj command only, never
in the host's): ``serrinj list`` must map every vCPU without ``--probe`` wherever the
VMM's layout allows it (and never map one wrongly), ``nmi`` and ``mce`` must reach
the guest, or, where the sandbox allows them on no thread (Firecracker), be refused
with a message naming the filter, exit 5, send nothing and leave the VMM running;
no filter may ever trap. One VM serves both debugfs cells of a (profile, mode).
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

from serrinj.codec import mce
from serrinj.kvm import api
from serrinj.kvm import x86_64 as kx
from serrinj.remote import seccomp
from serrinj.remote.arch import host_arch
from serrinj.testvm import profiles
from serrinj.testvm.process import TestVmProcess
from tests.helpers import serrinj_cli
from tests.helpers.testvm import VmFactory, wait_guest_ready
from tests.test_seccomp import Child

ARCH = host_arch()
IOCTL = ARCH.nr["ioctl"]
X86 = os.uname().machine == "x86_64"
INJECTIONS = (api.KVM_SET_VCPU_EVENTS, kx.KVM_NMI, kx.KVM_X86_SET_MCE)
O_CLOEXEC = 0o2000000


def _verdict(profile: str, filters: Tuple[str, ...], request: int) -> seccomp.Action:
    p = profiles.PROFILES[profile]
    progs = [
        seccomp.decode_program(p.filter_program(f, ARCH.audit_arch, IOCTL))
        for f in reversed(filters)  # the kernel runs the newest first
    ]
    data = seccomp.seccomp_data(IOCTL, ARCH.audit_arch, 0x1000, (7, request, 0))
    return seccomp.evaluate(progs, data).action


# ---------------------------------------------------------------------- the profiles as data
def test_apic_ids_follow_the_x86_topology() -> None:
    assert profiles.apic_ids(6, 2, 3, 1) == (0, 1, 2, 4, 5, 6)  # QEMU -smp 6,sockets=2,cores=3
    assert profiles.apic_ids(4, 2, 3, 1) == (0, 1, 2, 4)  # the first 4 of them
    assert profiles.apic_ids(8, 2, 2, 2) == tuple(range(8))  # powers of two: contiguous
    assert profiles.apic_ids(12, 2, 3, 2)[4:7] == (4, 5, 8)  # 2 threads x 3 cores: 3 bits
    assert profiles.vcpu_ids(profiles.PROFILES["qemu"], 4, (2, 3, 1)) == (0, 1, 2, 4)
    assert profiles.vcpu_ids(profiles.PROFILES["cloud-hypervisor"], 4, (2, 3, 1)) == (0, 1, 2, 4)
    for index_vmm in ("firecracker", "crosvm", "kvmtool"):
        assert profiles.vcpu_ids(profiles.PROFILES[index_vmm], 4, (2, 3, 1)) == (0, 1, 2, 3)


def test_firecracker_allows_no_injection_ioctl_on_any_thread() -> None:
    for thread_filters in (("vmm",), ("api",), ("vcpu",)):
        for req in INJECTIONS:
            assert _verdict("firecracker", thread_filters, req) is seccomp.Action.TRAP, hex(req)
    for req in (api.KVM_RUN, api.KVM_GET_VCPU_EVENTS, api.KVM_GET_MP_STATE, kx.KVM_GET_REGS):
        assert _verdict("firecracker", ("vcpu",), req) is seccomp.Action.ALLOW, hex(req)
    assert _verdict("firecracker", ("vmm",), api.KVM_GET_VCPU_EVENTS) is seccomp.Action.TRAP


def test_cloud_hypervisor_allows_nmi_on_vcpus_and_events_on_the_vmm_thread() -> None:
    vcpu = ("vmm", "vcpu")  # stacked: the vCPU thread is spawned by the vmm thread
    assert _verdict("cloud-hypervisor", vcpu, kx.KVM_NMI) is seccomp.Action.ALLOW
    assert _verdict("cloud-hypervisor", vcpu, api.KVM_RUN) is seccomp.Action.ALLOW
    for req in (api.KVM_GET_VCPU_EVENTS, api.KVM_SET_VCPU_EVENTS, kx.KVM_X86_SET_MCE):
        assert _verdict("cloud-hypervisor", vcpu, req) is seccomp.Action.TRAP, hex(req)
    for req in (api.KVM_GET_VCPU_EVENTS, api.KVM_SET_VCPU_EVENTS, kx.KVM_NMI, kx.KVM_GET_MSRS):
        assert _verdict("cloud-hypervisor", ("vmm",), req) is seccomp.Action.ALLOW, hex(req)
    assert _verdict("cloud-hypervisor", ("vmm",), kx.KVM_X86_SET_MCE) is seccomp.Action.TRAP
    assert not profiles.PROFILES["cloud-hypervisor"].main_filters  # the main thread: none


def test_allow_list_lets_other_syscalls_and_traps_foreign_arches() -> None:
    prog = seccomp.decode_program(
        profiles.allow_ioctls(ARCH.audit_arch, IOCTL, [0x10], seccomp.SECCOMP_RET_TRAP)
    )
    run = seccomp.run
    assert run(prog, seccomp.seccomp_data(IOCTL, ARCH.audit_arch, 0, (1, 0x10))) == (
        seccomp.SECCOMP_RET_ALLOW
    )
    assert run(prog, seccomp.seccomp_data(IOCTL, ARCH.audit_arch, 0, (1, 0x11))) == (
        seccomp.SECCOMP_RET_TRAP
    )
    # the request is compared on its low 32 bits, as the VMMs' filters do
    assert run(prog, seccomp.seccomp_data(IOCTL, ARCH.audit_arch, 0, (1, 0x10 | 1 << 32))) == (
        seccomp.SECCOMP_RET_ALLOW
    )
    assert run(prog, seccomp.seccomp_data(ARCH.nr["getpid"], ARCH.audit_arch, 0, ())) == (
        seccomp.SECCOMP_RET_ALLOW
    )
    assert run(prog, seccomp.seccomp_data(IOCTL, 0x40000003, 0, (1, 0x10))) == (
        seccomp.SECCOMP_RET_TRAP
    )


@pytest.fixture
def child() -> Iterator[Child]:
    """A process under Firecracker's vCPU filter that runs ioctl probes and counts SIGSYS."""
    c = Child([profiles.PROFILES["firecracker"].filter_program("vcpu", ARCH.audit_arch, IOCTL)])
    try:
        yield c
    finally:
        c.close()


def test_profile_filter_traps_in_the_kernel_as_evaluated(child: Child) -> None:
    """The kernel, running the Firecracker vCPU filter, traps exactly what the evaluator says."""
    traps = 0
    for req in (api.KVM_RUN, api.KVM_GET_VCPU_EVENTS, *INJECTIONS, 0x5401):
        observed = int(child.ask(f"{req:x}").split()[1])
        if _verdict("firecracker", ("vcpu",), req) is seccomp.Action.TRAP:
            traps += 1
            # skipped and rolled back by the kernel (no errno), SIGSYS sent instead
            assert observed == 0, hex(req)
        else:
            assert observed == errno.ENOTTY, hex(req)  # ran: fd 0 is a pipe
        assert child.ask("sigsys") == f"sigsys {traps}", hex(req)
    assert traps == 4


# ---------------------------------------------------------------------- real VMs
PROFILE_NAMES = tuple(profiles.PROFILES)
MODES = ("halt", "spin", "futex")
#: QEMU and cloud-hypervisor number x86 vCPUs by APIC id: 4 CPUs of a 2-socket,
#: 3-core topology (QEMU -smp 4,sockets=2,cores=3,maxcpus=6) are 0, 1, 2 and 4
TOPOLOGY_ARGS = ("--vcpus", "4", "--topology", "2,3,1")
#: how many times a cell runs ``list`` for a vCPU the layout lets it map
LIST_LOOKS = 3


def _profile_vm(profile: str) -> Tuple[int, List[str]]:
    """(vcpus, testvm options) of a test VM laid out like ``profile``."""
    p = profiles.PROFILES[profile]
    extra = ["--profile", profile]
    vcpus = 2
    if p.apic_ids:
        extra += TOPOLOGY_ARGS[2:]
        vcpus = 4
    return vcpus, extra


def _comm(pid: int, tid: int) -> str:
    with open(f"/proc/{pid}/task/{tid}/comm") as f:
        return f.read().strip()


def _seccomp_filters(pid: int, tid: int) -> int:
    with open(f"/proc/{pid}/task/{tid}/status") as f:
        for line in f:
            if line.startswith("Seccomp_filters:"):
                return int(line.split()[1])
    return -1


def _fd_flags(pid: int, fd: int) -> int:
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("flags:"):
                return int(line.split()[1], 8)
    raise AssertionError(f"no flags in /proc/{pid}/fdinfo/{fd}")


def _kvm_fds(pid: int) -> Dict[str, List[int]]:
    out: Dict[str, List[int]] = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if link.startswith("anon_inode:kvm-vcpu"):
            out.setdefault(link, []).append(int(name))
    return out


@pytest.mark.kvm
@pytest.mark.root
@pytest.mark.skipif(not X86, reason="the profiles model the VMMs' x86_64 layouts")
@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_profile_layout_seen_from_proc(profile: str, start_vm: VmFactory) -> None:
    """What /proc shows of each profile: names, fds, ids, filters."""
    p = profiles.PROFILES[profile]
    vcpus, extra = _profile_vm(profile)
    vm = start_vm(vcpus, "halt", extra, ready_timeout=30)
    pid = vm.pid
    assert _comm(pid, pid) == p.main_name[:15]
    ids = [v.vcpu_id for v in vm.vcpus]
    assert ids == ([0, 1, 2, 4] if p.apic_ids else [0, 1])
    fds = _kvm_fds(pid)
    for index, v in enumerate(vm.vcpus):
        assert _comm(pid, v.tid) == p.vcpu_name(index)[:15]
        assert sorted(fds[f"anon_inode:kvm-vcpu:{v.vcpu_id}"]) == sorted(v.fds)
        assert len(v.fds) == (2 if p.dup_vcpu_fds else 1)
        assert _fd_flags(pid, v.fd) & O_CLOEXEC  # KVM_CREATE_VCPU: always close-on-exec
        for dup in v.fds[1:]:
            assert not _fd_flags(pid, dup) & O_CLOEXEC  # Firecracker's plain dup(2)
        stats = fds.get(f"anon_inode:kvm-vcpu-stats:{v.vcpu_id}", [])
        assert stats == ([v.stats_fd] if p.stats_fd else []), stats
        assert _seccomp_filters(pid, v.tid) == len(p.vcpu_filters)
    assert _seccomp_filters(pid, pid) == len(p.main_filters)
    assert sorted(t["name"] for t in vm.threads) == sorted(t.name for t in p.threads)
    for t in vm.threads:
        assert _comm(pid, t["tid"]) == t["name"][:15]
        assert _seccomp_filters(pid, t["tid"]) == len(t["filters"])


@dataclass
class _Current:
    key: Optional[Tuple[str, str]] = None
    vm: Optional[TestVmProcess] = None
    bank_addr: int = 0x7000


@pytest.fixture(scope="module")
def _vms() -> Iterator[_Current]:
    """One VM per (profile, mode), kept for its debugfs cells; stopped by pid at the end."""
    current = _Current()
    try:
        yield current
    finally:
        if current.vm is not None:
            current.vm.stop()


def _vm_for(current: _Current, profile: str, mode: str) -> TestVmProcess:
    if current.key != (profile, mode) or current.vm is None or not current.vm.alive():
        if current.vm is not None:
            current.vm.stop()
            current.vm = None
        # not the start_vm fixture: one VM serves every cell of a (profile, mode),
        # across tests, and the module fixture _vms stops the last one
        vcpus, extra = _profile_vm(profile)
        current.vm = TestVmProcess.start(vcpus=vcpus, mode=mode, extra_args=extra)
        current.key = (profile, mode)
        wait_guest_ready(current.vm, 30)
    return current.vm


def _mappable(profile: str, mode: str, debugfs: bool, index: int, vcpu_id: int) -> bool:
    """Whether the VMM's layout lets ``list`` map this vCPU without --probe.

    debugfs names the thread of every vCPU that has run; a halted guest's thread
    waits inside KVM_RUN, whose arguments name the fd; otherwise only a thread
    name is left, and a name counts by the VMM's CPU index, which is the vcpu id
    only when the ids are contiguous.
    """
    return debugfs or mode == "halt" or index == vcpu_id


def _counters(vm: TestVmProcess) -> Dict[int, Tuple[int, int]]:
    out = {}
    for info in vm.vcpus:
        mark = vm.mark()
        vm.command({"cmd": "heartbeat", "vcpu": info.vcpu_id})
        hb = vm.wait_event(
            lambda e, v=info.vcpu_id: e["event"] == "heartbeat" and e.get("vcpu") == v, 10, mark
        )
        out[info.vcpu_id] = (hb["nmi_count"], hb["mce_count"])
    return out


CELLS = [
    pytest.param(p, m, d, id=f"{p}-{m}-{'debugfs' if d else 'no-debugfs'}")
    for p in PROFILE_NAMES
    for m in MODES
    for d in (False, True)
]


@pytest.mark.kvm
@pytest.mark.root
@pytest.mark.skipif(not X86, reason="the profiles model the VMMs' x86_64 layouts")
@pytest.mark.parametrize(("profile", "mode", "debugfs"), CELLS)
def test_matrix(_vms: _Current, profile: str, mode: str, debugfs: bool) -> None:
    """One cell: list maps the vCPUs, nmi and mce reach the guest or are refused cleanly."""
    p = profiles.PROFILES[profile]
    vm = _vm_for(_vms, profile, mode)
    truth = {v.vcpu_id: v.tid for v in vm.vcpus}
    problems: List[str] = []
    print(f"{profile} {mode} debugfs={'mounted' if debugfs else 'unmounted'} pid {vm.pid}")

    # --- list, without --probe. A halted guest's thread is caught on a CPU now and
    # then (woken by its timer, still inside KVM_RUN): a few looks are allowed for a
    # vCPU to be mapped; a wrong mapping or a vCPU listed twice fails at once.
    unmapped: List[int] = []
    for look in range(1, LIST_LOOKS + 1):
        res = serrinj_cli.run("list", "--pid", vm.pid, "--json", debugfs=debugfs)
        assert res.rc == 0, res
        vms = [v for v in res.data["vms"] if v["pid"] == vm.pid]
        assert len(vms) == 1, res
        listed: List[Dict[str, Any]] = vms[0]["vcpus"]
        ids = [v["vcpu_id"] for v in listed]
        shown = [(v["vcpu_id"], v["fd"], v["tid"], v["mapped_by"]) for v in listed]
        print(f"  list #{look}: {shown}")
        if sorted(ids) != sorted(truth):
            problems.append(f"list reports vCPU ids {ids}, the VM has {sorted(truth)} (each once)")
        for v in listed:
            if v["tid"] is not None and v["tid"] != truth.get(v["vcpu_id"]):
                problems.append(f"vCPU {v['vcpu_id']} mapped to {v['tid']} by {v['mapped_by']}")
        unmapped = [
            vcpu_id
            for index, (vcpu_id, tid) in enumerate(truth.items())
            if _mappable(profile, mode, debugfs, index, vcpu_id)
            and not any(v["vcpu_id"] == vcpu_id and v["tid"] == tid for v in listed)
        ]
        if problems or not unmapped:
            break
        time.sleep(0.1)
    for vcpu_id in unmapped:
        problems.append(
            f"vCPU {vcpu_id} (thread {truth[vcpu_id]}) is not mapped without --probe"
            f" in {LIST_LOOKS} looks"
        )

    # --- nmi and mce on every vCPU
    refused = p.on_sigsys == "exit-148"  # Firecracker: allowed on no thread
    before = _counters(vm) if refused else {}
    _vms.bank_addr += 0x1000
    srao = mce.preset("srao").build(bank=1, addr=_vms.bank_addr)
    for what, argv in (
        ("nmi", ["nmi"]),
        ("mce", ["mce", "--bank", "1", "--status", hex(srao.status), "--addr", hex(srao.addr)]),
    ):
        mark = vm.mark()
        res = serrinj_cli.run(*argv, "--pid", vm.pid, "--vcpu", "all", debugfs=debugfs)
        print(f"  {what}: exit {res.rc} {res.stderr.strip().splitlines()[:1]}")
        if refused:
            if res.rc != 5 or "seccomp filter" not in res.stderr:
                problems.append(f"{what} was not refused by name of the filter: {res}")
            time.sleep(0.2)
            sent = [e for e in vm.events_seen[mark:] if e["event"] in ("nmi", "mce")]
            if sent:
                problems.append(f"{what} was refused, yet the guest saw {sent}")
            continue
        if res.rc != 0:
            problems.append(f"{what} failed: {res}")
            continue
        for vcpu_id in truth:
            try:
                event = vm.wait_event(
                    lambda e, v=vcpu_id, w=what: e["event"] == w and e.get("vcpu") == v,
                    10,
                    mark,
                )
            except Exception as err:  # collected, reported below
                problems.append(f"the guest did not observe the {what} on vCPU {vcpu_id}: {err}")
                continue
            if what == "mce" and [(b["bank"], b["status"]) for b in event["banks"]] != [
                (1, srao.status)
            ]:
                problems.append(f"vCPU {vcpu_id} saw machine check {event}")
    if refused and vm.alive():
        after = _counters(vm)
        if after != before:
            problems.append(f"the guest's counters moved: {before} -> {after}")

    # --- the VMM survived and no filter ever trapped
    if not vm.alive():
        problems.append(f"the VMM died (status {vm.returncode})")
    else:
        count = vm.sigsys_count()
        if count:
            problems.append(f"the VMM's filters trapped {count} time(s)")
    bad = [e for e in vm.events_seen if e["event"] in ("sigsys", "exit", "error")]
    bad += [e for e in vm.events_seen if e["event"] == "guest-check-failed"]
    if bad:
        problems.append(f"the VMM reported {bad}")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------- the sandbox's teeth
@pytest.mark.kvm
@pytest.mark.skipif(not X86, reason="the profiles model the VMMs' x86_64 layouts")
@pytest.mark.parametrize(
    ("profile", "command", "status"),
    [
        ("firecracker", {"cmd": "nmi", "vcpu": 1}, 148),  # FcExitCode::BadSyscall
        ("cloud-hypervisor", {"cmd": "mce", "vcpu": 0, "bank": 1, "status": 0}, -31),  # SIGSYS
    ],
    ids=["firecracker-exit-148", "cloud-hypervisor-killed-by-sigsys"],
)
def test_a_trapped_call_kills_the_vmm_as_the_real_one(
    profile: str, command: Dict[str, Any], status: int, start_vm: VmFactory
) -> None:
    """The VMM's own forbidden ioctl (on its vCPU thread) is trapped, reported and fatal:
    what the matrix's "the filter never trapped" would see."""
    vcpus, extra = _profile_vm(profile)
    vm = start_vm(vcpus, "halt", extra, ready_timeout=30)
    mark = vm.mark()
    vm.command(command)
    event = vm.wait_event(lambda e: e["event"] == "sigsys", 10, mark)
    assert event["count"] == 1
    assert vm.wait_exit(10) == status


@pytest.mark.kvm
@pytest.mark.skipif(not X86, reason="the profiles model the VMMs' x86_64 layouts")
def test_on_sigsys_count_keeps_the_vmm_running_and_counts(start_vm: VmFactory) -> None:
    vm = start_vm(2, "halt", ["--profile", "firecracker", "--on-sigsys", "count"], ready_timeout=30)
    assert vm.sigsys_count() == 0
    for _ in range(2):
        mark = vm.mark()
        vm.command({"cmd": "nmi", "vcpu": 1})
        vm.wait_event(lambda e: e["event"] == "sigsys", 10, mark)
    assert vm.sigsys_count() == 2
    assert vm.alive()


# ---------------------------------------------------------------------- probing
@pytest.mark.kvm
@pytest.mark.root
@pytest.mark.skipif(not X86, reason="the profiles model the VMMs' x86_64 layouts")
@pytest.mark.parametrize("debugfs", [False, True], ids=["no-debugfs", "debugfs"])
def test_a_yielding_vcpu_whose_name_is_not_its_id_is_found(
    debugfs: bool, start_vm: VmFactory
) -> None:
    """QEMU's 4th CPU of -smp 4,sockets=2,cores=3 is vCPU 4 in thread "CPU 3/KVM". A
    vCPU whose guest exits to the VMM a lot keeps its thread waiting outside KVM_RUN
    (here a futex, 200 ms at a time) while the others compute: neither KVM_RUN's
    arguments nor the name tell its vCPU, so without debugfs serrinj has to find it by
    probing, and must."""
    vm = start_vm(
        vcpus=4,
        mode="spin",
        extra=[
            "--profile", "qemu", "--topology", "2,3,1", "--vcpu-mode", "4=futex",
            "--yield-ms", "200",
        ],
        ready_timeout=30,
    )  # fmt: skip
    assert vm.vcpu(4).thread_name == "CPU 3/KVM"
    mark = vm.mark()
    res = serrinj_cli.run("nmi", "--pid", vm.pid, "--vcpu", "4", debugfs=debugfs)
    assert res.rc == 0, res
    vm.wait_event(lambda e: e["event"] == "nmi" and e["vcpu"] == 4, 10, mark)
    assert vm.alive()
