"""serrinj's CLI against the built-in test VM's arm64 guest, each a separate process.

serrinj is run exactly as a user runs it (``python3 -m serrinj --json ...``);
every check is on what the *guest* read from its own ESR_EL1/FAR_EL1 (the test
VM reports it as JSON events) or on what the VMM itself reads from KVM, never
on serrinj's word alone.

One test VM per guest mode, shared by that mode's tests, started with
``--mask-serror``:

- ``halt``: the guest waits in ``wfi``, so its vCPU threads block in KVM_RUN.
  Two vCPUs: the fixture unmasks vCPU 0, which takes every SError at once,
  while vCPU 1 keeps one pending until the test unmasks it.
- ``spin``: the guest never waits, so serrinj always stops a thread in guest
  mode. One vCPU (a spinning vCPU keeps one of the emulated host's two CPUs
  busy, and serrinj needs the other): it is the masked one until the masked
  test unmasks it, and the syndrome test then uses it unmasked.

Each mode runs the status checks, the masked-SError story and the syndrome
checks, with the same syndrome set (every ``--severity``, the ``--esr`` values
issue 4 names that no severity makes, and the CPU's own): the suite with the
guest halted, then the same suite with it busy-spinning. A value two forms
would make alike (``--esr 0x0c11`` is ``--severity uer``) runs once, since a
call costs seconds in the emulated host. The tests with a VM of their own
come first, so that no spinning guest of the shared VMs runs beside them.
A test that needs a masked vCPU after another test unmasked the last one
gets a fresh VM, so the tests hold in any order or selection.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

from lab.guest import env
from lab.guest.cli import CliResult, serrinj
from lab.guest.testvm import (
    EVENT_TIMEOUT_S,
    heartbeat,
    local_events,
    on,
    serrors,
    start,
    trouble,
    unmask,
)
from serrinj.testvm.process import TestVmProcess

ESR_SERROR = 0xBE000000  # EC 0x2F and IL, which the CPU adds to the injected ISS
IDS = 1 << 24
EC_SERROR = 0x2F
EC_DABT_CUR = 0x25
DFSC_EXTERNAL_ABORT = 0x10
PSTATE_A = 1 << 8
PSTATE_DAIF_MODE = 0x3CF  # D, A, I, F and M[3:0]: what a running guest does not change
#: what BRIEF section 3 says each severity is (the CLI builds it, the guest must read it)
SEVERITY_ISS = {"ce": 0x1811, "ueo": 0x0811, "uer": 0x0C11, "ueu": 0x0411, "uc": 0x0011}
Case = Tuple[str, Optional[str], Optional[int]]  # (option, its value, the ISS)
#: one syndrome set for both guest modes: every severity, the ISS values issue 4 names
#: that no severity makes (0x1811 once more as --esr, to show the two forms agree),
#: and the CPU's own syndrome (None)
CASES: List[Case] = [
    *[("--severity", name, iss) for name, iss in SEVERITY_ISS.items()],
    ("--esr", "0x1811", 0x1811),
    ("--esr", "0x101d1ed", 0x101D1ED),
    ("--esr", "0x0", 0x0),
    ("none", None, None),
]
#: Linux's verdict (BRIEF section 3): only CE and UEO are survived
SURVIVES = {0x1811: True, 0x0811: True}


@dataclass
class Guest:
    """A shared test VM and which of its vCPUs still mask SErrors."""

    mode: str
    vm: Optional[TestVmProcess] = None
    masked: Dict[int, bool] = field(default_factory=dict)

    @property
    def vcpus(self) -> int:
        return 2 if self.mode == "halt" else 1

    def start(self) -> TestVmProcess:
        """A fresh VM (the old one stopped): every vCPU masked, but vCPU 0 with two."""
        self.stop()
        self.vm = start(self.mode, vcpus=self.vcpus, extra=["--mask-serror"])
        self.masked = {v: True for v in range(self.vcpus)}
        if self.vcpus > 1:
            self.ensure_unmasked(0)
        return self.vm

    def stop(self) -> None:
        if self.vm is not None:
            self.vm.stop()
            self.vm = None

    @property
    def running(self) -> TestVmProcess:
        assert self.vm is not None
        return self.vm

    def masked_vcpu(self) -> int:
        """The vCPU that still masks SErrors; a fresh VM if a test unmasked the last one
        (the tests then hold in any order, or alone)."""
        if not any(self.masked.values()):
            self.start()
        return max(v for v, m in self.masked.items() if m)

    @property
    def unmasked_vcpu(self) -> int:
        return 0

    def ensure_unmasked(self, vcpu: int) -> None:
        if self.masked[vcpu]:
            unmask(self.running, vcpu)
            heartbeat(self.running, vcpu)  # back in its loop with PSTATE.A clear
            self.masked[vcpu] = False


@pytest.fixture(scope="module", params=["halt", "spin"])
def guest(request: pytest.FixtureRequest) -> Iterator[Guest]:
    g = Guest(request.param)
    try:
        g.start()
        yield g
    finally:
        g.stop()


def _inject(vm: TestVmProcess, vcpu: int, *extra: str) -> CliResult:
    return serrinj("inject", "--pid", str(vm.pid), "--vcpu", str(vcpu), *extra)


def _status(vm: TestVmProcess, vcpu: int) -> Dict[str, Any]:
    r = serrinj("status", "--pid", str(vm.pid), "--vcpu", str(vcpu))
    assert r.rc == 0, r
    (only,) = r.data["vcpus"]
    assert only["vcpu_id"] == vcpu and only["registers_restored"] is True, only
    return dict(only)


def _refused(r: CliResult, rc: int, kind: str, *words: str) -> None:
    assert r.rc == rc, r
    err = r.error
    assert err["exit_code"] == rc and err["kind"] == kind, r
    for w in words:
        assert w in err["message"] + " " + (err["hint"] or ""), r


# ---------------------------------------------------------------------- ext_dabt


def test_ext_dabt_after_an_mmio_exit() -> None:
    """--ext-dabt waits for the vCPU's next MMIO exit (the guest's probe load) and the guest
    takes a synchronous external abort on it: EC 0x25, DFSC 0x10, FAR = the probe.
    (With --mmio-probe the guest never waits in wfi, whatever its mode.)"""
    vm = start("spin", vcpus=2, extra=["--mmio-probe"])
    try:
        probe = vm.ready["probe_gpa"]
        mark = vm.mark()
        r = serrinj(
            "inject", "--pid", str(vm.pid), "--vcpu", "1", "--ext-dabt",
            "--mmio-addr", hex(probe), "--mmio-timeout", "20",
        )  # fmt: skip
        assert r.rc == 0, r
        inj = r.data["injections"][0]
        assert inj["kind"] == "ext-dabt" and inj["thread_state"] == "mmio-exit"
        assert inj["tid"] == vm.vcpu(1).tid
        assert inj["before"]["mmio_exit"]["phys_addr"] == probe
        assert inj["registers_restored"] is True
        seen = vm.wait_event(on("sync", 1), EVENT_TIMEOUT_S, since=mark)
        low = seen["esr"] & 0xFFFFFFFF  # 6.1 sign-extends it (BRIEF section 9)
        print(f"ext-dabt: guest ESR_EL1 {seen['esr']:#x} FAR {seen['far']:#x}")
        assert low >> 26 == EC_DABT_CUR and low & 0x3F == DFSC_EXTERNAL_ABORT
        assert seen["far"] == probe and seen["probe"] is True and seen["resumed"] is True
        before = heartbeat(vm, 1)["probes"]
        assert heartbeat(vm, 1)["probes"] > before  # the guest runs on
        assert [e for e in vm.events_seen if e.get("event") == "sync" and e["vcpu"] == 0] == []
        assert trouble(vm) == []
    finally:
        vm.stop()


# ---------------------------------------------------------------------- demo


def test_demo_matches_on_every_host(lab: env.LabConfig) -> None:
    r = serrinj("demo")
    assert r.rc == 0, r
    doc = r.data
    assert doc["ok"] is True and doc["arch"] == "aarch64"
    steps = {s["name"]: s for s in doc["steps"]}
    assert all(s["match"] for s in steps.values()), steps
    assert "serror-cpu" in steps and "guest-self-check" in steps
    cpu = steps["serror-cpu"]["observed"]
    assert cpu["ec"] == EC_SERROR
    # when each SError was taken, as this kernel does it, predicted and seen
    for name in ("serror-ras", "serror-cpu"):
        if name not in steps:
            continue
        step = steps[name]
        want = "at-injection" if lab.expect_commit else "when-run"
        assert step["expected"]["timing"] == want, step
        assert step["injection"]["prediction"]["timing"] == want, step
        polls = step["injection"]["delivery"]["polls"]
        assert (polls == 0) is lab.expect_commit, step
        print(f"demo {name}: {want}, {polls} poll(s)")
    if lab.expect_ras:
        assert steps["serror-ras"]["observed"]["esr"] == ESR_SERROR | 0x1811
        assert cpu["esr"] == ESR_SERROR | IDS
    else:
        assert "serror-ras" not in steps and doc["skipped"]
        print(f"demo without RAS: the CPU's own syndrome read {cpu['esr']:#x}")


# ---------------------------------------------------------------------- status


def test_status_and_refusals_that_send_nothing(guest: Guest, lab: env.LabConfig) -> None:
    """Refused requests send nothing (a masked vCPU would keep anything sent pending);
    `status` shows each vCPU's thread, its state, the host caps and PSTATE."""
    masked = guest.masked_vcpu()
    vm = guest.running
    mark = vm.mark()
    if guest.mode == "halt":  # checked before any VM is touched: one mode is enough
        r = _inject(vm, masked, "--esr", "0x6001811")
        _refused(r, 2, "invalid-input", "IL (bit 25)", "EC (bits [31:26]")
        # x86_64 faults against an arm64 VM: unsupported (exit 5), nothing sent; the
        # masked vCPU would keep anything sent pending, and status below shows none
        r = serrinj("nmi", "--pid", str(vm.pid), "--vcpu", str(masked))
        _refused(r, 5, "unsupported", "for x86_64 VMs", "serrinj inject")
        r = serrinj("mce", "--pid", str(vm.pid), "--vcpu", str(masked), "--bank", "1",
                    "--preset", "srao")  # fmt: skip
        _refused(r, 5, "unsupported", "for x86_64 VMs", "serrinj inject")
        print(f"nmi and mce on arm64 vCPU {masked}: refused, exit 5")
        if not lab.expect_ras:
            # issue 4 section 3: no RAS, so no ESR can be given; the hint says what works
            for how in (("--esr", "0x1811"), ("--severity", "uer")):
                r = _inject(vm, masked, *how)
                _refused(r, 5, "unsupported", "KVM_CAP_ARM_INJECT_SERROR_ESR is 0", "leave out")
    r = serrinj("status", "--pid", str(vm.pid))
    assert r.rc == 0, r
    doc = r.data
    caps = doc["host"]["caps"]
    assert doc["host"]["arch"] == "aarch64" and doc["vm"]["arch"] == "aarch64"
    assert caps["KVM_CAP_ARM_INJECT_SERROR_ESR"] == int(lab.expect_ras)
    assert caps["KVM_CAP_ARM_INJECT_EXT_DABT"] == 1 and caps["KVM_CAP_VCPU_EVENTS"] == 1
    assert doc["vm"]["pid"] == vm.pid
    vcpus = {v["vcpu_id"]: v for v in doc["vcpus"]}
    assert sorted(vcpus) == sorted(guest.masked)
    state = "halted" if guest.mode == "halt" else "in-guest"
    for vid, v in vcpus.items():
        info = vm.vcpu(vid)
        assert v["thread"]["tid"] == info.tid and v["thread"]["name"] == info.thread_name
        assert v["fd"] == info.fd
        assert v["state"] == state, v
        assert v["registers_restored"] is True
        ev = v["events"]
        assert ev["serror_pending"] is False and ev["ext_dabt_pending"] is False, ev
        assert ev["serror_has_esr"] is lab.expect_ras  # GET: the host's RAS, whatever is pending
        assert ev["serror_masked"] is guest.masked[vid]
        p = v["pstate_decoded"]
        assert p["A"] is guest.masked[vid] and p["mode"] == "EL1h"
        assert p["D"] and p["I"] and p["F"]  # the guest keeps them set
        # the VMM's own reading of PSTATE (KVM_GET_ONE_REG in its process)
        own = local_events(vm, vid)
        assert v["pstate"] & PSTATE_DAIF_MODE == own["pstate"] & PSTATE_DAIF_MODE
        assert own["events"]["serror_pending"] is False
    assert [e for e in vm.events_seen[mark:] if e.get("event") == "serror"] == []
    assert trouble(vm) == []


