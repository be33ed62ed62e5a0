"""The x86 test VM, run as a separate process on the real /dev/kvm.

Each test starts ``python -m serrinj.testvm`` with :class:`TestVmProcess` and
checks what the *guest* reports: the proof that an NMI or a machine check was
delivered is the guest's own handler reading it back.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Callable, Dict, List

import pytest

from serrinj import _native
from serrinj.kvm import x86_64 as kx
from serrinj.testvm import x86_64 as guest
from serrinj.testvm.process import TestVmProcess, thread_comm, thread_syscall
from serrinj.testvm.vmm import THREAD_NAMES

pytestmark = pytest.mark.kvm

Event = Dict[str, Any]
KVM_RUN_HEX = "0xae80"
SYS_IOCTL = "16"
SYS_FUTEX = "202"

#: an uncorrected, processor-context-corrupt error: raises #MC (and is not UCNA)
UC_STATUS = (
    kx.MCI_STATUS_VAL
    | kx.MCI_STATUS_UC
    | kx.MCI_STATUS_EN
    | kx.MCI_STATUS_MISCV
    | kx.MCI_STATUS_ADDRV
    | kx.MCI_STATUS_PCC
    | 0x0135
)
UC_MCG_STATUS = kx.MCG_STATUS_MCIP | kx.MCG_STATUS_EIPV
#: a corrected error: logged in the bank, no exception; found by polling
CE_STATUS = kx.MCI_STATUS_VAL | kx.MCI_STATUS_EN | kx.MCI_STATUS_MISCV | kx.MCI_STATUS_ADDRV | 0x9A


def _is(name: str, vcpu: int, **fields: Any) -> Callable[[Event], bool]:
    def match(event: Event) -> bool:
        if event.get("event") != name or event.get("vcpu") != vcpu:
            return False
        return all(event.get(k) == v for k, v in fields.items())

    return match


def _sample(vm: TestVmProcess, tid: int, want: Callable[[str], bool], tries: int = 200) -> str:
    """Read the thread's syscall line until ``want`` holds (timer ticks flip it briefly)."""
    seen: List[str] = []
    for _ in range(tries):
        line = thread_syscall(vm.pid, tid)
        if want(line):
            return line
        seen.append(line)
        time.sleep(0.01)
    raise AssertionError(f"thread {tid} never matched; last lines: {seen[-5:]}")


def _blocked_in_kvm_run(fd: int) -> Callable[[str], bool]:
    def want(line: str) -> bool:
        parts = line.split()
        return (
            len(parts) >= 3
            and parts[0] == SYS_IOCTL
            and int(parts[1], 16) == fd
            and (parts[2] == KVM_RUN_HEX)
        )

    return want


def _command(vm: TestVmProcess, cmd: Dict[str, Any], expect: Callable[[Event], bool]) -> Event:
    mark = vm.mark()
    vm.command(cmd)
    return vm.wait_event(expect, timeout=10, since=mark)


def _ready_guest(vm: TestVmProcess) -> None:
    for info in vm.vcpus:
        ev = vm.wait_event(_is("guest-ready", info.vcpu_id), timeout=10)
        assert ev["cr4"] & kx.CR4_MCE, "the guest sets CR4.MCE itself"
        assert ev["banks"] == 10
        assert ev["mcg_cap"] == vm.ready["mcg_cap"]


