"""Unit tests of the command line: argument parsing, output and errors, arm64 paths with fakes.

The real command (``serrinj.cli.run``, the console script's body) runs in
this process with pytest's captured stdout/stderr. The use cases are
replaced at their seams: ``discover.find``/``scan`` (which VM), ``host.probe``
(the host's caps) and ``target.attach`` (the ptrace engine) yield fakes, so
the arm64 rejection paths run on any machine. A fake vCPU records every SET
it receives: "nothing was sent" is checked, not assumed.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
from dataclasses import dataclass, field, replace
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

from serrinj import cli
from serrinj.cli.render import Fields, Heading, Styled, Table, Ui, to_plain
from serrinj.codec import esr, mce
from serrinj.errors import Conflict, ExitCode, InvalidInput, PermissionDenied, TargetNotFound
from serrinj.faults import loop
from serrinj.host import kvmcaps as host
from serrinj.kvm import api
from serrinj.kvm import arm64 as kvm_arm64
from serrinj.kvm import x86_64 as kvm_x86
from serrinj.ops import audit, inject
from serrinj.remote import ptrace
from serrinj.remote.arch import X86_64, Aarch64
from serrinj.target import attach as target
from serrinj.target import discover
from serrinj.vcpu import probe as kvmprobe


@dataclass
class Out:
    rc: int
    stdout: str
    stderr: str

    @property
    def data(self) -> Dict[str, Any]:
        obj = json.loads(self.stdout)
        assert isinstance(obj, dict)
        return obj


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Any:
    def _run(*args: object) -> Out:
        rc = cli.run([str(a) for a in args])
        cap = capsys.readouterr()
        return Out(rc, cap.out, cap.err)

    return _run


# ====================================================================== fakes
def fake_vm(arch: str, vcpus: int = 1, pid: int = 4242, name: Optional[str] = "guest") -> Any:
    threads = tuple(
        discover.Thread(tid=pid + 1 + i, name=f"CPU {i}/KVM", state="in-kvm-run")
        for i in range(vcpus)
    )
    return discover.Vm(
        pid=pid,
        starttime=1,
        comm="qemu-system-x",
        name=name,
        vmm="qemu",
        arch=arch,
        uid=0,
        vm_fds=(5,),
        vcpus=tuple(
            discover.Vcpu(vcpu_id=i, fd=10 + i, thread=threads[i], mapped_by="syscall")
            for i in range(vcpus)
        ),
        threads=threads,
    )


def fake_caps(arch: str, ras: bool = True, ext_dabt: bool = True) -> host.HostCaps:
    caps = {"KVM_CAP_VCPU_EVENTS": 1}
    if arch == "aarch64":
        caps.update(
            {
                "KVM_CAP_ARM_INJECT_SERROR_ESR": int(ras),
                "KVM_CAP_ARM_INJECT_EXT_DABT": int(ext_dabt),
                "KVM_CAP_ONE_REG": 1,
            }
        )
    else:
        caps["KVM_CAP_MCE"] = 32
    return host.HostCaps(arch=arch, api_version=12, caps=caps)


@dataclass
class FakeVcpu:
    """Answers GETs from its state and records every call that changes the vCPU."""

    arch: str
    vcpu_id: int = 0
    fd: int = 10
    events: Any = None
    pstate_value: int = 0x3C5  # EL1h, DAIF all set
    sent: List[Tuple[str, Any]] = field(default_factory=list)
    #: the EL1 exception registers (``exception_state``); no exception taken yet
    exc: Dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            ("esr_el1", "elr_el1", "spsr_el1", "far_el1", "vbar_el1", "pc", "pstate"), 0
        )
    )

    def exception_state(self) -> Dict[str, int]:
        return dict(self.exc, pstate=self.pstate_value)

    def get_events(self) -> Any:
        if self.events is None:
            self.events = kvm_arm64.VcpuEvents() if self.arch == "aarch64" else kvm_x86.VcpuEvents()
        return self.events

    def pstate(self) -> int:
        return self.pstate_value

    def mp_state(self) -> int:
        return 0

    def inject_serror(self, esr_value: Optional[int]) -> None:
        self.sent.append(("serror", esr_value))
        self.events = kvm_arm64.VcpuEvents(
            serror_pending=1, serror_has_esr=1, serror_esr=esr_value or esr.KVM_DEFAULT_ISS
        )

    def inject_nmi(self) -> None:
        self.sent.append(("nmi", None))

    def inject_mce(self, m: Any) -> None:
        self.sent.append(("mce", m))


class FakeThread:
    """A stopped vCPU thread: by default it left KVM_RUN on arm64 and was in user code on x86.

    ``regs`` replaces the saved registers, ``first_stop`` the stop that seized it.
    """

    def __init__(
        self,
        arch: str,
        tid: int,
        regs: Optional[Dict[str, int]] = None,
        first_stop: Optional[ptrace.Stop] = None,
    ) -> None:
        self.tid = tid
        self.arch = Aarch64() if arch == "aarch64" else X86_64()
        self.first_stop = first_stop
        self.saved: Dict[str, int] = (
            regs
            if regs is not None
            else {"x8": 29, "x1": api.KVM_RUN}
            if arch == "aarch64"
            else {"orig_rax": -1 & (2**64 - 1)}
        )
        self.verified = True
        self.kill_safe = arch == "x86_64"
        self.kill_safe_reason = "" if self.kill_safe else "no kill-safe path on aarch64 yet"
        self.timings: Dict[str, int] = {"attach_ns": 1000}


@pytest.fixture
def fake_host(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Install a fake VM + host + engine; returns a setter and the fake vCPUs."""

    def install(
        arch: str,
        vcpus: int = 1,
        ras: bool = True,
        ext_dabt: bool = True,
        regs: Optional[Dict[str, int]] = None,
        first_stop: Optional[ptrace.Stop] = None,
        commits_at_set: Optional[bool] = False,
        **vcpu_kw: Any,
    ) -> Dict[str, Any]:
        vm = fake_vm(arch, vcpus)
        # what serrinj's probe of the kernel found (a throwaway VM of its own, arm64 only)
        found = kvmprobe.SErrorBehaviour(commits_at_set, "fake")
        monkeypatch.setattr(kvmprobe, "serror_behaviour", lambda use_cache=True: found)
        state: Dict[str, Any] = {
            "vm": vm,
            "vcpus": {i: FakeVcpu(arch, i, 10 + i, **vcpu_kw) for i in range(vcpus)},
            "attached": 0,
        }
        monkeypatch.setattr(discover, "find", lambda pid=None, name=None: vm)
        monkeypatch.setattr(discover, "scan", lambda arch=None, host=None: [vm])
        monkeypatch.setattr(host, "probe", lambda: fake_caps(arch, ras, ext_dabt))

        @contextlib.contextmanager
        def attach(
            vm_: Any, vcpu_id: int, requests: Any, *, timeout: float = 2.0
        ) -> Iterator[Tuple[Any, Any]]:
            state["attached"] += 1
            tid = vm.vcpu(vcpu_id).thread.tid
            yield state["vcpus"][vcpu_id], FakeThread(arch, tid, regs, first_stop)

        monkeypatch.setattr(target, "attach", attach)
        return state

    return install


