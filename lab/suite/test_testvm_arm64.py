"""The built-in test VM's arm64 guest on the lab's KVM, as a separate process.

Faults are injected *locally* here (the VMM's own ``serror`` and ``ext_dabt``
commands, i.e. KVM_SET_VCPU_EVENTS from the VM's creator), which proves the
guest's handlers and report channel independently of serrinj's remote engine.
Every check is on what the guest itself read from ESR_EL1 / ELR_EL1 / FAR_EL1.
"""

from __future__ import annotations

import re
import time
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest

from lab.guest import env
from serrinj.testvm.process import TestVmProcess, thread_syscall

Event = Dict[str, Any]

ESR_SERROR_BASE = 0xBE000000  # EC 0x2F and IL, added by the CPU to the injected ISS
ESR_IDS = 1 << 24
ISS_CE = 0x1811
ISS_UER = 0x0C11
ISS_KSELFTEST = 0x101D1ED  # IDS | 0x1d1ed (tools/testing/selftests/kvm/arm64/external_aborts.c)
EC_SERROR = 0x2F
EC_DABT_CUR = 0x25
DFSC_EXTERNAL = 0x10
EINVAL = 22
START_TIMEOUT_S = 60
EVENT_TIMEOUT_S = 20
#: ioctl is syscall 29 on arm64; KVM_RUN is 0xae80
_KVM_RUN_SYSCALL = re.compile(r"^29 0x[0-9a-f]+ 0xae80 ")


StartVm = Callable[..., TestVmProcess]


@pytest.fixture
def testvm() -> Iterator[StartVm]:
    started: List[TestVmProcess] = []

    def _start(mode: str, vcpus: int = 2, extra: Optional[List[str]] = None) -> TestVmProcess:
        t0 = time.monotonic()
        vm = TestVmProcess.start(
            arch="arm64", vcpus=vcpus, mode=mode, extra_args=extra or [], timeout=START_TIMEOUT_S
        )
        started.append(vm)
        for v in range(vcpus):
            vm.wait_event(_on("guest-ready", v), EVENT_TIMEOUT_S)
        print(f"testvm arm64 mode={mode} vcpus={vcpus} up in {time.monotonic() - t0:.2f} s")
        return vm

    try:
        yield _start
    finally:
        for vm in started:
            vm.stop()


def _on(name: str, vcpu: int) -> Callable[[Event], bool]:
    return lambda e: e.get("event") == name and e.get("vcpu") == vcpu


def _reply(vm: TestVmProcess, cmd: Dict[str, Any]) -> Event:
    """Send ``cmd`` and return its ack, error, or answering event (matched by id)."""
    ident = f"{cmd['cmd']}-{time.monotonic_ns()}"
    mark = vm.mark()
    vm.command({**cmd, "id": ident})
    return vm.wait_event(lambda e: e.get("id") == ident, EVENT_TIMEOUT_S, since=mark)


def _heartbeat(vm: TestVmProcess, vcpu: int) -> Event:
    """A round trip through the guest: proves it ran (and saw its mailbox) since now."""
    mark = vm.mark()
    assert _reply(vm, {"cmd": "heartbeat", "vcpu": vcpu})["event"] == "ack"
    return vm.wait_event(_on("heartbeat", vcpu), EVENT_TIMEOUT_S, since=mark)


def _inject_and_observe(vm: TestVmProcess, vcpu: int, iss: Optional[int]) -> Event:
    mark = vm.mark()
    t0 = time.monotonic()
    reply = _reply(vm, {"cmd": "serror", "vcpu": vcpu, "esr": iss})
    assert reply["event"] == "ack", reply
    seen = vm.wait_event(_on("serror", vcpu), EVENT_TIMEOUT_S, since=mark)
    print(f"serror iss={iss} vcpu={vcpu}: guest ESR_EL1={seen['esr']:#x} "
          f"after {1000 * (time.monotonic() - t0):.1f} ms")  # fmt: skip
    return seen


def _no_trouble(vm: TestVmProcess) -> None:
    bad = [
        e
        for e in vm.events_seen
        if e.get("event") in ("exception", "guest-check-failed", "exit", "error")
    ]
    assert bad == []


# --- start-up