@pytest.mark.parametrize("mode", ["halt", "spin", "futex"])
def test_guest_observes_nmi_and_machine_checks(
    start_vm: Callable[..., TestVmProcess], mode: str
) -> None:
    vm = start_vm(vcpus=2, mode=mode, ready=False, arch="x86_64")
    ready = vm.ready
    assert ready["pid"] == vm.pid and ready["arch"] == "x86_64" and ready["mode"] == mode
    assert [v.vcpu_id for v in vm.vcpus] == [0, 1]
    assert ready["mcg_cap"] & kx.MCG_CAP_COUNT_MASK == 10
    for info in vm.vcpus:
        assert os.readlink(f"/proc/{vm.pid}/fd/{info.fd}") == f"anon_inode:kvm-vcpu:{info.vcpu_id}"
        assert thread_comm(vm.pid, info.tid) == f"CPU {info.vcpu_id}/KVM"
    _ready_guest(vm)

    # where the vCPU threads wait is the point of the three modes
    for info in vm.vcpus:
        if mode == "halt":
            line = _sample(vm, info.tid, _blocked_in_kvm_run(info.fd))
            assert line.split()[:3] == [SYS_IOCTL, hex(info.fd), KVM_RUN_HEX]
        elif mode == "spin":
            _sample(vm, info.tid, lambda line: line == "running")
        else:
            _sample(vm, info.tid, lambda line: line.split()[0] == SYS_FUTEX)
            _sample(vm, info.tid, lambda line: line == "running")

    for info in vm.vcpus:
        n = info.vcpu_id
        # NMIs: each one is counted by the guest's handler
        for count in (1, 2):
            ev = _command(vm, {"cmd": "nmi", "vcpu": n}, _is("nmi", n, count=count))
            assert ev["vector"] == kx.NMI_VECTOR

        # a corrected error raises nothing: the guest finds it by polling the banks
        ce = {"bank": 2 + n, "status": CE_STATUS, "addr": 0x1000 + n, "misc": 0x86}
        ev = _command(vm, {"cmd": "mce", "vcpu": n, **ce}, _is("mce-poll", n))
        assert ev["banks"] == [ce]

        # an uncorrected error is a #MC; twice in a row proves the handler clears MCIP
        for count, bank in ((1, 1), (2, 9)):
            uc = {"bank": bank, "status": UC_STATUS, "addr": 0xDEAD0000 + n, "misc": 0x8C + n}
            cmd = {"cmd": "mce", "vcpu": n, "mcg_status": UC_MCG_STATUS, **uc}
            ev = _command(vm, cmd, _is("mce", n, count=count))
            assert ev["vector"] == kx.MC_VECTOR
            assert ev["mcg_status"] == UC_MCG_STATUS
            assert ev["banks"] == [uc]

        hb = _command(vm, {"cmd": "heartbeat", "vcpu": n}, _is("heartbeat", n))
        assert hb["seq"] == 1
        assert hb["nmi_count"] == 2 and hb["mce_count"] == 2 and hb["poll_count"] == 1
        assert hb["check_failures"] == 0
        assert hb["iterations"] > 0 and hb["ticks"] > 0
        if mode == "futex":
            assert hb["yields"] > 0

    assert not [e for e in vm.events_seen if e["event"] in ("exit", "error", "exception")]
    assert not [e for e in vm.events_seen if e["event"] == "guest-check-failed"]
    mark = vm.mark()
    vm.command({"cmd": "quit"})
    assert vm.wait_exit() == 0
    vm.wait_event(lambda e: e["event"] == "shutdown" and e["reason"] == "quit", since=mark)


def test_heartbeat_counts_progress(start_vm: Callable[..., TestVmProcess]) -> None:
    vm = start_vm(vcpus=1, mode="spin", ready=False, arch="x86_64")
    _ready_guest(vm)
    first = _command(vm, {"cmd": "heartbeat", "vcpu": 0}, _is("heartbeat", 0, seq=1))
    time.sleep(0.2)
    second = _command(vm, {"cmd": "heartbeat", "vcpu": 0}, _is("heartbeat", 0, seq=2))
    assert second["iterations"] > first["iterations"]
    assert second["ticks"] > first["ticks"]


@pytest.mark.parametrize("style", sorted(THREAD_NAMES))
def test_thread_names(start_vm: Callable[..., TestVmProcess], style: str) -> None:
    vm = start_vm(vcpus=2, extra=["--thread-names", style], ready=False, arch="x86_64")
    namer = THREAD_NAMES[style]
    with open(f"/proc/{vm.pid}/comm") as f:
        process_comm = f.read().strip()
    for info in vm.vcpus:
        comm = thread_comm(vm.pid, info.tid)
        assert info.thread_name == comm
        if namer is None:
            assert comm == process_comm  # python's default: threads are not renamed
        else:
            assert comm == namer(info.vcpu_id)