def sent(state: Dict[str, Any]) -> List[Tuple[str, Any]]:
    return [s for v in state["vcpus"].values() for s in v.sent]


# ====================================================================== arm64 paths
def test_serror_with_esr_is_sent_with_that_iss(run: Any, fake_host: Any) -> None:
    st = fake_host("aarch64")
    r = run("inject", "--json", "--esr", "0x1811")
    assert r.rc == 0, r
    assert sent(st) == [("serror", 0x1811)]
    (inj,) = r.data["injections"]
    assert inj["request"] == {"esr": 0x1811, "has_esr": True, "force": False}
    assert inj["prediction"]["survives"] is True
    assert inj["after"]["serror_pending"] is True
    assert inj["after"]["serror_esr_decoded"]["aet_name"] == "CE"


@pytest.mark.parametrize(("severity", "iss"), sorted(esr.PRESETS.items()))
def test_severity_builds_the_ras_iss(run: Any, fake_host: Any, severity: str, iss: int) -> None:
    st = fake_host("aarch64")
    assert run("inject", "--severity", severity).rc == 0
    assert sent(st) == [("serror", iss)]


def test_esr_accepts_preset_names_and_no_esr_lets_the_cpu_choose(run: Any, fake_host: Any) -> None:
    st = fake_host("aarch64")
    assert run("inject", "--esr", "uer").rc == 0
    st2 = fake_host("aarch64")
    r = run("inject")
    assert r.rc == 0, r
    assert sent(st) == [("serror", 0xC11)] and sent(st2) == [("serror", None)]
    assert "none given: KVM/the CPU choose it" in r.stdout
    assert "SError Interrupt on CPU0, code 0x00000000bf000000" in r.stdout


def test_esr_outside_iss_rejected_before_anything(run: Any, fake_host: Any) -> None:
    st = fake_host("aarch64")
    r = run("inject", "--esr", "0x3000011")
    assert r.rc == ExitCode.USAGE
    assert "IL (bit 25)" in r.stderr and "bit 25" in r.stderr
    r = run("inject", "--json", "--esr", "0xffffffffbe000411")
    assert r.rc == ExitCode.USAGE
    assert "sign-extended" in r.data["error"]["hint"] and "0x411" in r.data["error"]["hint"]
    assert st["attached"] == 0 and sent(st) == []


def test_esr_on_host_without_ras_is_refused_with_a_hint(run: Any, fake_host: Any) -> None:
    st = fake_host("aarch64", ras=False)
    r = run("inject", "--json", "--severity", "ce")
    assert r.rc == ExitCode.UNSUPPORTED
    err = r.data["error"]
    assert "KVM_CAP_ARM_INJECT_SERROR_ESR is 0" in err["message"]
    assert "leave out --esr/--severity" in err["hint"]
    assert st["attached"] == 0 and sent(st) == []
    assert run("inject").rc == 0  # the CPU-generated form still works
    assert sent(st) == [("serror", None)]


def test_pending_serror_refused_without_force(run: Any, fake_host: Any) -> None:
    pending = kvm_arm64.VcpuEvents(serror_pending=1, serror_has_esr=1, serror_esr=0x1811)
    st = fake_host("aarch64", events=pending)
    r = run("inject", "--severity", "uc")
    assert r.rc == ExitCode.CONFLICT
    assert "already has an SError pending (ESR 0x1811)" in r.stderr and "--force" in r.stderr
    assert sent(st) == []
    r = run("inject", "--severity", "uc", "--force")
    assert r.rc == 0 and sent(st) == [("serror", 0x11)]


