"""Discovery against a fake /proc tree: kernel workers in a VMM's task list.

KVM's ``kvm-nx-lpage-recovery`` worker lives in the VMM's task list (a kernel
thread, PF_KTHREAD, before Linux 6.13; a user worker, PF_USER_WORKER, since),
and its ``syscall`` file even shows the vCPU's ``ioctl(fd, KVM_RUN)`` line
(BRIEF section 6). It cannot run a syscall for serrinj, so discovery must never
map a vCPU to it. ``serrinj.procfs.PROC`` is pointed at a tree built here, so
the flags are exactly those of such a worker on any host.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple

import pytest

from serrinj import discover, procfs
from serrinj.kvm.api import KVM_RUN
from serrinj.remote.arch import host_arch

VMM = 4194999  # above any pid_max: never this test's own pid
MAIN, VCPU_THREAD, WORKER = VMM, VMM + 1, VMM + 7
VCPU_FD, VM_FD = 11, 10
#: PF_FORKNOEXEC | PF_NOFREEZE, which a kernel thread also has
OTHER_FLAGS = 0x00000040 | 0x00008000
ARCH = host_arch()
#: comm, stat flags, syscall file
Task = Tuple[str, int, str]


def _stat(tid: int, comm: str, flags: int) -> str:
    # fields 3..22: state, ppid, pgrp, session, tty, tpgid, flags, 12 counters, starttime
    return f"{tid} ({comm}) S 1 {VMM} {VMM} 0 -1 {flags} {' '.join(['0'] * 12)} 12345 0 0\n"


def _status(comm: str) -> str:
    return (
        f"Name:\t{comm}\nTracerPid:\t0\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\n"
        "CapPrm:\t000001ffffffffff\nSeccomp:\t0\nSeccomp_filters:\t0\n"
    )


def _kvm_run_line(fd: int) -> str:
    return f"{ARCH.nr['ioctl']} {fd:#x} {KVM_RUN:#x} 0x0 0x0 0x0 0x0 0x7ffc1000 0x7f001000\n"


def build_vmm(root: Path, tasks: Dict[int, Task]) -> None:
    """/proc/VMM with a VM fd, one vCPU fd (vCPU 0) and ``tasks``:
    tid -> (comm, flags, syscall line)."""
    base = root / str(VMM)
    (base / "fd").mkdir(parents=True)
    (base / "fd" / str(VM_FD)).symlink_to("anon_inode:kvm-vm")
    (base / "fd" / str(VCPU_FD)).symlink_to("anon_inode:kvm-vcpu:0")
    (base / "fd" / "3").symlink_to("/dev/kvm")
    (base / "comm").write_text("qemu-system-x86\n")
    (base / "cmdline").write_text("qemu-system-x86_64\0-accel\0kvm\0")
    (base / "stat").write_text(_stat(VMM, "qemu-system-x86", OTHER_FLAGS))
    (base / "status").write_text(_status("qemu-system-x86"))
    for tid, (comm, flags, syscall) in tasks.items():
        task = base / "task" / str(tid)
        task.mkdir(parents=True)
        (task / "comm").write_text(comm + "\n")
        (task / "stat").write_text(_stat(tid, comm, flags))
        (task / "status").write_text(_status(comm))
        (task / "syscall").write_text(syscall)


@pytest.fixture
def fake_proc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "proc"
    root.mkdir()
    monkeypatch.setattr(procfs, "PROC", str(root))
    # nothing of the real host may leak in: no debugfs, no libvirt names
    monkeypatch.setattr(discover, "_DEBUGFS_KVM", str(tmp_path / "no-debugfs"))
    monkeypatch.setattr(discover, "_libvirt_names", lambda: {})
    return root


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


def _only_vm() -> discover.Vm:
    vms = discover.scan(ARCH)
    assert [vm.pid for vm in vms] == [VMM]
    return vms[0]


WORKER_FLAGS = {
    "kthread": procfs.PF_KTHREAD | OTHER_FLAGS,
    "user-worker": procfs.PF_USER_WORKER | OTHER_FLAGS,
}


@pytest.mark.parametrize("flags", WORKER_FLAGS.values(), ids=WORKER_FLAGS.keys())
@pytest.mark.parametrize("vcpu_name", ["CPU 0/KVM", "worker-of-some-vmm"])
def test_a_kernel_worker_showing_the_vcpus_kvm_run_is_never_its_thread(
    fake_proc: Path, flags: int, vcpu_name: str
) -> None:
    """The worker's syscall file names the vCPU fd, but discovery maps vCPU 0 to its
    real thread: by the VMM's thread name, or as the one candidate left."""
    build_vmm(fake_proc, _worker_tasks(vcpu_name, flags))
    vm = _only_vm()
    assert WORKER not in {t.tid for t in vm.threads}
    assert {t.tid for t in vm.threads} == {MAIN, VCPU_THREAD}
    (vcpu,) = vm.vcpus
    assert (vcpu.vcpu_id, vcpu.fd) == (0, VCPU_FD)
    assert vcpu.thread is not None and vcpu.thread.tid == VCPU_THREAD
    assert vcpu.mapped_by == ("name" if vcpu_name == "CPU 0/KVM" else "single")


@pytest.mark.parametrize("flags", WORKER_FLAGS.values(), ids=WORKER_FLAGS.keys())
def test_a_vcpu_with_only_a_kernel_worker_to_map_stays_unmapped(
    fake_proc: Path, flags: int
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
    (vcpu,) = _only_vm().vcpus
    assert vcpu.thread is None and vcpu.mapped_by == ""


def test_the_same_task_without_the_worker_flags_is_mapped(fake_proc: Path) -> None:
    """The control: the tree is read as intended, and only the flags exclude the
    worker (a user thread blocked in that KVM_RUN is the vCPU's thread)."""
    build_vmm(fake_proc, _worker_tasks("worker-of-some-vmm", OTHER_FLAGS))
    (vcpu,) = _only_vm().vcpus
    assert vcpu.thread is not None and vcpu.thread.tid == WORKER
    assert vcpu.thread.state == "in-kvm-run" and vcpu.mapped_by == "syscall"


def test_the_fake_stat_is_parsed_as_the_kernel_writes_it(fake_proc: Path) -> None:
    build_vmm(fake_proc, _worker_tasks("CPU 0/KVM", WORKER_FLAGS["kthread"]))
    st = procfs.stat(VMM, WORKER)
    assert st == procfs.Stat(state="S", flags=WORKER_FLAGS["kthread"], starttime=12345)
    assert st.kernel_thread and not procfs.stat(VMM, VCPU_THREAD).kernel_thread
