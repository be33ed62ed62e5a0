"""The engine and use cases against the built-in test VM, a VMM in another process.

These are the proofs of the remote engine: serrinj's process reads and
injects into a vCPU that KVM would refuse to serve it directly, and the guest
reports what it observed.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from serrinj.codec import mce
from serrinj.host import kvmcaps as host
from serrinj.host import procfs
from serrinj.kvm import api
from serrinj.kvm import arm64 as kvm_arm64
from serrinj.kvm import x86_64 as kvm_x86
from serrinj.ops import inject, status
from serrinj.remote import RemoteThread
from serrinj.target import attach as target
from serrinj.target import discover
from serrinj.testvm.process import TestVmProcess
from serrinj.vcpu import open_vcpu
from serrinj.vcpu.remote import RemoteExecutor
from tests.conftest import debugfs_kvm
from tests.helpers import serrinj_cli
from tests.helpers.procs import wait_stopped
from tests.helpers.testvm import VmFactory

pytestmark = [pytest.mark.kvm, pytest.mark.root]
X86 = os.uname().machine == "x86_64"
ARM64 = os.uname().machine == "aarch64"
MODES = ["halt", "spin", "futex"]
#: remote ioctls in the endurance test: each costs some 75 ms in the emulated arm64 lab
MANY_IOCTLS = 1000 if X86 else 100
ISS_KSELFTEST = 0x101D1ED  # IDS | 0x1d1ed (tools/testing/selftests/kvm/arm64/external_aborts.c)
ESR_SERROR = 0xBE000000  # EC 0x2F and IL, which the CPU adds to the injected ISS


@pytest.fixture
def vm(request: pytest.FixtureRequest, start_vm: VmFactory) -> TestVmProcess:
    mode, vcpus = request.param
    return start_vm(vcpus=vcpus, mode=mode)


def _heartbeat(vm: TestVmProcess, vcpu: int) -> dict:  # type: ignore[type-arg]
    mark = vm.mark()
    vm.command({"cmd": "heartbeat", "vcpu": vcpu})
    return vm.wait_event(lambda e: e["event"] == "heartbeat" and e["vcpu"] == vcpu, since=mark)


@pytest.mark.parametrize("vm", [(m, 2) for m in MODES], indirect=True, ids=MODES)
def test_remote_get_events_in_every_mode(vm: TestVmProcess) -> None:
    found = discover.find(pid=vm.pid)
    assert {v.vcpu_id for v in found.vcpus} == {0, 1}
    for v in vm.vcpus:
        assert found.vcpu(v.vcpu_id).fd == v.fd
    rep = status.status(pid=vm.pid)
    for snap in rep.vcpus:
        assert snap.tid == vm.vcpu(snap.vcpu_id).tid
        assert snap.registers_restored
        assert snap.state in ("halted", "in-guest", "userspace")
        if X86:
            assert snap.events["nmi"] == {"injected": 0, "pending": 0, "masked": 0, "pad": 0}


@pytest.mark.skipif(not X86, reason="x86_64 injections; arm64 runs in the lab")
@pytest.mark.parametrize("vm", [(m, 2) for m in MODES], indirect=True, ids=MODES)
def test_nmi_and_machine_checks_reach_the_guest(vm: TestVmProcess) -> None:
    for vid in (0, 1):
        mark = vm.mark()
        res = inject.inject_nmi(target.resolve(pid=vm.pid, vcpu=vid), wait=5.0)
        assert res[0].delivery is not None and res[0].delivery.delivered
        ev = vm.wait_event(lambda e, v=vid: e["event"] == "nmi" and e["vcpu"] == v, since=mark)
        assert ev["vector"] == 2
    # An uncorrected error raises #MC; the guest reads the bank back exactly.
    uc = mce.preset("srao").build(bank=1, addr=0x1234000)
    mark = vm.mark()
    res = inject.inject_mce(target.resolve(pid=vm.pid, vcpu=0), inject.MceRequest(uc), wait=5.0)
    assert res[0].prediction["raises_mc"] is True
    ev = vm.wait_event(lambda e: e["event"] == "mce" and e["vcpu"] == 0, since=mark)
    assert (
        ev["banks"] == [{"bank": 1, "status": uc.status, "addr": uc.addr, "misc": uc.misc}]
        and ev["mcg_status"] == uc.mcg_status
    )
    # A corrected error only lands in the bank; the guest finds it by polling.
    ce = mce.preset("corrected").build(bank=2, addr=0x5000)
    mark = vm.mark()
    inject.inject_mce(target.resolve(pid=vm.pid, vcpu=1), inject.MceRequest(ce))
    ev = vm.wait_event(lambda e: e["event"] == "mce-poll" and e["vcpu"] == 1, since=mark)
    assert {"bank": 2, "status": ce.status, "addr": ce.addr, "misc": ce.misc} in ev["banks"]
    for vid in (0, 1):
        hb = _heartbeat(vm, vid)
        assert hb["check_failures"] == 0


@pytest.mark.skipif(not ARM64, reason="arm64 SErrors (the arm64 lab runs this file)")
@pytest.mark.parametrize("vm", [(m, 2) for m in MODES], indirect=True, ids=MODES)
def test_serrors_reach_the_guest(vm: TestVmProcess) -> None:
    """The arm64 counterpart of the NMI/#MC test: the guest reads the injected syndrome
    (on a host without RAS, KVM's own, an SError all the same)."""
    ras = host.probe().serror_esr
    for vid in (0, 1):
        iss = ISS_KSELFTEST if ras else None
        mark = vm.mark()
        res = inject.inject_serror(
            target.resolve(pid=vm.pid, vcpu=vid), inject.SErrorRequest(iss), wait=5.0
        )
        assert res[0].delivery is not None and res[0].delivery.delivered
        assert res[0].registers_restored
        ev = vm.wait_event(lambda e, v=vid: e["event"] == "serror" and e["vcpu"] == v, since=mark)
        assert ev["ec"] == 0x2F
        if ras:
            assert ev["esr"] == ESR_SERROR | ISS_KSELFTEST
    for vid in (0, 1):
        hb = _heartbeat(vm, vid)
        assert hb["check_failures"] == 0 and hb["serror_count"] == 1


@pytest.mark.parametrize("vm", [("futex", 2)], indirect=True, ids=["futex"])
def test_thousand_remote_ioctls_leave_vm_and_guest_healthy(vm: TestVmProcess) -> None:
    found = target.ensure_mapped(discover.find(pid=vm.pid), (0, 1))
    before = [_heartbeat(vm, v) for v in (0, 1)]
    errors = 0
    events_type = kvm_x86.VcpuEvents if X86 else kvm_arm64.VcpuEvents
    for i in range(MANY_IOCTLS):
        vid = i % 2
        with target.attach(found, vid, (api.KVM_GET_VCPU_EVENTS,)) as (vc, rt):
            ev = vc.get_events()
            assert isinstance(ev, events_type)
        if not rt.verified:
            errors += 1
    assert errors == 0
    after = [_heartbeat(vm, v) for v in (0, 1)]
    for b, a in zip(before, after):
        assert a["iterations"] > b["iterations"], "the guest stopped making progress"
        assert a["check_failures"] == 0
    assert vm.alive()
    bad = [e for e in vm.events_seen if e["event"] in ("error", "exit", "guest-check-failed")]
    assert bad == []


@pytest.mark.parametrize("vm", [("futex", 1), ("halt", 1)], indirect=True, ids=["futex", "halt"])
def test_registers_identical_through_getregset_from_the_test(vm: TestVmProcess) -> None:
    """The test process itself snapshots the vCPU thread's registers (PTRACE_GETREGSET)
    before and after an injection done by serrinj, with the VMM frozen by SIGSTOP."""
    tid = vm.vcpu(0).tid
    os.kill(vm.pid, signal.SIGSTOP)
    try:
        wait_stopped(vm.pid)
        with RemoteThread(vm.pid, tid) as observer:
            regs_before = observer.saved
        tgt = target.resolve(pid=vm.pid, vcpu=0)
        if X86:
            inject.inject_nmi(tgt)
        else:
            inject.inject_serror(tgt, inject.SErrorRequest(None, force=True))
        with RemoteThread(vm.pid, tid) as observer:
            regs_after = observer.saved
        assert regs_before is not None and regs_after is not None
        assert regs_after == regs_before, regs_before.diff(regs_after)
    finally:
        os.kill(vm.pid, signal.SIGCONT)
    # and the guest took what was injected while its VMM was stopped
    vm.wait_event(lambda e: e["event"] == ("nmi" if X86 else "serror"), timeout=10)
    assert _heartbeat(vm, 0)["check_failures"] == 0


@pytest.mark.skipif(not X86, reason="x86_64 guest")
@pytest.mark.parametrize("vm", [("halt", 1)], indirect=True, ids=["halt"])
def test_paused_vm_takes_the_nmi_after_run(vm: TestVmProcess) -> None:
    vm.command({"cmd": "pause"})
    vm.wait_event(lambda e: e["event"] == "ack" and e["cmd"] == "pause")
    mark = vm.mark()
    tgt = target.resolve(pid=vm.pid, vcpu=0)
    res = inject.inject_nmi(tgt)
    after = res[0].after
    assert after["nmi"]["pending"] == 1  # type: ignore[index]
    time.sleep(0.3)
    assert not [e for e in vm.events_seen[mark:] if e["event"] == "nmi"]
    vm.command({"cmd": "run"})
    vm.wait_event(lambda e: e["event"] == "nmi", since=mark, timeout=10)


def _commits_at_set() -> bool:
    """Whether this host's KVM takes an unmasked SError inside KVM_SET_VCPU_EVENTS
    (Linux 6.17+). In the arm64 lab the host states it per kernel (``lab.commit``),
    and serrinj's own probe must agree; elsewhere only the probe can tell."""
    from lab.guest import env
    from serrinj.vcpu import probe as kvmprobe

    probed = kvmprobe.probe_serror().commits_at_set
    assert probed is not None, kvmprobe.probe_serror().observed
    lab = env.current()
    if lab.inside_lab:
        assert probed is lab.expect_commit, (probed, lab)
    return probed


@pytest.mark.skipif(not ARM64, reason="arm64 SErrors (the arm64 lab runs this file)")
@pytest.mark.parametrize("vm", [("halt", 1)], indirect=True, ids=["halt"])
def test_paused_vm_takes_the_serror_after_run(vm: TestVmProcess) -> None:
    """Injected into a paused VM (its vCPU thread outside KVM_RUN), the guest takes the
    SError only once the VM runs again. Up to Linux 6.16 it stays pending until then;
    since 6.17 KVM puts it into the vCPU's registers at once (PC at the SError vector),
    and inject and status say so."""
    commits = _commits_at_set()
    vm.command({"cmd": "pause"})
    vm.wait_event(lambda e: e["event"] == "ack" and e["cmd"] == "pause")
    mark = vm.mark()
    iss = ISS_KSELFTEST if host.probe().serror_esr else None
    res = inject.inject_serror(target.resolve(pid=vm.pid, vcpu=0), inject.SErrorRequest(iss))
    inj = res[0]
    after = inj.after
    assert inj.thread_state == "userspace"
    assert inj.prediction["timing"] == ("at-injection" if commits else "when-run")
    assert after["serror_pending"] is (not commits)
    if commits:
        taken = after["last_exception"]
        assert isinstance(taken, dict) and taken["serror"] and taken["at_serror_vector"], taken
        if iss is not None:
            assert taken["esr_el1"] == ESR_SERROR | iss
        assert inj.delivery is not None and inj.delivery.delivered and inj.delivery.polls == 0
        assert "when the VM resumes" in inj.delivery.reason, inj.delivery
        # status, still paused: the SError sits in the guest's registers, unhandled
        (snap,) = status.status(pid=vm.pid, vcpu=0).vcpus
        last = snap.detail["last_exception"]
        assert isinstance(last, dict) and last["at_serror_vector"] and last["serror"], last
        assert snap.events["serror_pending"] is False
        print(f"paused VM: SError committed at SET, PC {last['pc']:#x} (the SError vector)")
    else:
        assert "last_exception" not in after and inj.delivery is None
    time.sleep(0.3)
    assert not [e for e in vm.events_seen[mark:] if e["event"] == "serror"]
    vm.command({"cmd": "run"})
    ev = vm.wait_event(lambda e: e["event"] == "serror", since=mark, timeout=10)
    if iss is not None:
        assert ev["esr"] == ESR_SERROR | iss
    assert len([e for e in vm.events_seen[mark:] if e["event"] == "serror"]) == 1


@pytest.mark.parametrize("vm", [("halt", 2)], indirect=True, ids=["halt"])
def test_status_of_a_paused_vm_is_userspace(vm: TestVmProcess) -> None:
    """Paused, each vCPU thread waits on a condition variable outside KVM_RUN (the
    test VM's ``pause``): ``status`` stops it there and says ``userspace``, through
    the ops API and through ``serrinj status --json``; the guest runs on after."""
    vm.command({"cmd": "pause"})
    vm.wait_event(lambda e: e["event"] == "ack" and e["cmd"] == "pause")
    for v in vm.vcpus:  # not in KVM_RUN, as the kernel sees it
        sc = procfs.syscall(vm.pid, v.tid)
        assert not (len(sc.args) > 1 and sc.args[1] == api.KVM_RUN), (v, sc)
    tids = {v.vcpu_id: v.tid for v in vm.vcpus}
    rep = status.status(pid=vm.pid)
    assert [(s.vcpu_id, s.tid, s.state) for s in rep.vcpus] == [
        (0, tids[0], "userspace"),
        (1, tids[1], "userspace"),
    ]
    # the names agree with KVM's debugfs where it is mounted, which then wins
    assert all(s.registers_restored and "name" in s.sources for s in rep.vcpus)
    assert {s.mapped_by for s in rep.vcpus} == {"debugfs" if debugfs_kvm() else "name"}
    proc = serrinj_cli.run("status", "--pid", vm.pid, "--json")
    assert proc.rc == 0, proc
    out = proc.data
    assert [(v["vcpu_id"], v["thread"]["tid"], v["state"]) for v in out["vcpus"]] == [
        (0, tids[0], "userspace"),
        (1, tids[1], "userspace"),
    ]
    vm.command({"cmd": "run"})
    for vid in (0, 1):
        assert _heartbeat(vm, vid)["check_failures"] == 0


#: task_struct->flags of tasks that run no user code (include/linux/sched.h), written
#: out here, not taken from serrinj.host.procfs, so that the check does not share its constants
_PF_IO_WORKER, _PF_USER_WORKER, _PF_KTHREAD = 0x10, 0x4000, 0x00200000


def _task_flags(pid: int, tid: int) -> int:
    with open(f"/proc/{pid}/task/{tid}/stat") as f:
        after_comm = f.read().rsplit(")", 1)[1].split()
    return int(after_comm[6])  # field 9, flags (field 3, state, is the first after comm)


@pytest.mark.parametrize("vm", [("spin", 1)], indirect=True, ids=["spin"])
def test_kernel_worker_in_the_vmm_is_never_used(vm: TestVmProcess) -> None:
    """KVM's nx-lpage recovery worker sits in the VMM's task list and carries a copy
    of the vCPU's KVM_RUN registers; discovery must never map a vCPU to it.

    The workers are told here from the kernel's own flags of every task, independently
    of discovery: discovery's threads are exactly the tasks without worker flags. Only
    hosts with ``kvm.nx_huge_pages`` on have such a worker in a VMM; the fake /proc
    tree of tests/test_discover_unit.py gives one to every host."""
    found = discover.find(pid=vm.pid)
    flags = {int(t): _task_flags(vm.pid, int(t)) for t in os.listdir(f"/proc/{vm.pid}/task")}
    no_user_code = _PF_IO_WORKER | _PF_USER_WORKER | _PF_KTHREAD
    workers = {tid for tid, f in flags.items() if f & no_user_code}
    assert {t.tid for t in found.threads} == set(flags) - workers
    for v in found.vcpus:
        assert v.thread is not None and v.thread.tid not in workers
        assert v.thread.tid == vm.vcpu(v.vcpu_id).tid


@pytest.mark.parametrize("vm", [("halt", 1)], indirect=True, ids=["halt"])
def test_a_local_ioctl_on_a_foreign_vcpu_fd_is_eio(vm: TestVmProcess) -> None:
    """The rule that shapes the design, checked: a pidfd_getfd copy of the VMM's vCPU fd
    is refused by KVM in serrinj's process, and resolve_fd explains it."""
    from serrinj import _native
    from serrinj.errors import KvmRejected
    from serrinj.vcpu.executor import LocalExecutor

    fd = vm.vcpu(0).fd
    pidfd = _native.pidfd_open(vm.pid)
    mine = _native.pidfd_getfd(pidfd, fd)
    try:
        with pytest.raises(KvmRejected, match="EIO"):
            open_vcpu(LocalExecutor(), mine, 0, os.uname().machine).get_events()
    finally:
        os.close(mine)
        os.close(pidfd)
    res = target.resolve_fd(fd, pid=vm.pid)
    assert not res.local and res.owner_pid == vm.pid and res.vcpu_id == 0


@pytest.mark.parametrize("vm", [("halt", 1)], indirect=True, ids=["halt"])
def test_a_read_only_ioctl_needs_no_input_written(vm: TestVmProcess) -> None:
    """An _IOR call (KVM_GET_VCPU_EVENTS) writes its whole struct: the executor skips
    writing the input into the held thread's memory, and what it reads is the same as
    with zeros written first, however the scratch bytes were left before."""
    v = vm.vcpus[0]
    request = api.KVM_GET_VCPU_EVENTS
    size = api.SIZEOF_KVM_VCPU_EVENTS
    with RemoteThread(vm.pid, v.tid) as t:
        ex = RemoteExecutor(t)
        addr = t.scratch(size)
        t.write_memory(addr, b"\xa5" * size)
        writes = []
        write = t.write_memory
        t.write_memory = lambda a, data: (writes.append(a), write(a, data))[1]  # type: ignore[method-assign]
        skipped = ex.ioctl_buf(v.fd, request, bytes(size))
        t.write_memory = write  # type: ignore[method-assign]
        assert writes == []
        t.write_memory(addr, bytes(size))
        ex.thread.syscall(t.arch.nr["ioctl"], v.fd, request, addr)
        written = t.read_memory(addr, size)
    assert skipped == written and b"\xa5" not in skipped
    assert t.verified