# ---------------------------------------------------------------------- masked


def test_masked_serror_pends_with_its_esr_until_the_guest_unmasks(
    guest: Guest, lab: env.LabConfig
) -> None:
    """On a masked vCPU: --wait times out naming PSTATE.A (exit 7); status shows the
    SError pending and what GET reads back; a second inject is refused (exit 8) unless
    --force; the guest takes exactly the pending syndrome once it unmasks."""
    vcpu = guest.masked_vcpu()
    vm, ras = guest.running, lab.expect_ras
    mark = vm.mark()
    # the CPU's own syndrome, --wait: still pending when it runs out, and why
    r = _inject(vm, vcpu, "--wait", "1")
    _refused(r, 7, "not-delivered", "PSTATE.A=1", "masks SErrors")
    st = _status(vm, vcpu)
    ev = st["events"]
    assert ev["serror_pending"] is True and ev["serror_masked"] is True
    assert st["pstate_decoded"]["A"] is True
    # GET's read-back of KVM's own syndrome (VSESR_EL2): IDS on a RAS host
    assert ev["serror_esr"] == (IDS if ras else 0)
    assert ev["serror_has_esr"] is ras
    # a second SError while one is pending: refused, nothing sent
    second = ["--esr", "0x1811"] if ras else []
    r = _inject(vm, vcpu, *second)
    _refused(r, 8, "conflict", "already has an SError pending", "--force")
    # --force: sent anyway; KVM keeps one pending SError, with the newer syndrome
    r = _inject(vm, vcpu, *second, "--force")
    assert r.rc == 0, r
    inj = r.data["injections"][0]
    assert inj["request"]["force"] is True
    assert inj["before"]["serror_pending"] is True
    assert inj["before"]["serror_esr"] == (IDS if ras else 0)  # the refused one sent nothing
    assert inj["after"]["serror_pending"] is True and inj["after"]["serror_masked"] is True
    # masked: pending on every kernel, and serrinj predicted so
    assert inj["prediction"]["timing"] == "when-unmasked"
    assert "last_exception" not in inj["after"] and inj["delivery"] is None
    if ras:
        assert inj["after"]["serror_esr"] == 0x1811
        st = _status(vm, vcpu)
        ev = st["events"]
        assert ev["serror_pending"] is True and ev["serror_esr"] == 0x1811
        decoded = ev["serror_esr_decoded"]
        assert decoded["iss"] == 0x1811 and decoded["aet_name"] == "CE" and decoded["dfsc"] == 0x11
        assert ev["serror_masked"] is True and st["pstate_decoded"]["A"] is True
    heartbeat(vm, vcpu)  # the guest ran with it pending ...
    assert serrors(vm, vcpu, mark) == []  # ... and did not take it
    unmasked = unmask(vm, vcpu)
    guest.masked[vcpu] = False
    assert unmasked["daif_before"] & PSTATE_A
    seen = vm.wait_event(on("serror", vcpu), EVENT_TIMEOUT_S, since=mark)
    print(f"masked ({guest.mode}): after unmask the guest read ESR_EL1 {seen['esr']:#x}")
    if ras:
        assert seen["esr"] == ESR_SERROR | 0x1811
    assert seen["ec"] == EC_SERROR
    hb = heartbeat(vm, vcpu)
    assert len(serrors(vm, vcpu, mark)) == 1 and hb["serror_count"] == 1  # one, not two
    own = local_events(vm, vcpu)
    assert own["events"]["serror_pending"] is False and own["pstate_a"] is False
    assert trouble(vm) == []


