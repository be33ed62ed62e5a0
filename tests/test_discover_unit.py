"""Discovery against a fake /proc tree: kernel workers in a VMM's task list, several
fds on one vCPU, and the weighing of every source's evidence (a fake debugfs tree).

KVM's ``kvm-nx-lpage-recovery`` worker lives in the VMM's task list (a kernel
thread, PF_KTHREAD, before Linux 6.13; a user worker, PF_USER_WORKER, since),
and its ``syscall`` file even shows the vCPU's ``ioctl(fd, KVM_RUN)`` line
(BRIEF section 6). It cannot run a syscall for serrinj, so discovery must never
map a vCPU to it. Discovery reads a /proc tree built here
(``tests.helpers.fakeproc``, passed as its ``HostPaths``), so the flags are exactly
those of such a worker on any host.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Dict, List, Optional, Sequence, Tuple

import pytest

from serrinj.host import procfs
from serrinj.kvm.api import KVM_RUN
from serrinj.remote.arch import host_arch
from serrinj.target import discover
from tests.helpers.fakeproc import OTHER_FLAGS, RUNNING, FakeProc, Task, kvm_run_line

VMM = 4194999  # above any pid_max: never this test's own pid
MAIN, VCPU_THREAD, WORKER = VMM, VMM + 1, VMM + 7
VCPU_FD, VM_FD = 11, 10
ARCH = host_arch()


def _kvm_run_line(fd: int) -> str:
    return kvm_run_line(ARCH.nr["ioctl"], fd, KVM_RUN)


def build_vmm(fake: FakeProc, tasks: Dict[int, Task]) -> None:
    """/proc/VMM with a VM fd, one vCPU fd (vCPU 0) and ``tasks``:
    tid -> (comm, flags, syscall line)."""
    fake.process(VMM, "qemu-system-x86", ["qemu-system-x86_64", "-accel", "kvm"])
    fake.fd(VMM, VM_FD, "anon_inode:kvm-vm")
    fake.fd(VMM, VCPU_FD, "anon_inode:kvm-vcpu:0")
    fake.fd(VMM, 3, "/dev/kvm")
    for tid, (comm, flags, syscall) in tasks.items():
        fake.task(VMM, tid, comm, flags, syscall)


@pytest.fixture
def fake_proc(tmp_path: Path) -> FakeProc:
    """An empty /proc; nothing of the real host leaks in: no debugfs, no libvirt names."""
    return FakeProc(tmp_path)


def _worker_tasks(vcpu_name: str, worker_flags: int) -> Dict[int, Task]:
    return {
        MAIN: (
            "qemu-system-x86",
            OTHER_FLAGS,
            "271 0x5 0x1 0x0 0x0 0x8 0x0 0x7ffc2000 0x7f002000\n",
        ),
        VCPU_THREAD: (vcpu_name, OTHER_FLAGS, "running\n"),  # busy in the guest
        WORKER: ("kvm-nx-lpage-re", worker_flags, _kvm_run_line(VCPU_FD)),
    }


def _only_vm(fake: FakeProc) -> discover.Vm:
    vms = discover.scan(ARCH, fake.host)
    assert [vm.pid for vm in vms] == [VMM]
    return vms[0]


WORKER_FLAGS = {
    "kthread": procfs.PF_KTHREAD | OTHER_FLAGS,
    "user-worker": procfs.PF_USER_WORKER | OTHER_FLAGS,
}


@pytest.mark.parametrize("flags", WORKER_FLAGS.values(), ids=WORKER_FLAGS.keys())
@pytest.mark.parametrize("vcpu_name", ["CPU 0/KVM", "worker-of-some-vmm"])
def test_a_kernel_worker_showing_the_vcpus_kvm_run_is_never_its_thread(
    fake_proc: FakeProc, flags: int, vcpu_name: str
) -> None:
    """The worker's syscall file names the vCPU fd, but discovery maps vCPU 0 to its
    real thread: by the VMM's thread name, or as the one candidate left."""
    build_vmm(fake_proc, _worker_tasks(vcpu_name, flags))
    vm = _only_vm(fake_proc)
    assert WORKER not in {t.tid for t in vm.threads}
    assert {t.tid for t in vm.threads} == {MAIN, VCPU_THREAD}
    (vcpu,) = vm.vcpus
    assert (vcpu.vcpu_id, vcpu.fd) == (0, VCPU_FD)
    assert vcpu.thread is not None and vcpu.thread.tid == VCPU_THREAD
    assert vcpu.mapped_by == ("name" if vcpu_name == "CPU 0/KVM" else "single")


