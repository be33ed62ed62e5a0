"""``serrinj demo``: inject into the built-in test VM and compare with what its guest saw.

The demo starts ``python -m serrinj.testvm`` for the host's architecture as a
separate process (through :class:`serrinj.testvm.process.TestVmProcess`), so
serrinj reaches it exactly as it reaches any VMM: by ptrace, from outside.
It reads the vCPUs' status, then injects, each time through the same use
cases the ``inject``/``mce``/``nmi`` commands call:

- x86_64: an NMI, a corrected machine check (logged in a bank, found by the
  guest's polling) and an uncorrected one (#MC);
- arm64: an SError with a RAS syndrome (CE, which a Linux guest survives; only
  on a RAS host) and one whose syndrome the CPU chooses.

For each injection the guest's own report (a JSON event from the test VM) is
compared with what was injected: the vector, the bank, MCi_STATUS/ADDR/MISC,
the ESR. Finally every vCPU is asked for a heartbeat, whose self-check
counter proves that the guest's registers and memory were left intact.

The test VM is ended by its pid whatever happens (an error, Ctrl-C, SIGTERM
or SIGHUP to serrinj).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

from serrinj.codec import esr, mce
from serrinj.errors import (
    Conflict,
    ExpectationFailed,
    Interrupted,
    KvmRejected,
    NotDelivered,
    SerrinjError,
    Unsupported,
)
from serrinj.host import kvmcaps as host
from serrinj.kvm.arch import Arch
from serrinj.ops import inject, status
from serrinj.target import attach as target
from serrinj.vcpu import probe as kvmprobe

Event = Dict[str, Any]
Progress = Callable[[str], None]

#: serrinj's arch names -> the test VM's ``--arch`` values
TESTVM_ARCH = {"x86_64": "x86_64", "aarch64": "arm64"}
VCPUS = 2
MODE = "halt"
MCE_BANK_CORRECTED = 1
MCE_BANK_UNCORRECTED = 2
MCE_ADDR = 0x12345000
WAIT_S = 5.0
EVENT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Step:
    """One injection and the guest's report of it."""

    name: str
    injected_text: str
    expected_text: str
    observed_text: str
    match: bool
    injection: Optional[Dict[str, object]] = None
    expected: Dict[str, object] = field(default_factory=dict)
    observed: Optional[Event] = None
    error: Optional[str] = None

    def as_dict(self) -> Dict[str, object]:
        return {
            "name": self.name,
            "match": self.match,
            "injected_text": self.injected_text,
            "expected_text": self.expected_text,
            "observed_text": self.observed_text,
            "expected": self.expected,
            "observed": self.observed,
            "injection": self.injection,
            "error": self.error,
        }


@dataclass(frozen=True)
class DemoResult:
    """Everything the demo did and saw; ``ok`` when every step matched."""

    arch: str
    testvm: Dict[str, object]
    status: Optional[Dict[str, object]]
    steps: Sequence[Step]
    skipped: Sequence[str] = ()

    @property
    def ok(self) -> bool:
        return bool(self.steps) and all(s.match for s in self.steps)

    def as_dict(self) -> Dict[str, object]:
        return {
            "ok": self.ok,
            "arch": self.arch,
            "testvm": self.testvm,
            "status": self.status,
            "steps": [s.as_dict() for s in self.steps],
            "skipped": list(self.skipped),
        }


def mismatch_error(result: DemoResult) -> ExpectationFailed:
    """The error that ends a demo whose guest did not see what was injected."""
    bad = [s.name for s in result.steps if not s.match]
    return ExpectationFailed(
        f"the guest did not observe what was injected: {', '.join(bad) or 'no step ran'}",
        hint="the table above shows each step; the test VM's events are in --json output",
    )