def test_serror_taken_at_set_time_counts_as_delivered(
    run: Any, fake_host: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Since Linux 6.17 KVM puts an unmasked SError into the vCPU's registers inside
    KVM_SET_VCPU_EVENTS: the read-back shows nothing pending and PC at the SError vector.
    inject reports it delivered at injection, with or without ``--wait`` (0 polls, no
    polling session), with ESR_EL1 as the guest will read it."""
    st = fake_host("aarch64", commits_at_set=True, pstate_value=0x3C5 & ~kvm_arm64.PSTATE_A)
    vcpu = st["vcpus"][0]

    def taken_at_set(esr_value: Optional[int]) -> None:
        vcpu.sent.append(("serror", esr_value))
        vcpu.events = kvm_arm64.VcpuEvents(serror_pending=0, serror_has_esr=1)
        vcpu.exc.update(esr_el1=0xBE000000 | (esr_value or 0), vbar_el1=0x80000, pc=0x80380)

    monkeypatch.setattr(vcpu, "inject_serror", taken_at_set)
    for wait in (["--wait", "1"], []):
        r = run("inject", "--severity", "ce", *wait, "--json")
        assert r.rc == 0, r
        (inj,) = r.data["injections"]
        assert inj["after"]["serror_pending"] is False
        taken = inj["after"]["last_exception"]
        assert taken["serror"] and taken["at_serror_vector"] and taken["esr_el1"] == 0xBE001811
        assert taken["syndrome"]["aet_name"] == "CE"
        assert inj["prediction"]["timing"] == "at-injection"
        assert inj["prediction"]["kvm_commits_at_set"] is True
        d = inj["delivery"]
        assert d["delivered"] is True and d["polls"] == 0 and d["latency_s"] >= 0
        # the fake thread left KVM_RUN: the guest handles it as the vCPU continues
        assert d["reason"].startswith("taken at injection") and "continues" in d["reason"]
    assert sent(st) == [("serror", 0x1811)] * 2
    assert st["attached"] == 2  # no polling session
    r = run("inject", "--severity", "ce")
    assert "SError taken: ESR_EL1 0xbe001811 (CE); in the guest's registers" in r.stdout, r
    assert "taken: at-injection" in r.stdout, r


def test_serror_into_a_paused_vm_says_it_is_handled_on_resume(
    run: Any, fake_host: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A vCPU thread outside KVM_RUN (VM paused): the SError committed at SET is in the
    guest's registers, and the report says the guest handles it when the VM resumes."""
    st = fake_host("aarch64", commits_at_set=True, pstate_value=0x2C5)
    monkeypatch.setattr(loop, "thread_state", lambda before, rt, fd: "userspace")
    vcpu = st["vcpus"][0]

    def taken_at_set(esr_value: Optional[int]) -> None:
        vcpu.events = kvm_arm64.VcpuEvents(serror_pending=0, serror_has_esr=1)
        vcpu.exc.update(esr_el1=0xBF000000, vbar_el1=0x80000, pc=0x80380)

    monkeypatch.setattr(vcpu, "inject_serror", taken_at_set)
    r = run("inject", "--json")
    assert r.rc == 0, r
    (inj,) = r.data["injections"]
    assert inj["thread_state"] == "userspace"
    assert "when the VM resumes" in inj["delivery"]["reason"]


def test_serror_read_back_not_pending_without_a_vector_pc(
    run: Any, fake_host: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing pending after SET but the PC not at an SError vector: not claimed as taken
    without --wait; --wait reports it delivered at injection time without polling."""
    st = fake_host("aarch64", pstate_value=0x3C5 & ~kvm_arm64.PSTATE_A)
    vcpu = st["vcpus"][0]

    def gone(esr_value: Optional[int]) -> None:
        vcpu.sent.append(("serror", esr_value))
        vcpu.events = kvm_arm64.VcpuEvents(serror_pending=0, serror_has_esr=1)

    monkeypatch.setattr(vcpu, "inject_serror", gone)
    r = run("inject", "--severity", "ce", "--json")
    assert r.rc == 0 and r.data["injections"][0]["delivery"] is None, r
    assert r.data["injections"][0]["prediction"]["timing"] == "when-run"
    r = run("inject", "--severity", "ce", "--wait", "1", "--json")
    (inj,) = r.data["injections"]
    assert inj["delivery"]["delivered"] is True and inj["delivery"]["polls"] == 0
    assert inj["delivery"]["reason"] == "taken at injection time"


@pytest.mark.parametrize(
    ("commits", "pstate", "timing"),
    [
        (True, 0x2C5, "at-injection"),
        (True, 0x3C5, "when-unmasked"),
        (False, 0x2C5, "when-run"),
        (False, 0x3C5, "when-unmasked"),
        (None, 0x2C5, "unknown"),
    ],
)
def test_dry_run_predicts_when_the_serror_is_taken(
    run: Any, fake_host: Any, commits: Optional[bool], pstate: int, timing: str
) -> None:
    """--dry-run predicts the timing from the probe of the kernel and the vCPU's PSTATE.A."""
    st = fake_host("aarch64", commits_at_set=commits, pstate_value=pstate)
    r = run("inject", "--json", "--dry-run", "--severity", "ce")
    assert r.rc == 0, r
    pred = r.data["injections"][0]["prediction"]
    assert pred["timing"] == timing and pred["kvm_commits_at_set"] is commits
    assert r.data["injections"][0]["delivery"] is None and sent(st) == []


def test_dry_run_reads_but_sends_nothing(run: Any, fake_host: Any) -> None:
    st = fake_host("aarch64")
    r = run("inject", "--json", "--dry-run", "--esr", "0x11")
    assert r.rc == 0, r
    assert r.data["dry_run"] is True and r.data["injections"][0]["dry_run"] is True
    assert r.data["injections"][0]["prediction"]["survives"] is False
    assert st["attached"] == 1 and sent(st) == []
    r = run("inject", "--dry-run", "--esr", "0x11")
    assert "Would inject an SError" in r.stdout and "nothing (--dry-run)" in r.stdout


def test_ext_dabt_refused_when_the_host_cannot_inject_one(run: Any, fake_host: Any) -> None:
    st = fake_host("aarch64", ext_dabt=False)
    n = len(audit.read())
    r = run("inject", "--json", "--ext-dabt")
    assert r.rc == ExitCode.UNSUPPORTED, r
    assert r.data["error"]["message"] == (
        "this host cannot inject external data aborts: KVM_CAP_ARM_INJECT_EXT_DABT is 0"
    )
    assert st["attached"] == 0 and sent(st) == []
    (rec,) = audit.read()[n:]
    assert (rec["action"], rec["outcome"]) == ("inject-ext-dabt", "refused")
    # the same host injects SErrors
    assert run("inject").rc == 0 and sent(st) == [("serror", None)]


def test_ext_dabt_refuses_wait_before_anything(
    run: Any, fake_host: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    st = fake_host("aarch64")
    n = len(audit.read())
    for wait in (["--wait"], ["--wait=1"], ["--wait", "0.5", "--dry-run"]):
        r = run("inject", "--json", "--ext-dabt", *wait)
        assert r.rc == ExitCode.USAGE, (wait, r)
        err = r.data["error"]
        assert err["kind"] == "invalid-input"
        assert err["message"].startswith("--wait does not apply to --ext-dabt")
        assert "--mmio-timeout bounds the wait" in err["hint"]
    assert st["attached"] == 0 and sent(st) == []
    records = audit.read()[n:]
    assert [(x["action"], x["outcome"]) for x in records] == [("inject-ext-dabt", "refused")] * 3
    # the use case refuses it too (campaigns and API callers), before it probes or attaches
    monkeypatch.setattr(host, "probe", lambda: pytest.fail("probed the host"))
    tgt = target.Target(st["vm"], (0,))
    with pytest.raises(InvalidInput, match="--wait does not apply to --ext-dabt"):
        inject.inject_ext_dabt(tgt, inject.ExtDabtRequest(), 1.0)
    rec = audit.read()[-1]
    assert (rec["action"], rec["outcome"], rec["request"]["wait"]) == (
        "inject-ext-dabt",
        "refused",
        1.0,
    )
    assert st["attached"] == 0


# where the vCPU thread was when --wait ran out, and what the error says about it
_HALTED = "the vCPU has not entered the guest since (halted, or not scheduled)"
_PAUSED = "the vCPU thread is not running the guest (VM paused or the VMM is busy)"
_STOPPED = "the VMM process is stopped (SIGSTOP); continue it with SIGCONT"
_GROUP_STOP = ptrace.Stop(ptrace.StopKind.EVENT_STOP, signal.SIGSTOP)
_FUTEX_ARM64 = 98
_FUTEX_X86 = 202


@pytest.mark.parametrize(
    ("regs", "first_stop", "reason"),
    [
        ({"x8": 29, "x1": api.KVM_RUN}, None, _HALTED),  # left ioctl(fd, KVM_RUN)
        ({"x8": _FUTEX_ARM64, "x1": 0x80}, None, _PAUSED),  # a paused QEMU waits in a futex
        ({"x8": 29, "x1": 0x8040AE9F}, None, _PAUSED),  # another ioctl than KVM_RUN
        ({"x8": 29, "x1": api.KVM_RUN}, _GROUP_STOP, _STOPPED),
    ],
    ids=["halted", "paused", "other-ioctl", "stopped"],
)
def test_arm64_wait_timeout_explains_where_the_vcpu_thread_was(
    run: Any, fake_host: Any, regs: Dict[str, int], first_stop: Any, reason: str
) -> None:
    # SErrors unmasked (PSTATE.A=0), and the fake SError stays pending
    fake_host("aarch64", regs=regs, first_stop=first_stop, pstate_value=0x3C5 & ~0x100)
    r = run("inject", "--json", "--severity", "ce", "--wait", "0.05")
    assert r.rc == ExitCode.NOT_DELIVERED, r
    assert r.data["error"]["message"] == (
        f"the serror was still pending on vCPU 0 after 0.05 s: {reason}"
    )


@pytest.mark.parametrize(
    ("regs", "first_stop", "reason"),
    [
        ({"orig_rax": 16, "rsi": api.KVM_RUN, "rdi": 10}, None, _HALTED),
        ({"orig_rax": 2**64 - 1, "rsi": 0, "rdi": 0}, None, _PAUSED),  # user code
        ({"orig_rax": _FUTEX_X86, "rsi": 0x80, "rdi": 0}, None, _PAUSED),
        ({"orig_rax": 16, "rsi": api.KVM_RUN, "rdi": 10}, _GROUP_STOP, _STOPPED),
    ],
    ids=["halted", "paused-user", "paused-futex", "stopped"],
)
def test_x86_wait_timeout_explains_where_the_vcpu_thread_was(
    run: Any, fake_host: Any, regs: Dict[str, int], first_stop: Any, reason: str
) -> None:
    pending = kvm_x86.VcpuEvents(nmi=kvm_x86.Nmi(pending=1))
    fake_host("x86_64", regs=regs, first_stop=first_stop, events=pending)
    r = run("nmi", "--json", "--wait", "0.05")
    assert r.rc == ExitCode.NOT_DELIVERED, r
    assert r.data["error"]["message"] == (
        f"the nmi was still pending on vCPU 0 after 0.05 s: {reason}"
    )


def test_x86_commands_on_arm64_point_to_inject(run: Any, fake_host: Any) -> None:
    st = fake_host("aarch64", vcpus=2)
    for args in (["nmi"], ["nmi", "--vcpu", "all"], ["mce", "--bank", 1, "--preset", "ce"]):
        r = run(*args)
        assert r.rc == ExitCode.UNSUPPORTED, r
        assert "for x86_64 VMs; this VM is aarch64" in r.stderr
        assert "serrinj inject" in r.stderr
    assert st["attached"] == 0


def test_serror_on_x86_points_to_mce_and_nmi(run: Any, fake_host: Any) -> None:
    st = fake_host("x86_64", vcpus=2)
    for args in (["inject"], ["inject", "--esr", "0x1811"], ["inject", "--ext-dabt"]):
        r = run("--json", *args)
        assert r.rc == ExitCode.UNSUPPORTED, r
        assert "serrinj mce" in r.data["error"]["hint"] and "serrinj nmi" in r.data["error"]["hint"]
    assert st["attached"] == 0


def test_status_decodes_arm64_events(run: Any, fake_host: Any) -> None:
    pending = kvm_arm64.VcpuEvents(serror_pending=1, serror_has_esr=1, serror_esr=0x0C11)
    fake_host("aarch64", events=pending)
    r = run("status", "--json")
    assert r.rc == 0, r
    (v,) = r.data["vcpus"]
    assert v["events"]["serror_masked"] is True
    assert v["events"]["serror_esr_decoded"]["aet_name"] == "UER"
    assert v["pstate_decoded"]["A"] is True
    r = run("status")
    assert "SError pending (ISS 0xc11, UER)" in r.stdout
    assert "SErrors masked (PSTATE.A=1)" in r.stdout


# ====================================================================== argument parsing
@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> Dict[str, Any]:
    """Replace the injection use cases with recorders."""
    calls: Dict[str, Any] = {}

    def record(kind: str) -> Any:
        def fn(tgt: Any, *args: Any, **kw: Any) -> List[Any]:
            calls[kind] = (tgt, args, kw)
            return []

        return fn

    for kind in ("inject_serror", "inject_ext_dabt", "inject_nmi", "inject_mce"):
        monkeypatch.setattr(inject, kind, record(kind))
    return calls


def test_wait_takes_an_optional_timeout(run: Any, fake_host: Any, captured: Any) -> None:
    fake_host("x86_64")
    assert run("nmi").rc == 0
    assert captured["inject_nmi"][1] == (None,)
    assert run("nmi", "--wait").rc == 0
    assert captured["inject_nmi"][1] == (cli.DEFAULT_WAIT_S,)
    assert run("nmi", "--wait=0.25").rc == 0
    assert captured["inject_nmi"][1] == (0.25,)
    assert run("nmi", "--wait", "2", "--dry-run").rc == 0
    assert captured["inject_nmi"][1] == (2.0,)
    assert captured["inject_nmi"][2] == {"dry_run": True, "readback": True}
    assert run("nmi", "--no-readback").rc == 0
    assert captured["inject_nmi"][2] == {"dry_run": False, "readback": False}
    assert run("mce", "--bank", "1", "--preset", "ce", "--no-readback").rc == 0
    assert captured["inject_mce"][2] == {"dry_run": False, "readback": False}
    assert run("nmi", "--wait=0").rc == ExitCode.USAGE


def test_vcpu_selection(run: Any, fake_host: Any, captured: Any) -> None:
    fake_host("x86_64", vcpus=3)
    r = run("nmi")
    assert r.rc == ExitCode.USAGE and "choose one with --vcpu ID, or --vcpu all" in r.stderr
    assert "vCPU ids: 0, 1, 2" in r.stderr
    assert run("nmi", "--vcpu", "all").rc == 0
    assert captured["inject_nmi"][0].vcpu_ids == (0, 1, 2)
    assert run("nmi", "--vcpu", "0x2").rc == 0
    assert captured["inject_nmi"][0].vcpu_ids == (2,)
    assert run("nmi", "--vcpu", "9").rc == ExitCode.NOT_FOUND
    r = run("nmi", "--vcpu", "first")
    assert r.rc == ExitCode.USAGE and "'all'" in r.stderr


def test_mce_options(run: Any, fake_host: Any, captured: Any) -> None:
    fake_host("x86_64")
    assert run("mce", "--bank", 4, "--preset", "srar", "--addr", "0x1000", "--force").rc == 0
    req = captured["inject_mce"][1][0]
    p = mce.PRESETS["srar"]
    assert req.force is True
    assert req.mce == kvm_x86.Mce(
        status=p.status, bank=4, addr=0x1000, misc=p.misc, mcg_status=p.mcg_status
    )
    assert run("mce", "--bank", 0, "--status", "VAL,UC,EN", "--mcg-status", "mcip,eipv").rc == 0
    m = captured["inject_mce"][1][0].mce
    assert m.status == mce.encode_status("val", "uc", "en")
    assert m.mcg_status == kvm_x86.MCG_STATUS_MCIP | kvm_x86.MCG_STATUS_EIPV
    assert (m.addr, m.misc) == (0, 0)
    assert (
        run("mce", "--bank", 0, "--preset", "ce", "--misc", "0", "--status", "0x8" + "0" * 15).rc
        == 0
    )
    m = captured["inject_mce"][1][0].mce
    assert m.status == 1 << 63 and m.misc == 0
    for args, words in (
        (["--bank", 40, "--preset", "ce"], "bank 40 does not exist"),
        (["--bank", -1, "--preset", "ce"], "numbered from 0"),
        (["--bank", 1, "--status", "0x1"], "lacks VAL"),
        (["--bank", 1, "--status", "-1"], "negative"),
        (["--bank", 1, "--preset", "nope"], "Invalid value for '--preset'"),
    ):
        r = run("mce", *args)
        assert r.rc == ExitCode.USAGE and words in r.stderr, (args, r)


def test_inject_option_combinations(run: Any, fake_host: Any, captured: Any) -> None:
    fake_host("aarch64")
    for args, words in (
        (["--esr", "0x11", "--severity", "ce"], "either --esr or --severity"),
        (["--ext-dabt", "--esr", "0x11"], "--ext-dabt takes no syndrome"),
        (["--ext-dabt", "--force"], "--ext-dabt takes no syndrome"),
        (["--mmio-addr", "0x9000000"], "go with --ext-dabt"),
        (["--ext-dabt", "--mmio-timeout", "0"], "must be positive"),
        (["--severity", "fatal"], "Invalid value for '--severity'"),
    ):
        r = run("inject", *args)
        assert r.rc == ExitCode.USAGE and words in r.stderr, (args, r)
    assert captured == {}
    assert run("inject", "--ext-dabt", "--mmio-addr", "0x9000000", "--mmio-timeout", "1.5").rc == 0
    req = captured["inject_ext_dabt"][1][0]
    assert (req.mmio_addr, req.mmio_timeout) == (0x9000000, 1.5)


def test_fd_and_vcpu_must_agree(
    run: Any, fake_host: Any, captured: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_host("x86_64", vcpus=2)
    monkeypatch.setattr(
        target,
        "resolve_fd",
        lambda fd, pid=None: target.FdResolution(1, local=False, owner_pid=4242, owner_fd=fd),
    )
    assert run("nmi", "--fd", 11).rc == 0
    assert captured["inject_nmi"][0].vcpu_ids == (1,)
    r = run("nmi", "--fd", 11, "--vcpu", 0)
    assert r.rc == ExitCode.USAGE and "is vCPU 1, but --vcpu says 0" in r.stderr


def test_target_choice_with_several_vms(
    run: Any, monkeypatch: pytest.MonkeyPatch, captured: Any
) -> None:
    a, b = fake_vm("x86_64", pid=100, name="a"), fake_vm("x86_64", pid=200, name="b")
    monkeypatch.setattr(discover, "scan", lambda arch=None, host=None: [a, b])
    monkeypatch.setattr(discover, "hidden", lambda host=None: ())  # no process hidden from serrinj
    r = run("nmi")
    assert r.rc == ExitCode.USAGE
    assert "2 VMs are running" in r.stderr and "'a' (pid 100)" in r.stderr
    assert "'b' (pid 200)" in r.stderr
    assert run("nmi", "--name", "b").rc == 0
    assert captured["inject_nmi"][0].vm.pid == 200
    r = run("nmi", "--name", "c")
    assert r.rc == ExitCode.NOT_FOUND and "no VM named 'c'" in r.stderr
    monkeypatch.setattr(discover, "scan", lambda arch=None, host=None: [b])
    assert run("nmi").rc == 0  # the only VM on the host is the target
    assert captured["inject_nmi"][0].vm.pid == 200


# ====================================================================== list
def _unmapped(vm: Any) -> Any:
    return replace(vm, vcpus=tuple(replace(v, thread=None, mapped_by="") for v in vm.vcpus))


def test_list_warns_about_hidden_processes_and_fails_when_nothing_is_seen(
    run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = fake_vm("x86_64", pid=100, name="a")
    monkeypatch.setattr(discover, "scan", lambda arch=None, host=None: [a])
    monkeypatch.setattr(discover, "hidden", lambda host=None: (7, 8))
    r = run("list", "--json")
    assert r.rc == 0, r
    assert [vm["pid"] for vm in r.data["vms"]] == [100]
    assert r.stderr == (
        "warning: serrinj may not read the fds of 2 processes; a VM among them is not listed"
        " (run as root to see every VM)\n"
    )
    monkeypatch.setattr(discover, "scan", lambda arch=None, host=None: [])
    monkeypatch.setattr(
        discover, "hidden_error", lambda denied: PermissionDenied(f"hidden: {list(denied)}")
    )
    r = run("list")
    assert r.rc == ExitCode.PERMISSION and r.stderr == "error: hidden: [7, 8]\n"
    monkeypatch.setattr(discover, "hidden", lambda host=None: ())
    r = run("list")
    assert r.rc == 0 and r.stderr == "no KVM VMs are running on this host\n"
    # --pid/--name ask discover.find, and never look for hidden processes
    monkeypatch.setattr(
        discover, "hidden", lambda host=None: pytest.fail("scanned for hidden processes")
    )
    monkeypatch.setattr(discover, "find", lambda pid=None, name=None: a)
    assert run("list", "--json", "--name", "a").data["vms"][0]["name"] == "a"


def test_list_probe_maps_unmapped_vcpus_and_warns_for_one_vm_of_several(
    run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = fake_vm("x86_64", pid=100, name="a")
    b, c = (
        _unmapped(fake_vm("x86_64", pid=200, name="b")),
        _unmapped(fake_vm("x86_64", pid=300, name=None)),
    )
    probed: List[int] = []

    def probe(vm: Any, timeout: float = 0.5) -> Any:
        probed.append(vm.pid)
        if vm.pid == 300:
            raise Conflict("thread 301 is traced by another process")
        return fake_vm("x86_64", pid=vm.pid, name=vm.name)

    monkeypatch.setattr(discover, "scan", lambda arch=None, host=None: [a, b, c])
    monkeypatch.setattr(discover, "hidden", lambda host=None: ())
    monkeypatch.setattr(discover, "probe", probe)
    r = run("list", "--json")
    assert r.rc == 0 and probed == []  # no --probe: nothing is stopped
    assert [v["tid"] for vm in r.data["vms"] for v in vm["vcpus"]] == [101, None, None]
    r = run("list", "--json", "--probe")
    assert r.rc == 0, r
    assert probed == [200, 300]  # only the VMs with unmapped vCPUs
    assert [v["tid"] for vm in r.data["vms"] for v in vm["vcpus"]] == [101, 201, None]
    assert r.stderr == "warning: cannot probe pid 300: thread 301 is traced by another process\n"
    # the only VM asked for: its probe failure is the command's error
    monkeypatch.setattr(discover, "find", lambda pid=None, name=None: c)
    r = run("list", "--probe", "--pid", 300)
    assert r.rc == ExitCode.CONFLICT
    assert r.stderr == "error: thread 301 is traced by another process\n"


# ====================================================================== esr
def test_esr_encode_every_field(run: Any) -> None:
    r = run("esr", "encode", "--json", "--aet", 7, "--ea", "--iesb")
    assert r.rc == 0, r
    assert r.data["iss"] == 0x11 | (7 << 10) | (1 << 9) | (1 << 13)
    assert r.data["syndrome"]["aet_name"] == "reserved"
    assert run("esr", "encode", "--json").data["iss"] == 0x11
    assert run("esr", "encode", "--json", "--dfsc", "0").data["iss"] == 0
    r = run("esr", "encode", "--dfsc", "0", "--severity", "ce")
    assert r.rc == ExitCode.USAGE and "only with DFSC 0x11" in r.stderr
    r = run("esr", "encode", "--aet", 8)
    assert r.rc == ExitCode.USAGE and "--aet" in r.stderr


def test_esr_decode_forms(run: Any) -> None:
    d = run("esr", "decode", "--json", "--form", "esr", "0x11").data["syndrome"]
    assert d["form"] == "esr" and d["is_serror"] is False
    r = run("esr", "decode", "--form", "iss", "0x2000000")
    assert r.rc == ExitCode.USAGE and "not an ISS" in r.stderr
    r = run("esr", "decode", "0xffffffffbe000011")
    assert r.rc == 0 and "low 32 bits 0xbe000011" in r.stdout
    assert "sign-extended" in r.stdout


# ====================================================================== output and errors
def test_json_envelope_and_error_object(run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    d = run("--json", "esr", "decode", "0x1811").data
    assert list(d)[:2] == ["schema", "command"]
    assert d["schema"] == "serrinj/1" and d["command"] == "esr decode"

    def gone(pid: Any = None, name: Any = None) -> Any:
        raise TargetNotFound(f"no process with pid {pid}", hint="is it running?")

    monkeypatch.setattr(discover, "find", gone)
    r = run("status", "--pid", 7, "--json")
    assert r.rc == ExitCode.NOT_FOUND
    assert r.data == {
        "schema": "serrinj/1",
        "command": "status",
        "error": {
            "kind": "target-not-found",
            "message": "no process with pid 7",
            "hint": "is it running?",
            "exit_code": 3,
        },
    }
    assert r.stderr == "error: no process with pid 7\nhint: is it running?\n"
    r = run("status", "--pid", 7)
    assert r.stdout == "" and r.stderr.startswith("error: no process")


def test_internal_errors_interrupts_and_debug(run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(pid: Any = None, name: Any = None) -> Any:
        raise RuntimeError("kaboom")

    monkeypatch.setattr(discover, "find", boom)
    r = run("status", "--pid", 1)
    assert r.rc == ExitCode.ERROR
    assert "internal error: RuntimeError: kaboom" in r.stderr and "Traceback" not in r.stderr
    r = run("--debug", "status", "--pid", 1)
    assert r.rc == ExitCode.ERROR and "Traceback" in r.stderr

    def interrupt(pid: Any = None, name: Any = None) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(discover, "find", interrupt)
    r = run("status", "--pid", 1, "--json")
    assert r.rc == ExitCode.INTERRUPTED == 130
    assert r.data["error"]["kind"] == "interrupted"


def test_usage_errors(run: Any) -> None:
    r = run("frobnicate")
    assert r.rc == ExitCode.USAGE and r.stderr.startswith("error: No such command")
    r = run("--json", "status", "--pid", "abc")
    assert r.rc == ExitCode.USAGE and r.data["error"]["kind"] == "usage"
    assert r.data["command"] == "status"
    r = run()
    assert r.rc == ExitCode.USAGE and "Commands:" in r.stdout + r.stderr
    assert run("--help").rc == 0 and run("--version").rc == 0


def test_plain_output_has_no_ansi_and_rich_output_has(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = [
        Heading("VM"),
        Fields([("state", Styled("halted", "green")), ("long", "a\nb")]),
        Table(["x", "why"], [["1", Styled("bad", "bold red")], ["22", "two\nlines"]]),
    ]
    text = to_plain(doc)
    assert "\x1b" not in text
    assert text.splitlines() == [
        "VM",
        "  state:  halted",
        "  long:   a",
        "          b",
        "  x   why",
        "  1   bad",
        "",
        "  22  two",
        "      lines",
    ]
    Ui(color="always").emit({}, lambda _d: doc)
    assert "\x1b[" in capsys.readouterr().out
    monkeypatch.setenv("NO_COLOR", "1")
    Ui(color="auto").emit({}, lambda _d: doc)
    assert "\x1b" not in capsys.readouterr().out  # a pipe: plain text


def test_exit_code_table_covers_the_enum() -> None:
    assert set(cli.EXIT_CODE_DOCS) == set(ExitCode)
    assert all(cli.EXIT_CODE_DOCS[c] for c in ExitCode)


def test_hard_coded_choices_match_the_codecs() -> None:
    assert set(cli.SEVERITY_CHOICES) == set(esr.SEVERITIES)
    assert set(cli.MCE_PRESET_CHOICES) == set(mce.PRESETS) | set(mce.PRESET_ALIASES)


def test_completion_offers_live_values(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = fake_vm("x86_64", vcpus=2, pid=100, name="alpha"), fake_vm("x86_64", pid=200, name="b")
    monkeypatch.setattr(discover, "scan", lambda arch=None, host=None: [a, b])
    ctx = cli.cli.make_context("serrinj", ["nmi"], resilient_parsing=True)
    assert [i.value for i in cli._complete_pid(ctx, None, "1")] == ["100"]  # type: ignore[arg-type]
    assert [i.value for i in cli._complete_name(ctx, None, "a")] == ["alpha"]  # type: ignore[arg-type]
    assert [i.value for i in cli._complete_vcpu(ctx, None, "")] == ["0", "1", "all"]  # type: ignore[arg-type]
    ctx.params["pid"] = 200
    assert [i.value for i in cli._complete_vcpu(ctx, None, "")] == ["0", "all"]  # type: ignore[arg-type]

    def broken(arch: Any = None) -> Any:
        raise PermissionError("no /proc")

    monkeypatch.setattr(discover, "scan", broken)
    assert cli._complete_pid(ctx, None, "") == []  # type: ignore[arg-type]


def test_help_and_json_paths_do_not_load_rich_rendering() -> None:
    for args in (["--help"], ["esr", "decode", "--json", "0x1811"], ["inject", "--help"]):
        out = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "serrinj", *args],
            capture_output=True,
            text=True,
            check=True,
        )
        loaded = [line.split("|")[-1].strip() for line in out.stderr.splitlines()]
        assert not [m for m in loaded if m.startswith("rich.")], args
        assert "serrinj.cli" in loaded


# ====================================================================== --lock-wait
@pytest.mark.parametrize("value", ["x", "-1", "nan"])
def test_bad_lock_wait_is_a_usage_error_from_the_option_or_the_environment(
    run: Any, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    from serrinj.ops import guard

    monkeypatch.setattr(guard, "LOCK_WAIT", guard.LOCK_WAIT)  # the option sets it
    r = run("--lock-wait", value, "esr", "decode", "0x1811")
    assert r.rc == ExitCode.USAGE and "--lock-wait" in r.stderr, r
    monkeypatch.setenv("SERRINJ_LOCK_WAIT", value)
    r = run("esr", "decode", "0x1811")
    assert r.rc == ExitCode.USAGE and "--lock-wait" in r.stderr, r
    assert guard._lock_wait_from_env() == 10.0  # the module itself never fails on it
    monkeypatch.setenv("SERRINJ_LOCK_WAIT", "2.5")
    assert guard._lock_wait_from_env() == 2.5
    r = run("esr", "decode", "0x1811")
    assert r.rc == 0 and guard.LOCK_WAIT == 2.5, r