@pytest.mark.parametrize("flags", WORKER_FLAGS.values(), ids=WORKER_FLAGS.keys())
def test_a_vcpu_with_only_a_kernel_worker_to_map_stays_unmapped(
    fake_proc: FakeProc, flags: int
) -> None:
    """The vCPU's own thread is blocked elsewhere and has no telling name: the vCPU
    stays unmapped (a probe or the paused fallback decides later), never the worker."""
    tasks = _worker_tasks("worker-of-some-vmm", flags)
    tasks[VCPU_THREAD] = (
        "worker-of-some-vmm",
        OTHER_FLAGS,
        "202 0x7f00 0x80 0x0 0x0 0x0 0x0 0x1 0x2\n",
    )
    build_vmm(fake_proc, tasks)
    (vcpu,) = _only_vm(fake_proc).vcpus
    assert vcpu.thread is None and vcpu.mapped_by == ""


def test_the_same_task_without_the_worker_flags_is_mapped(fake_proc: FakeProc) -> None:
    """The control: the tree is read as intended, and only the flags exclude the
    worker (a user thread blocked in that KVM_RUN is the vCPU's thread)."""
    build_vmm(fake_proc, _worker_tasks("worker-of-some-vmm", OTHER_FLAGS))
    (vcpu,) = _only_vm(fake_proc).vcpus
    assert vcpu.thread is not None and vcpu.thread.tid == WORKER
    assert vcpu.thread.state == "in-kvm-run" and vcpu.mapped_by == "syscall"


def test_the_fake_stat_is_parsed_as_the_kernel_writes_it(fake_proc: FakeProc) -> None:
    build_vmm(fake_proc, _worker_tasks("CPU 0/KVM", WORKER_FLAGS["kthread"]))
    st = procfs.stat(VMM, WORKER, fake_proc.proc)
    assert st == procfs.Stat(state="S", flags=WORKER_FLAGS["kthread"], starttime=12345)
    assert st.kernel_thread and not procfs.stat(VMM, VCPU_THREAD, fake_proc.proc).kernel_thread


# ====================================================================== several fds, every source
DUP_FD = 14  # a second fd on vCPU 0 (Firecracker dups every vCPU fd)
VCPU1_FD = 12
T0, T1 = VMM + 1, VMM + 2


def _blocked_in(fd: int) -> str:
    return _kvm_run_line(fd)


def _two_vcpu_vmm(fake_proc: FakeProc, tasks: Dict[int, Task]) -> None:
    """:func:`build_vmm` plus vCPU 1 (fd 12) and a dup of vCPU 0 (fd 14)."""
    build_vmm(fake_proc, tasks)
    fake_proc.fd(VMM, VCPU1_FD, "anon_inode:kvm-vcpu:1")
    fake_proc.fd(VMM, DUP_FD, "anon_inode:kvm-vcpu:0")


def _debugfs(fake_proc: FakeProc, creator: int, vm_fd: int, pids: Dict[int, int]) -> None:
    """KVM's debugfs: ``<creator tid>-<vm fd>/vcpuN/pid`` (the last thread in KVM_RUN)."""
    fake_proc.debugfs_vcpus(creator, vm_fd, pids)


def _tasks(**syscalls: str) -> Dict[int, Task]:
    main = ("firecracker", OTHER_FLAGS, "7 0x5 0x1 0x0 0x0 0x8 0x0 0x7ffc2000 0x7f002000\n")
    return {
        MAIN: main,
        T0: (syscalls.get("name0", "fc_vcpu 0"), OTHER_FLAGS, syscalls.get("t0", "running\n")),
        T1: (syscalls.get("name1", "fc_vcpu 1"), OTHER_FLAGS, syscalls.get("t1", "running\n")),
    }


def test_two_fds_on_one_vcpu_are_one_vcpu_run_on_the_fd_its_thread_uses(
    fake_proc: FakeProc,
) -> None:
    """The thread runs KVM_RUN on the dup: vCPU 0 is listed once, with both fds, and
    the ioctls go to the dup, the fd the thread itself uses."""
    _two_vcpu_vmm(fake_proc, _tasks(t0=_blocked_in(DUP_FD), t1=_blocked_in(VCPU1_FD)))
    vm = _only_vm(fake_proc)
    assert [(v.vcpu_id, v.fds, v.fd) for v in vm.vcpus] == [
        (0, (VCPU_FD, DUP_FD), DUP_FD),
        (1, (VCPU1_FD,), VCPU1_FD),
    ]
    v0 = vm.vcpu(0)
    assert v0.thread is not None and v0.thread.tid == T0
    assert v0.sources == ("syscall", "name") and v0.disagreements == ()