# ---------------------------------------------------------------------- syndromes


def test_syndromes_reach_the_guest_exactly(guest: Guest, lab: env.LabConfig) -> None:
    """--esr, --severity and the CPU's own syndrome on an unmasked vCPU: the guest's
    ESR_EL1 is 0xBE000000 | ISS, exactly; --wait confirms delivery with a latency."""
    vm, vcpu = guest.running, guest.unmasked_vcpu
    guest.ensure_unmasked(vcpu)
    # the same set halted and busy; without RAS an ESR is refused (see above)
    cases = CASES if lab.expect_ras else [("none", None, None)]
    count = heartbeat(vm, vcpu)["serror_count"]
    others = {v: len(serrors(vm, v)) for v in guest.masked if v != vcpu}
    # --dry-run predicts when it would be taken, from serrinj's probe of the kernel
    # (a throwaway VM of its own), and sends nothing
    mark = vm.mark()
    r = _inject(vm, vcpu, "--dry-run", *(["--severity", "ce"] if lab.expect_ras else []))
    assert r.rc == 0 and r.data["dry_run"] is True, r
    pred = r.data["injections"][0]["prediction"]
    assert pred["timing"] == ("at-injection" if lab.expect_commit else "when-run"), pred
    assert pred["kvm_commits_at_set"] is lab.expect_commit
    print(f"{guest.mode}: --dry-run predicts {pred['timing']}")
    assert heartbeat(vm, vcpu)["serror_count"] == count and serrors(vm, vcpu, mark) == []
    for i, (form, value, iss) in enumerate(cases):
        args = [form, value] if value is not None else []
        # --wait on the first and on the CPU's own: delivery confirmed by read-back
        wait = i == 0 or iss is None
        mark = vm.mark()
        r = _inject(vm, vcpu, *args, *(["--wait", "20"] if wait else []))
        assert r.rc == 0, r
        inj = r.data["injections"][0]
        assert inj["kind"] == "serror" and inj["vcpu_id"] == vcpu
        assert inj["tid"] == vm.vcpu(vcpu).tid
        assert inj["request"]["esr"] == iss and inj["request"]["has_esr"] is (iss is not None)
        assert inj["registers_restored"] is True
        assert inj["before"]["serror_pending"] is False and inj["before"]["serror_masked"] is False
        seen = vm.wait_event(on("serror", vcpu), EVENT_TIMEOUT_S, since=mark)
        count += 1
        assert seen["count"] == count  # one SError per injection
        how = f"{form} {value}" if value is not None else "the CPU's own syndrome"
        print(f"{guest.mode}: {how}: guest ESR_EL1 {seen['esr']:#x}")
        if iss is None and not lab.expect_ras:
            # no RAS: the CPU chooses an implementation-defined syndrome; only EC is known
            assert seen["ec"] == EC_SERROR and seen["esr"] >> 26 == EC_SERROR
            assert inj["prediction"]["guest_esr"] is None
        else:
            want = ESR_SERROR | (IDS if iss is None else iss)
            assert seen["esr"] == want, f"{seen['esr']:#x} != {want:#x}"
            assert inj["prediction"]["guest_esr"] == want
        assert inj["prediction"]["survives"] is SURVIVES.get(iss, False)
        # when it is taken, as this kernel does it (lab.commit: 6.17+ commits at SET),
        # predicted by serrinj's probe of the kernel and seen in the read-back
        commit = lab.expect_commit
        assert inj["prediction"]["kvm_commits_at_set"] is commit
        assert inj["prediction"]["timing"] == ("at-injection" if commit else "when-run")
        assert inj["after"]["serror_pending"] is (not commit)
        d = inj["delivery"]
        if commit:
            # taken inside SET: in the guest's registers at once, delivered without --wait
            taken = inj["after"]["last_exception"]
            assert taken["serror"] and taken["at_serror_vector"], taken
            if iss is not None or lab.expect_ras:
                assert taken["esr_el1"] == seen["esr"], taken
            assert d["delivered"] is True and d["polls"] == 0 and d["latency_s"] > 0, d
            assert "taken at injection" in d["reason"] and "handler" in d["reason"], d
        else:
            # the read-back right after SET, while the thread was still stopped
            readback = (IDS if iss is None else iss) if lab.expect_ras else 0
            assert inj["after"]["serror_esr"] == readback
            assert "last_exception" not in inj["after"]
            if wait:
                assert d["delivered"] is True and d["latency_s"] > 0 and d["polls"] >= 1, d
            else:
                assert d is None
        if wait or commit:
            print(f"  delivered after {1000 * d['latency_s']:.1f} ms, {d['polls']} poll(s)")
        if i == 0:
            # status right after: the guest took it (its ESR_EL1), and PSTATE is as the
            # guest's handler left it (it returned to its loop with SErrors unmasked)
            st = _status(vm, vcpu)
            last = st["last_exception"]
            assert last["serror"] is True and last["esr_el1"] == seen["esr"], last
            assert last["at_serror_vector"] is False, last
            assert st["events"]["serror_pending"] is False
            assert st["pstate_decoded"]["A"] is False and st["pstate_decoded"]["mode"] == "EL1h"
            print(f"  status: last exception SError, ESR_EL1 {last['esr_el1']:#x}")
    assert heartbeat(vm, vcpu)["serror_count"] == count
    assert {v: len(serrors(vm, v)) for v in others} == others  # the other vCPU took nothing
    assert trouble(vm) == []