def test_pending_nmi_is_visible_while_paused(start_vm: Callable[..., TestVmProcess]) -> None:
    vm = start_vm(vcpus=2, extra=["--start-paused"], ready=False, arch="x86_64")
    assert vm.ready["paused"] is True
    for info in vm.vcpus:
        # out of KVM_RUN, parked in a futex
        _sample(vm, info.tid, lambda line: line.split()[0] == SYS_FUTEX)
    before = _command(vm, {"cmd": "events", "vcpu": 1}, _is("events", 1))
    assert before["events"]["nmi"]["pending"] == 0
    assert before["mp_state"] == "runnable"

    _command(vm, {"cmd": "nmi", "vcpu": 1}, _is("ack", 1, cmd="nmi"))
    pending = _command(vm, {"cmd": "events", "vcpu": 1}, _is("events", 1))
    assert pending["events"]["nmi"]["pending"] == 1
    assert pending["events"]["flags"] & kx.KVM_VCPUEVENT_VALID_NMI_PENDING
    assert not [e for e in vm.events_seen if e["event"] in ("nmi", "guest-ready")]

    _command(vm, {"cmd": "run"}, lambda e: e["event"] == "ack" and e["cmd"] == "run")
    ev = vm.wait_event(_is("nmi", 1), timeout=10)
    assert ev["count"] == 1
    _ready_guest(vm)
    after = _command(vm, {"cmd": "events", "vcpu": 1}, _is("events", 1))
    assert after["events"]["nmi"]["pending"] == 0
    assert not [e for e in vm.events_seen if e["event"] == "nmi" and e["vcpu"] == 0]


def test_pause_parks_the_vcpus_out_of_kvm_run(start_vm: Callable[..., TestVmProcess]) -> None:
    vm = start_vm(vcpus=2, mode="spin", ready=False, arch="x86_64")
    _ready_guest(vm)
    _command(vm, {"cmd": "pause"}, lambda e: e["event"] == "ack" and e["cmd"] == "pause")
    for info in vm.vcpus:
        # parked before the ack; the futex wait follows at once
        _sample(vm, info.tid, lambda line: line.split()[0] == SYS_FUTEX)
    first = _command(vm, {"cmd": "heartbeat", "vcpu": 0}, _is("ack", 0, cmd="heartbeat"))
    assert first
    time.sleep(0.1)
    assert not [e for e in vm.events_seen if e["event"] == "heartbeat"], "paused guests run"
    _command(vm, {"cmd": "run"}, lambda e: e["event"] == "ack" and e["cmd"] == "run")
    vm.wait_event(_is("heartbeat", 0, seq=1))


def test_self_check_detects_register_and_memory_changes(
    start_vm: Callable[..., TestVmProcess],
) -> None:
    vm = start_vm(vcpus=1, mode="spin", ready=False, arch="x86_64")
    _ready_guest(vm)
    # a heartbeat comes from the main loop: the checked registers are live from now on
    _command(vm, {"cmd": "heartbeat", "vcpu": 0}, _is("heartbeat", 0))
    regs = _command(vm, {"cmd": "regs", "vcpu": 0}, _is("regs", 0))["regs"]
    assert regs["rip"] < 0x10000 and regs["rsp"] <= guest.PERCPU_SIZE

    ev = _command(
        vm,
        {"cmd": "set-regs", "vcpu": 0, "regs": {"rbx": 0x12345678}},
        _is("guest-check-failed", 0, check="registers"),
    )
    # the write may land before the guest's own `dec ebx` in that iteration
    assert ev["ebx"] in (0x12345678, 0x12345677)
    assert ev["ebx"] != (~ev["esi"]) & 0xFFFFFFFF
    assert (ev["esi"] + ev["edi"]) & 0xFFFFFFFF == guest.CHECK_K1, "only rbx was changed"

    # flip one word of the checksummed block, from outside the VMM
    page = vm.ready["percpu_gpa"][0]
    hva = vm.ready["ram_hva"] + page + guest.LAYOUT["PC_BLOCK"] + 8
    old = _native.process_vm_read(vm.pid, hva, 4)
    new = bytes(b ^ 0xFF for b in old)
    mark = vm.mark()
    _native.process_vm_write(vm.pid, hva, new)
    ev = vm.wait_event(_is("guest-check-failed", 0, check="memory"), since=mark)
    delta = int.from_bytes(new, "little") - int.from_bytes(old, "little")
    assert (ev["actual"] - ev["expected"]) & 0xFFFFFFFF == delta & 0xFFFFFFFF
    hb = _command(vm, {"cmd": "heartbeat", "vcpu": 0}, _is("heartbeat", 0, seq=2))
    assert hb["check_failures"] == 2