def test_debugfs_maps_busy_vcpus_on_unnamed_threads_and_any_fd_serves(
    fake_proc: FakeProc,
) -> None:
    """Both vCPUs in the guest (``running``), threads with no telling name: only
    KVM's debugfs knows them. The VM was created by a thread other than the main
    one (its directory is named after that thread), as some VMMs do."""
    _two_vcpu_vmm(fake_proc, _tasks(name0="worker", name1="worker"))
    _debugfs(fake_proc, T1, VM_FD, {0: T0, 1: T1})
    _debugfs(fake_proc, 1, VM_FD, {0: 1, 1: 1})  # another process's VM: not this one's
    vm = _only_vm(fake_proc)
    assert [(v.vcpu_id, v.thread.tid if v.thread else None, v.sources) for v in vm.vcpus] == [
        (0, T0, ("debugfs",)),
        (1, T1, ("debugfs",)),
    ]
    assert vm.vcpu(0).fd == VCPU_FD  # the lowest: nothing says which one the thread uses


def test_the_most_direct_evidence_wins_and_the_disagreement_is_kept(fake_proc: FakeProc) -> None:
    """debugfs says T1 last ran vCPU 0 (the VMM moved its vCPUs since), while T0 is
    blocked in KVM_RUN on vCPU 0's dup and T1 on vCPU 1: the syscall files win."""
    _two_vcpu_vmm(fake_proc, _tasks(t0=_blocked_in(DUP_FD), t1=_blocked_in(VCPU1_FD)))
    _debugfs(fake_proc, VMM, VM_FD, {0: T1, 1: T0})
    vm = _only_vm(fake_proc)
    v0, v1 = vm.vcpus
    assert v0.thread is not None and v0.thread.tid == T0 and v0.mapped_by == "syscall"
    assert v1.thread is not None and v1.thread.tid == T1 and v1.mapped_by == "syscall"
    assert v0.disagreements == (discover.Evidence("debugfs", T1),)
    assert v1.disagreements == (discover.Evidence("debugfs", T0),)
    assert v0.sources == ("syscall", "name")


def test_names_that_disagree_with_the_kernel_map_nothing(fake_proc: FakeProc) -> None:
    """Thread ``fc_vcpu 0`` is blocked in vCPU 1's KVM_RUN (indices are not the ids
    here): the names are ignored, so the busy thread named ``fc_vcpu 1`` is not taken
    for vCPU 1, and vCPU 0 stays unmapped (a probe decides); the names are shown."""
    _two_vcpu_vmm(fake_proc, _tasks(t0=_blocked_in(VCPU1_FD)))
    vm = _only_vm(fake_proc)
    v0, v1 = vm.vcpus
    assert v1.thread is not None and v1.thread.tid == T0 and v1.mapped_by == "syscall"
    assert v1.disagreements == (discover.Evidence("name", T1),)
    assert v0.thread is None and v0.evidence == (discover.Evidence("name", T0),)


def test_debugfs_naming_a_thread_of_no_process_here_is_ignored(fake_proc: FakeProc) -> None:
    """A tid that is none of the VMM's threads (another pid namespace, an exited
    thread) maps nothing."""
    _two_vcpu_vmm(fake_proc, _tasks(name0="worker", name1="worker"))
    _debugfs(fake_proc, VMM, VM_FD, {0: VMM + 99, 1: T1})
    vm = _only_vm(fake_proc)
    assert vm.vcpu(0).thread is None and vm.vcpu(0).evidence == ()
    assert vm.vcpu(1).mapped_by == "debugfs"


def test_map_vcpus_takes_each_thread_once() -> None:
    """Pure: two sources naming one thread for two vCPUs map it to the one the more
    direct source names; the other vCPU keeps the losing claim as evidence."""
    t = discover.Thread(tid=50, name="x", state="in-kvm-run", kvm_run_fd=8)
    out = discover.map_vcpus([(0, (7,)), (1, (8, 9))], [t], debugfs=[(0, 50)])
    assert [(v.vcpu_id, v.thread, v.fd) for v in out] == [(0, None, 7), (1, t, 8)]
    assert out[0].evidence == (discover.Evidence("debugfs", 50),)
    assert discover.SOURCES == ("syscall", "probe", "debugfs", "name", "single")