# ---------------------------------------------------------------------- signals
@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM/SIGHUP end the demo like Ctrl-C does, so the test VM is still stopped."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Optional[FrameType]) -> None:
        raise Interrupted(f"stopped by signal {signal.Signals(signum).name}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ---------------------------------------------------------------------- matching
def _bank_match(banks: Sequence[Event], bank: int, status_v: int, addr: int, misc: int) -> bool:
    return any(
        b.get("bank") == bank
        and b.get("status") == status_v
        and b.get("addr") == addr
        and b.get("misc") == misc
        for b in banks
    )


def _bank_lines(bank: object, status_v: object, addr: object) -> str:
    return f"bank {bank}\nMCi_STATUS {status_v:#018x}\nMCi_ADDR {addr:#x}"


def _banks_text(ev: Optional[Event]) -> str:
    if ev is None:
        return ""
    head = (
        f"#MC (vector {ev.get('vector')}) on vCPU {ev.get('vcpu')}"
        if ev.get("event") == "mce"
        else f"polled on vCPU {ev.get('vcpu')}"
    )
    parts = [
        _bank_lines(b.get("bank"), b.get("status", 0), b.get("addr", 0))
        for b in ev.get("banks", [])
    ]
    return "\n".join([head, *parts] if parts else [head, "no valid bank"])


class _Demo:
    def __init__(self, vm: Any, arch: str, progress: Progress) -> None:
        self.vm = vm
        self.arch = arch
        self.progress = progress

    def target(self, vcpu_id: int) -> target.Target:
        return target.resolve(self.vm.pid, None, vcpu_id)

    def step(
        self,
        name: str,
        injected_text: str,
        expected: Dict[str, object],
        expected_text: str,
        do_inject: Callable[[], List[inject.Injection]],
        wanted: Callable[[Event], bool],
        matches: Callable[[Event], bool],
        describe: Callable[[Event], str],
        check: Optional[Callable[[Dict[str, object]], Optional[str]]] = None,
    ) -> Step:
        """Inject, wait for the guest's report, compare (``check``: what is wrong with
        the injection's own report, or None)."""
        self.progress(f"{name}: injecting")
        mark = self.vm.mark()
        try:
            injs = do_inject()
        except (NotDelivered, KvmRejected, Conflict) as err:
            return Step(
                name, injected_text, expected_text, "", False, None, expected, None, str(err)
            )
        self.progress(f"{name}: waiting for the guest's report")
        inj = injs[0].as_dict()
        from serrinj.testvm.process import TestVmError

        try:
            event = self.vm.wait_event(wanted, EVENT_TIMEOUT_S, since=mark)
        except TestVmError as err:
            first = str(err).splitlines()[0]
            return Step(name, injected_text, expected_text, "", False, inj, expected, None, first)
        clean = {k: v for k, v in event.items() if k != "_t"}
        ok = matches(event)
        why = check(inj) if check is not None else None
        return Step(
            name,
            injected_text,
            expected_text,
            describe(event),
            ok and why is None,
            inj,
            expected,
            clean,
            why,
        )

    # ------------------------------------------------------------ x86_64
    def x86_steps(self) -> List[Step]:
        steps = []
        nmi_vcpu = 1 if len(self.vm.vcpus) > 1 else 0
        steps.append(
            self.step(
                "nmi",
                f"NMI to vCPU {nmi_vcpu}",
                {"event": "nmi", "vcpu": nmi_vcpu, "vector": 2},
                f"NMI (vector 2) on vCPU {nmi_vcpu}",
                lambda: inject.inject_nmi(self.target(nmi_vcpu), WAIT_S),
                lambda e: e.get("event") == "nmi" and e.get("vcpu") == nmi_vcpu,
                lambda e: e.get("vector") == 2,
                lambda e: (
                    f"NMI (vector {e.get('vector')}) on vCPU {e.get('vcpu')},"
                    f" count {e.get('count')}"
                ),
            )
        )
        steps.append(self.mce_step("corrected", MCE_BANK_CORRECTED, "mce-poll"))
        steps.append(self.mce_step("uc-fatal", MCE_BANK_UNCORRECTED, "mce"))
        return steps

    def mce_step(self, preset_name: str, bank: int, event_name: str) -> Step:
        m = mce.preset(preset_name).build(bank, MCE_ADDR)
        kind = "corrected" if preset_name == "corrected" else "uncorrected"
        how = "polled" if event_name == "mce-poll" else "#MC (vector 18)"

        def injector() -> List[inject.Injection]:
            return inject.inject_mce(self.target(0), inject.MceRequest(m), WAIT_S)

        def wanted(e: Event) -> bool:
            return e.get("event") == event_name and e.get("vcpu") == 0

        def matches(e: Event) -> bool:
            return _bank_match(e.get("banks", []), m.bank, m.status, m.addr, m.misc)

        return self.step(
            f"mce-{kind}",
            f"{kind} error to vCPU 0\n" + _bank_lines(bank, m.status, m.addr),
            {
                "event": event_name,
                "vcpu": 0,
                "bank": bank,
                "status": m.status,
                "addr": m.addr,
                "misc": m.misc,
            },
            f"{how} on vCPU 0\n" + _bank_lines(bank, m.status, m.addr),
            injector,
            wanted,
            matches,
            _banks_text,
        )

    # ------------------------------------------------------------ arm64
    def arm64_steps(self, caps: host.HostCaps) -> List[Step]:
        cases: List[Tuple[str, Optional[int], str]] = []
        if caps.serror_esr:
            cases.append(("serror-ras", esr.PRESETS["ce"], "SError, ISS 0x1811 (CE)"))
        cases.append(("serror-cpu", None, "SError, no ESR given"))
        return [
            self.serror_step(name, iss, text, idx % len(self.vm.vcpus), caps.serror_esr)
            for idx, (name, iss, text) in enumerate(cases)
        ]

    def serror_step(
        self, name: str, iss: Optional[int], text: str, vcpu_id: int, host_ras: bool = True
    ) -> Step:
        # None: a host without RAS lets the CPU choose the syndrome, so only the EC is known
        want = esr.guest_esr(iss, host_ras=host_ras)

        def injector() -> List[inject.Injection]:
            return inject.inject_serror(self.target(vcpu_id), inject.SErrorRequest(iss), WAIT_S)

        def wanted(e: Event) -> bool:
            return e.get("event") == "serror" and e.get("vcpu") == vcpu_id

        def matches(e: Event) -> bool:
            seen = int(e.get("esr", -1)) & 0xFFFFFFFF
            if want is None:
                return seen >> esr.ESR_EC_SHIFT == esr.EC_SERROR
            return seen == want

        def describe(e: Event) -> str:
            seen = int(e.get("esr", 0)) & 0xFFFFFFFF
            return f"SError exception on vCPU {e.get('vcpu')}\nESR_EL1 {seen:#x}"

        expected_text = (
            f"ESR_EL1 {want:#x}"
            if want is not None
            else f"EC {esr.EC_SERROR:#x} (syndrome chosen by the CPU)"
        )
        # the guest unmasks SErrors, so when it takes one is the kernel's business: at
        # injection (6.17+ commits it inside KVM_SET_VCPU_EVENTS) or when the vCPU runs
        commits = kvmprobe.serror_behaviour().commits_at_set
        when = None if commits is None else ("at-injection" if commits else "when-run")
        if when == "at-injection":
            expected_text += "\ntaken at injection (0 polls)"
        return self.step(
            name,
            f"{text}\nto vCPU {vcpu_id}",
            {"event": "serror", "vcpu": vcpu_id, "esr": want, "ec": esr.EC_SERROR, "timing": when},
            f"SError exception on vCPU {vcpu_id}\n{expected_text}",
            injector,
            wanted,
            matches,
            describe,
            lambda inj: _timing_mismatch(inj, when),
        )

    # ------------------------------------------------------------ both
    def self_check(self) -> Optional[Step]:
        """Ask every vCPU for a heartbeat: the guest's self-check must have found nothing."""
        from serrinj.testvm.process import TestVmError

        self.progress("guest self-check")
        failures: Dict[int, object] = {}
        iterations: Dict[int, object] = {}
        for info in self.vm.vcpus:
            mark = self.vm.mark()
            try:
                self.vm.command({"cmd": "heartbeat", "vcpu": info.vcpu_id})
                ev = self.vm.wait_event(
                    lambda e, v=info.vcpu_id: (
                        e.get("event") in ("heartbeat", "error") and e.get("vcpu") == v
                    ),
                    EVENT_TIMEOUT_S,
                    since=mark,
                )
            except TestVmError as err:
                return Step(
                    "guest-self-check",
                    "-",
                    "0 self-check failures",
                    "",
                    False,
                    error=str(err).splitlines()[0],
                )
            if ev.get("event") == "error" or "check_failures" not in ev:
                return None  # this guest has no self-check; nothing to compare
            failures[info.vcpu_id] = ev.get("check_failures")
            iterations[info.vcpu_id] = ev.get("iterations")
        ok = all(f == 0 for f in failures.values())
        observed = "\n".join(
            f"vCPU {v}: {failures[v]} failures, {iterations[v]} loops" for v in failures
        )
        return Step(
            "guest-self-check",
            "nothing: serrinj restored\nevery register and byte",
            "0 self-check failures on every vCPU",
            observed,
            ok,
            expected={"check_failures": 0},
            observed={"check_failures": failures, "iterations": iterations},
        )


def _timing_mismatch(inj: Dict[str, object], when: Optional[str]) -> Optional[str]:
    """What is wrong with an SError injection's own account of when it was taken."""
    pred = inj.get("prediction")
    delivery = inj.get("delivery")
    assert isinstance(pred, dict)
    if when is not None and pred.get("timing") != when:
        return f"predicted {pred.get('timing')!r}, the probe of the kernel says {when!r}"
    if when == "at-injection":
        if not isinstance(delivery, dict) or delivery.get("polls") != 0:
            return f"expected the SError taken at injection (0 polls), got {delivery}"
    elif when == "when-run" and isinstance(delivery, dict) and delivery.get("polls") == 0:
        return "the SError was reported taken at injection on a kernel that keeps it pending"
    return None


def _testvm_children() -> Set[int]:
    """This process's children that run the test VM."""
    out: Set[int] = set()
    me = os.getpid()
    try:
        tids = os.listdir(f"/proc/{me}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{me}/task/{tid}/children") as f:
                pids = [int(p) for p in f.read().split()]
        except OSError:
            continue
        for pid in pids:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"serrinj.testvm" in f.read():
                        out.add(pid)
            except OSError:
                continue
    return out


def _end_child(pid: int, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``, a child of ours; reap it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                done, _status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return  # reaped elsewhere (subprocess's own bookkeeping)
            if done:
                return
            time.sleep(0.01)


def _wait_guest_ready(vm: Any, arch: str) -> None:
    """Every vCPU's guest announces itself (x86: CR4.MCE is set from then on)."""
    from serrinj.testvm.process import TestVmError

    for info in vm.vcpus:
        try:
            vm.wait_event(
                lambda e, v=info.vcpu_id: e.get("event") == "guest-ready" and e.get("vcpu") == v,
                EVENT_TIMEOUT_S,
            )
        except TestVmError as err:
            raise ExpectationFailed(
                f"the test VM's guest did not start on vCPU {info.vcpu_id}",
                hint=str(err).splitlines()[0],
            ) from None


def run(
    arch: Optional[str] = None,
    progress: Optional[Progress] = None,
    *,
    vcpus: int = VCPUS,
    mode: str = MODE,
) -> DemoResult:
    """Run the demo; the test VM is stopped (by pid) before this returns or raises."""
    say: Progress = progress or (lambda _text: None)
    here = host.machine()
    arch = arch or here
    if arch not in TESTVM_ARCH:
        raise Unsupported(f"the test VM exists for x86_64 and aarch64, not {arch}")
    if arch != here:
        raise Unsupported(
            f"this host is {here}: KVM runs {here} guests only, not {arch}",
            hint="the arm64 demo runs in the arm64 lab (make lab-arm64)"
            if arch == Arch.AARCH64
            else None,
        )
    caps = host.probe()
    from serrinj.testvm.process import TestVmError, TestVmProcess

    earlier = _testvm_children()
    try:
        with _signals_interrupt():
            say("starting the test VM")
            try:
                vm = TestVmProcess.start(arch=TESTVM_ARCH[arch], vcpus=vcpus, mode=mode)
            except TestVmError as err:
                raise SerrinjError(
                    "the test VM did not start", hint=str(err).splitlines()[0]
                ) from None
            with vm:
                return _run_steps(vm, arch, mode, caps, say)
    finally:
        # The harness stops its VM on every path it sees; a signal that lands
        # inside Popen, or between start() returning and `with`, is caught here.
        for pid in _testvm_children() - earlier:
            _end_child(pid)


def _run_steps(vm: Any, arch: str, mode: str, caps: host.HostCaps, say: Progress) -> DemoResult:
    _wait_guest_ready(vm, arch)
    info: Dict[str, object] = {
        "pid": vm.pid,
        "arch": arch,
        "vcpus": len(vm.vcpus),
        "mode": mode,
        "argv": vm.argv,
    }
    say("reading the vCPUs' status")
    snap = status.status(vm.pid).as_dict()
    demo = _Demo(vm, arch, say)
    skipped: List[str] = []
    if arch == Arch.X86_64:
        steps = demo.x86_steps()
    else:
        if not caps.serror_esr:
            skipped.append("serror-ras: this host has no RAS (KVM_CAP_ARM_INJECT_SERROR_ESR is 0)")
        steps = demo.arm64_steps(caps)
    check = demo.self_check()
    if check is not None:
        steps.append(check)
    say("stopping the test VM")
    return DemoResult(arch, info, snap, steps, tuple(skipped))