@pytest.mark.parametrize("mode", ["halt", "spin", "futex"])
def test_guest_ready_on_every_vcpu(testvm: StartVm, mode: str) -> None:
    vm = testvm(mode)
    assert vm.ready["arch"] == "arm64"
    for v in (0, 1):
        ready = vm.wait_event(_on("guest-ready", v))
        assert ready["currentel"] == 0x4  # EL1
        assert ready["sctlr"] & 0x1005 == 0x1005  # MMU, data and instruction caches on
        assert ready["mpidr"] & 0xFF == v
        assert ready["pstate_a"] is False
        hb = _heartbeat(vm, v)
        assert hb["seq"] == 1 and hb["iterations"] > 0
    if mode == "futex":
        deadline = time.monotonic() + EVENT_TIMEOUT_S
        while _heartbeat(vm, 0)["yields"] == 0:
            assert time.monotonic() < deadline, "futex mode never yielded"
            time.sleep(0.1)
    _no_trouble(vm)


def test_halted_vcpus_wait_in_kvm_run(testvm: StartVm) -> None:
    vm = testvm("halt")
    for info in vm.vcpus:
        deadline = time.monotonic() + 10
        while not _KVM_RUN_SYSCALL.search(thread_syscall(vm.pid, info.tid)):
            assert time.monotonic() < deadline, thread_syscall(vm.pid, info.tid)
            time.sleep(0.05)


# --- SErrors injected locally, seen by the guest


@pytest.mark.parametrize("mode", ["halt", "spin"])
def test_serror_syndromes_reach_the_guest(testvm: StartVm, mode: str, lab: env.LabConfig) -> None:
    if not lab.expect_ras:
        pytest.skip("needs a host with RAS (the ESR is refused otherwise; see the no-RAS test)")
    vm = testvm(mode)
    for vcpu in (0, 1):
        for iss in (ISS_CE, ISS_UER, ISS_KSELFTEST):
            seen = _inject_and_observe(vm, vcpu, iss)
            assert seen["esr"] == ESR_SERROR_BASE | iss
            assert seen["ec"] == EC_SERROR and seen["iss"] == iss
        seen = _inject_and_observe(vm, vcpu, None)
        assert seen["esr"] == ESR_SERROR_BASE | ESR_IDS  # KVM's default syndrome
        assert seen["count"] == 4
    assert _heartbeat(vm, 0)["serror_count"] == 4
    _no_trouble(vm)


def test_serror_without_ras(testvm: StartVm, lab: env.LabConfig) -> None:
    """Both directions: an ESR is refused exactly when the host has no RAS."""
    vm = testvm("halt", vcpus=1)
    reply = _reply(vm, {"cmd": "serror", "vcpu": 0, "esr": ISS_CE})
    if lab.expect_ras:
        assert reply["event"] == "ack"
        assert vm.wait_event(_on("serror", 0), EVENT_TIMEOUT_S)["esr"] == ESR_SERROR_BASE | ISS_CE
    else:
        assert reply["event"] == "error" and reply["errno"] == EINVAL
    seen = _inject_and_observe(vm, 0, None)  # works on every host
    assert seen["ec"] == EC_SERROR


def test_esr_bit_25_is_refused(testvm: StartVm) -> None:
    vm = testvm("halt", vcpus=1)
    reply = _reply(vm, {"cmd": "serror", "vcpu": 0, "esr": 1 << 25 | ISS_CE})
    assert reply["event"] == "error" and reply["errno"] == EINVAL
    events = _reply(vm, {"cmd": "events", "vcpu": 0})
    assert events["events"]["serror_pending"] is False