def test_list_and_status_views_show_every_fd_the_sources_and_the_disagreement(
    fake_proc: FakeProc,
) -> None:
    """The text of ``list`` and ``status`` from the JSON of the disagreement above."""
    from serrinj.cli import render, views
    from serrinj.ops.status import vm_dict

    _two_vcpu_vmm(fake_proc, _tasks(t0=_blocked_in(DUP_FD), t1=_blocked_in(VCPU1_FD)))
    _debugfs(fake_proc, VMM, VM_FD, {0: T1, 1: T0})
    data = vm_dict(_only_vm(fake_proc))
    text = render.to_plain(views.view_list({"vms": [data]}))
    assert "vcpus=2" in text
    assert f"  0     {DUP_FD},{VCPU_FD}  {T0}" in text
    assert "syscall+name" in text
    assert f"vCPU 0: debugfs said thread {T1}; thread {T0} (syscall) is used" in text
    status = {
        "host": {"arch": "x86_64", "api_version": 12, "caps": {}},
        "vm": data,
        "vcpus": [
            {
                "vcpu_id": 1,
                "fd": VCPU1_FD,
                "fds": [VCPU1_FD],
                "thread": {
                    "tid": T1,
                    "name": "fc_vcpu 1",
                    "mapped_by": "syscall",
                    "sources": ["syscall", "name"],
                    "disagreements": [{"source": "debugfs", "tid": T0, "fd": None}],
                },
                "state": "halted",
                "mp_state": "halted",
                "events": {},
            }
        ],
    }
    text = render.to_plain(views.view_status(status))
    assert f"vCPU 1: debugfs said thread {T0}; thread {T1} (syscall) is used" in text


def test_a_libvirt_domain_is_named_from_its_pid_file(fake_proc: FakeProc) -> None:
    """libvirt starts QEMU with ``-name guest=DOMAIN``, and writes /run/libvirt/qemu/
    DOMAIN.pid; a VMM whose command line has no name is named from that file, and
    ``find(name=...)`` finds it. Unreadable or foreign files are ignored (the fake
    host's second libvirt dir does not exist)."""
    fake_proc.libvirt_pid_file("web1.pid", f"{VMM}\n")
    fake_proc.libvirt_pid_file("other.pid", "not a pid\n")
    fake_proc.libvirt_pid_file("web1.xml", "<domstatus/>")
    build_vmm(fake_proc, _worker_tasks("CPU 0/KVM", OTHER_FLAGS))
    assert _only_vm(fake_proc).name == "web1"
    assert discover.find(name="web1", host=fake_proc.host).pid == VMM