def test_uc_machine_check_before_cr4_mce_is_a_triple_fault(
    start_vm: Callable[..., TestVmProcess],
) -> None:
    # KVM turns a UC error into a triple fault while CR4.MCE is clear (BRIEF
    # section 4); a paused guest has not set it yet.
    vm = start_vm(vcpus=1, extra=["--start-paused"], ready=False, arch="x86_64")
    cmd = {"cmd": "mce", "vcpu": 0, "bank": 1, "status": UC_STATUS, "mcg_status": UC_MCG_STATUS}
    _command(vm, cmd, _is("ack", 0, cmd="mce"))
    vm.command({"cmd": "run"})
    ev = vm.wait_event(_is("exit", 0), timeout=10)
    assert ev["reason"] == "SHUTDOWN"
    # the stopped vCPU is still served (from the main thread)
    events = _command(vm, {"cmd": "events", "vcpu": 0}, _is("events", 0))
    assert events["events"]["triple_fault_pending"] == 0


def test_errors_are_reported(start_vm: Callable[..., TestVmProcess]) -> None:
    vm = start_vm(vcpus=1, ready=False, arch="x86_64")
    cases = [
        ({"cmd": "bogus", "vcpu": 0}, "unknown command"),
        ({"cmd": "nmi", "vcpu": 7}, "no vCPU 7"),
        ({"cmd": "nmi"}, "missing 'vcpu'"),
        ({"cmd": "mce", "vcpu": 0, "bank": 1}, "missing 'status'"),
    ]
    for cmd, message in cases:
        ev = _command(vm, cmd, lambda e: e["event"] == "error")
        assert message in ev["message"], ev
    # KVM's own checks come back as errno: bank out of range, status without VAL
    ev = _command(
        vm, {"cmd": "mce", "vcpu": 0, "bank": 10, "status": CE_STATUS}, _is("error", 0, cmd="mce")
    )
    assert ev["errno"] == 22
    ev = _command(
        vm, {"cmd": "mce", "vcpu": 0, "bank": 1, "status": 0x9A}, _is("error", 0, cmd="mce")
    )
    assert ev["errno"] == 22
    mark = vm.mark()
    vm.command({"cmd": "heartbeat", "vcpu": 0, "id": "x1"})
    assert vm.wait_event(_is("ack", 0, cmd="heartbeat"), since=mark)["id"] == "x1"
    assert vm.alive()


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "eof"])
def test_clean_exit(start_vm: Callable[..., TestVmProcess], how: str) -> None:
    vm = start_vm(vcpus=2, mode="spin", ready=False, arch="x86_64")
    _ready_guest(vm)
    if how == "eof":
        stdin = vm._popen.stdin
        assert stdin is not None
        stdin.close()
    else:
        os.kill(vm.pid, getattr(signal, how))
    assert vm.wait_exit(timeout=10) == 0
    last = vm.events_seen[-1]
    assert last["event"] == "shutdown" and last["reason"] == how