@pytest.mark.parametrize("mode", ["halt", "spin"])
@pytest.mark.parametrize("iss", [ISS_CE, ISS_KSELFTEST, None], ids=["ce", "kselftest", "no-esr"])
def test_masked_serror_pends_until_unmask(
    testvm: StartVm, mode: str, iss: Optional[int], lab: env.LabConfig
) -> None:
    if iss is not None and not lab.expect_ras:
        pytest.skip("needs a host with RAS")
    vm = testvm(mode, extra=["--mask-serror"])
    for v in (0, 1):
        assert vm.wait_event(_on("guest-ready", v))["pstate_a"] is True
    target, other = 1, 0
    mark = vm.mark()
    assert _reply(vm, {"cmd": "serror", "vcpu": target, "esr": iss})["event"] == "ack"
    _heartbeat(vm, target)  # the guest ran with it pending
    events = _reply(vm, {"cmd": "events", "vcpu": target})
    assert events["events"]["serror_pending"] is True
    expected_esr = ESR_IDS if iss is None else iss  # KVM's default when none is given
    if lab.expect_ras:
        assert events["events"]["serror_esr"] == expected_esr
    assert events["pstate_a"] is True
    assert [e for e in vm.events_seen[mark:] if e.get("event") == "serror"] == []
    # the other vCPU has nothing pending
    assert _reply(vm, {"cmd": "events", "vcpu": other})["events"]["serror_pending"] is False

    t0 = time.monotonic()
    assert _reply(vm, {"cmd": "unmask", "vcpu": target})["event"] == "ack"
    unmasked = vm.wait_event(_on("unmasked", target), EVENT_TIMEOUT_S, since=mark)
    assert unmasked["daif_before"] & 0x100  # PSTATE.A was set until then
    seen = vm.wait_event(_on("serror", target), EVENT_TIMEOUT_S, since=mark)
    print(f"masked {mode} iss={iss}: unmask -> serror {1000 * (time.monotonic() - t0):.1f} ms")
    if lab.expect_ras:
        assert seen["esr"] == ESR_SERROR_BASE | expected_esr
    assert seen["ec"] == EC_SERROR
    _heartbeat(vm, target)  # back in the main loop: the handler's own PSTATE.A is gone
    after = _reply(vm, {"cmd": "events", "vcpu": target})
    assert after["events"]["serror_pending"] is False and after["pstate_a"] is False
    # the other vCPU is still masked and saw nothing
    assert _reply(vm, {"cmd": "events", "vcpu": other})["pstate_a"] is True
    assert [e for e in vm.events_seen if e.get("event") == "serror" and e["vcpu"] == other] == []
    _no_trouble(vm)


# --- ext_dabt after an MMIO exit


@pytest.mark.parametrize("mode", ["spin", "halt"])
def test_ext_dabt_after_mmio_exit(testvm: StartVm, mode: str) -> None:
    vm = testvm(mode, extra=["--mmio-probe"])
    probe = vm.ready["probe_gpa"]
    for vcpu in (1, 0):
        mark = vm.mark()
        assert _reply(vm, {"cmd": "ext_dabt", "vcpu": vcpu})["event"] == "ack"
        injected = vm.wait_event(_on("ext-dabt-injected", vcpu), EVENT_TIMEOUT_S, since=mark)
        assert injected["addr"] == probe
        seen = vm.wait_event(_on("sync", vcpu), EVENT_TIMEOUT_S, since=mark)
        low = seen["esr"] & 0xFFFFFFFF  # 6.1 sign-extended it (BRIEF section 9)
        print(f"ext_dabt vcpu={vcpu}: guest ESR_EL1={seen['esr']:#x} FAR={seen['far']:#x}")
        assert low >> 26 == EC_DABT_CUR
        assert low & 0x3F == DFSC_EXTERNAL
        assert seen["far"] == probe
        assert seen["probe"] is True and seen["resumed"] is True
        before = _heartbeat(vm, vcpu)["probes"]
        assert _heartbeat(vm, vcpu)["probes"] > before  # still probing after the abort
    _no_trouble(vm)


def test_ext_dabt_needs_the_probe(testvm: StartVm) -> None:
    vm = testvm("halt", vcpus=1)
    reply = _reply(vm, {"cmd": "ext_dabt", "vcpu": 0})
    assert reply["event"] == "error" and "mmio-probe" in reply["message"]


# --- the guest's own checks


def test_self_check_catches_a_changed_register(testvm: StartVm) -> None:
    vm = testvm("spin", vcpus=1)
    _heartbeat(vm, 0)  # past its set-up: x19-x22 hold the checked values from now on
    regs = _reply(vm, {"cmd": "regs", "vcpu": 0})["regs"]
    assert regs["pstate"] & 0xF == 0x5  # EL1h
    mark = vm.mark()
    assert _reply(vm, {"cmd": "set-regs", "vcpu": 0, "regs": {"x20": 7}})["event"] == "ack"
    failed = vm.wait_event(_on("guest-check-failed", 0), EVENT_TIMEOUT_S, since=mark)
    assert failed["x20"] in (7, 6)  # seen before or after the loop's decrement
    assert _heartbeat(vm, 0)["check_failures"] == 1