def test_a_syscall_file_denied_by_yama_leaves_the_state_unknown(
    fake_proc: FakeProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Yama's ptrace_scope 1 and 2 refuse /proc/PID/task/TID/syscall (it needs ptrace
    *attach* access) where the fds may be read: discovery goes on without it (names
    still map), and the seize that follows explains the refusal. It was an internal
    error (a raw PermissionError)."""
    _two_vcpu_vmm(fake_proc, _tasks(t0=_blocked_in(DUP_FD), t1=_blocked_in(VCPU1_FD)))

    def denied(pid: int, tid: int, root: str = procfs.PROC) -> procfs.SyscallState:
        raise PermissionError(1, "Operation not permitted")

    # the one reader still replaced: a file read by root (CAP_DAC_OVERRIDE) cannot be
    # made to fail with EPERM in a tree of plain files, as Yama makes this one fail
    monkeypatch.setattr(procfs, "syscall", denied)
    vm = _only_vm(fake_proc)
    assert {t.state for t in vm.threads} == {"unknown"}
    assert [(v.vcpu_id, v.thread.tid if v.thread else None, v.mapped_by) for v in vm.vcpus] == [
        (0, T0, "name"),
        (1, T1, "name"),
    ]


# ---------------------------------------------------------------------- probing
#: QEMU's -smp 4,sockets=2,cores=3 on x86: CPU index 3 is APIC id (vcpu_id) 4
QEMU_MAIN, CPU0, CPU1, CPU2, CPU3, RCU = 700, 701, 702, 703, 704, 705


class _FakeSeized:
    """Stands in for RemoteThread in :func:`discover.probe`: records which thread is
    stopped and stepped, in which order, and reports the KVM_RUN fd it would enter."""

    log: ClassVar[List[Tuple[str, int, float]]] = []
    enters: ClassVar[Dict[int, int]] = {}  # tid -> the fd of the KVM_RUN it enters next

    def __init__(self, pid: int, tid: int, expected_starttime: int = 0) -> None:
        self.tid = tid
        # registers at the stop that show no KVM_RUN just left (x86_64 reads these)
        self.saved = {"orig_rax": (1 << 64) - 1, "rsi": 0, "rdi": 0}

    def __enter__(self) -> _FakeSeized:
        self.log.append(("stop", self.tid, 0.0))
        return self

    def __exit__(self, *exc: object) -> None:
        self.log.append(("detach", self.tid, 0.0))

    def step_to_kvm_run_entry(self, timeout: float, wake_within: float = 0.0) -> Optional[int]:
        self.log.append(("step", self.tid, wake_within))
        return self.enters.get(self.tid)


def _qemu_vm(states: Dict[int, str], names: Optional[Dict[int, str]] = None) -> discover.Vm:
    """vCPU ids 0, 1, 2, 4 on fds 20..23, threads named by CPU index."""
    names = names or {CPU0: "CPU 0/KVM", CPU1: "CPU 1/KVM", CPU2: "CPU 2/KVM", CPU3: "CPU 3/KVM"}
    names = {QEMU_MAIN: "qemu-system-x86", RCU: "call_rcu", **names}
    threads = [
        discover.Thread(tid, names[tid], states.get(tid, "blocked")) for tid in sorted(names)
    ]
    groups = [(0, (20,)), (1, (21,)), (2, (22,)), (4, (23,))]
    vcpus = discover.map_vcpus(groups, threads)
    return discover.Vm(
        QEMU_MAIN, 1, "qemu-system-x86", None, "qemu", ARCH.name, 0, (19,), tuple(vcpus),
        tuple(threads),
    )  # fmt: skip


@pytest.fixture
def fake_seize(monkeypatch: pytest.MonkeyPatch) -> type:
    from serrinj.remote import session

    _FakeSeized.log = []
    _FakeSeized.enters = {}
    monkeypatch.setattr(session, "RemoteThread", _FakeSeized)
    return _FakeSeized


SPINNING = {CPU0: "running", CPU1: "running", CPU2: "running"}


def test_a_yielding_vcpu_named_by_its_index_is_probed_first_even_though_blocked(
    fake_seize: type,
) -> None:
    """vCPU 4's thread "CPU 3/KVM" waits in a futex outside KVM_RUN (its guest exits to
    the VMM); the others spin and are mapped by name. Only "CPU 3/KVM" is stopped:
    first, given time to wake, and nothing else is touched."""
    vm = _qemu_vm(SPINNING)
    assert [v.vcpu_id for v in vm.unmapped] == [4]
    _FakeSeized.enters = {CPU3: 23}
    out = discover.probe(vm)
    v4 = out.vcpu(4)
    assert v4.thread is not None and v4.thread.tid == CPU3 and v4.sources == ("probe",)
    assert [(v.vcpu_id, v.mapped_by) for v in out.vcpus] == [
        (0, "name"), (1, "name"), (2, "name"), (4, "probe"),
    ]  # fmt: skip
    assert _FakeSeized.log == [
        ("stop", CPU3, 0.0),
        ("step", CPU3, discover.PROBE_WAKE_WITHIN),
        ("detach", CPU3, 0.0),
    ]


def test_probe_order_unmapped_before_name_mapped_busy_before_blocked_main_last() -> None:
    vm = _qemu_vm({**SPINNING, RCU: "running"})
    order = [t.tid for t in discover.probe_order(vm, vm.vcpus)]
    # RCU (busy, unmapped), CPU3 (blocked, vCPU-named), main; then the name-mapped ones
    assert order == [RCU, CPU3, QEMU_MAIN, CPU0, CPU1, CPU2]
    assert [t.tid for t in discover.probe_order(vm, vm.vcpus, tried=[RCU, CPU3])] == [
        QEMU_MAIN, CPU0, CPU1, CPU2,
    ]  # fmt: skip


def _qemu_proc(fake: FakeProc, running: Sequence[int]) -> None:
    """/proc of :func:`_qemu_vm`'s VMM: its VM and vCPU fds, and threads that are on a
    CPU (``running``) or blocked in another syscall (every other one: an ioctl on a tty)."""
    vm = _qemu_vm({})
    fake.process(QEMU_MAIN, "qemu-system-x86", ["qemu-system-x86_64"])
    fake.fd(QEMU_MAIN, 19, "anon_inode:kvm-vm")
    for vid, fd in ((0, 20), (1, 21), (2, 22), (4, 23)):
        fake.fd(QEMU_MAIN, fd, f"anon_inode:kvm-vcpu:{vid}")
    other = f"{ARCH.nr['ioctl']} 0x5 0x5401 0x0 0x0 0x0 0x0 0x7ffc2000 0x7f002000\n"
    for t in vm.threads:
        fake.task(QEMU_MAIN, t.tid, t.name, OTHER_FLAGS, RUNNING if t.tid in running else other)


def test_a_paused_vm_has_no_thread_to_step(fake_seize: type, fake_proc: FakeProc) -> None:
    """Every thread blocked outside KVM_RUN, at every look: no step could end in KVM_RUN,
    so none is stopped (ensure_mapped's paused-VM path serves it)."""
    vm = _qemu_vm({})
    _qemu_proc(fake_proc, running=())
    assert discover.probe_order(vm, vm.vcpus) == []
    out = discover.probe(vm, host=fake_proc.host)
    assert out.vcpu(4).thread is None and _FakeSeized.log == []


def test_one_sample_with_every_thread_blocked_is_not_a_paused_vm(
    fake_seize: type, fake_proc: FakeProc
) -> None:
    """vCPUs that yield to the VMM can all be caught outside KVM_RUN in one /proc sample
    of a running VM (seen in CI with four yielding vCPUs on two CPUs). The probe looks
    again, sees the VM run, and maps vCPU 4 instead of giving up."""
    vm = _qemu_vm({})  # the first sample: everything blocked
    _qemu_proc(fake_proc, running=(CPU0, CPU1))  # the next one: two vCPUs on a CPU
    _FakeSeized.enters = {CPU3: 23}
    out = discover.probe(vm, host=fake_proc.host)
    v4 = out.vcpu(4)
    assert v4.thread is not None and v4.thread.tid == CPU3 and v4.mapped_by == "probe"
    assert _FakeSeized.log[0] == ("stop", CPU3, 0.0)


def test_a_probe_overrules_names_that_are_not_the_ids(fake_seize: type) -> None:
    """-smp 6,sockets=2,cores=3 has vcpu_ids 0,1,2,4,5,6 for CPU indices 0..5: the names
    take "CPU 4/KVM" for vCPU 4 and "CPU 5/KVM" for vCPU 5, both wrong, and leave vCPU
    6 unmapped. The probe finds "CPU 3/KVM" on vCPU 4: the names lose, the threads
    they mapped are probed too, and every vCPU ends on its own thread."""
    cpu4, cpu5 = 706, 707
    names = {CPU0: "CPU 0/KVM", CPU1: "CPU 1/KVM", CPU2: "CPU 2/KVM", CPU3: "CPU 3/KVM"}
    names.update({cpu4: "CPU 4/KVM", cpu5: "CPU 5/KVM"})
    states = {tid: "running" for tid in names}
    threads = [discover.Thread(QEMU_MAIN, "qemu-system-x86", "blocked")]
    threads += [discover.Thread(tid, names[tid], states[tid]) for tid in sorted(names)]
    groups = [(vid, (20 + i,)) for i, vid in enumerate((0, 1, 2, 4, 5, 6))]
    vcpus = discover.map_vcpus(groups, threads)
    assert [(v.vcpu_id, v.thread.tid if v.thread else None) for v in vcpus][3:] == [
        (4, cpu4), (5, cpu5), (6, None),
    ]  # fmt: skip
    vm = discover.Vm(
        QEMU_MAIN, 1, "qemu-system-x86", None, "qemu", ARCH.name, 0, (19,), tuple(vcpus),
        tuple(threads),
    )  # fmt: skip
    _FakeSeized.enters = {CPU0: 20, CPU1: 21, CPU2: 22, CPU3: 23, cpu4: 24, cpu5: 25}
    out = discover.probe(vm)
    assert [(v.vcpu_id, v.thread.tid if v.thread else None, v.mapped_by) for v in out.vcpus] == [
        (0, CPU0, "probe"), (1, CPU1, "probe"), (2, CPU2, "probe"),
        (4, CPU3, "probe"), (5, cpu4, "probe"), (6, cpu5, "probe"),
    ]  # fmt: skip
    assert QEMU_MAIN not in {tid for _what, tid, _w in _FakeSeized.log}
