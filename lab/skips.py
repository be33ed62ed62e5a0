"""The skips the lab accepts, per boot. Any other skip makes the boot fail.

A skipped test proved nothing, so the lab treats a skip like a failure unless
it is listed here for the kind of boot it happened in, with the reason it is
expected there. The host checks every ``SKIPPED`` result of a boot against
this list (:func:`allowed_for`); the guest also runs pytest with
``SERRINJ_REQUIRE_ALL=1``, so the host tests' resource markers fail rather
than skip inside the lab.

When a test is added that must skip on some boot, add it here with its exact
skip reason (and to the table in ``lab/README.md``). This module is shipped to the guest too (the
``nested`` fixture's skip reason comes from here) and must stay free of
dependencies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Tuple

#: on every boot
ALWAYS = "always"
#: on the boots whose CPU has the RAS extension (``-cpu max``)
RAS = "ras"
#: on the boot whose CPU has no RAS (``-cpu cortex-a57``)
NO_RAS = "no-ras"
#: on boots started with ``--no-qemu`` (the inner QEMU is left out on purpose)
NO_QEMU = "no-qemu"

#: the ``nested`` fixture's skip reason when the lab was booted with --no-qemu
NO_QEMU_REASON = "the lab was booted without the inner QEMU (drop --no-qemu)"


@dataclass(frozen=True)
class Allowed:
    """One accepted skip: the test, the boots, why, and the skip's own reason.

    ``pattern`` is a node id; ``NAME[*]`` stands for every parametrization of
    NAME, and ``*`` for any test. ``reason`` is the text the test skips with
    (its ``skipif``/``pytest.skip`` reason), exactly: the same test skipped for
    another reason (a missing tool, a broken fixture) fails the boot.
    """

    pattern: str
    when: str
    why: str
    #: the skip's own reason must be exactly this
    reason: str

    def matches(self, nodeid: str) -> bool:
        if self.pattern == "*":
            return True
        if self.pattern.endswith("[*]"):
            return nodeid.startswith(self.pattern[:-2])
        return nodeid == self.pattern


_HOST_X86 = "x86_64 only: the host's x86_64 run covers it; its arm64 half runs here"
_NO_SVE = "live SVE state cannot be forced on a CPU without SVE; the -cpu max boots run it"
_NO_SVE_REASON = "the CPU has no SVE (the cortex-a57 boot): FPSIMD is all its FP state"
_RAS_ONLY = "needs a syndrome (an ESR), which a host without RAS refuses; a no-RAS test covers it"

ALLOWED: Tuple[Allowed, ...] = (
    # host tests run in the lab for their arm64 halves: their x86_64 halves skip
    Allowed("tests/test_engine_kvm.py::test_nmi_and_machine_checks_reach_the_guest[*]",
            ALWAYS, _HOST_X86, "x86_64 injections; arm64 runs in the lab"),
    Allowed("tests/test_engine_kvm.py::test_paused_vm_takes_the_nmi_after_run[*]",
            ALWAYS, _HOST_X86, "x86_64 guest"),
    Allowed("tests/test_events_migration.py::test_pending_nmi_moves_to_another_vm",
            ALWAYS, _HOST_X86, "the arm64 migration scenario runs in the arm64 lab"),
    # RAS-only tests on the boot without RAS
    Allowed("lab/suite/test_campaign_arm64.py::test_arm64_ras_example", NO_RAS, _RAS_ONLY,
            "a campaign with a syndrome is refused without RAS: the masked example checks it"),
    Allowed("lab/suite/test_qemu_bare_arm64.py::test_serrinj_masked_serror_waits_for_unmask",
            NO_RAS, _RAS_ONLY, "needs a host with RAS (an ESR is refused otherwise)"),
    Allowed("lab/suite/test_qemu_linux_arm64.py::test_ce_is_survived_and_uer_panics_as_predicted",
            NO_RAS, _RAS_ONLY, "a RAS syndrome needs a host with RAS: see the no-RAS test"),
    Allowed("lab/suite/test_testvm_arm64.py::test_serror_syndromes_reach_the_guest[*]",
            NO_RAS, _RAS_ONLY,
            "needs a host with RAS (the ESR is refused otherwise; see the no-RAS test)"),
    Allowed("lab/suite/test_testvm_arm64.py::test_masked_serror_pends_until_unmask[*]",
            NO_RAS, _RAS_ONLY, "needs a host with RAS"),
    # the no-RAS test on the boots with RAS
    Allowed("lab/suite/test_qemu_linux_arm64.py::"
            "test_without_ras_an_esr_is_refused_and_the_cpus_own_serror_is_fatal",
            RAS, "the negative test of a host without RAS: it runs on the cortex-a57 boot",
            "the host without RAS is the cortex-a57 boot"),
    # the kill-safety tests' forced live SVE state on the boot whose CPU has no SVE
    Allowed("lab/suite/test_kill_safety_arm64.py::"
            "test_sigkill_the_thread_resumes_its_exact_context[*]",
            NO_RAS, _NO_SVE, _NO_SVE_REASON),
    Allowed("lab/suite/test_kill_safety_arm64.py::test_serrinj_alive_puts_live_sve_state_back[*]",
            NO_RAS, _NO_SVE, _NO_SVE_REASON),
    # --no-qemu: every test of the inner QEMU, by the nested fixture's reason
    Allowed("*", NO_QEMU, "--no-qemu leaves the inner QEMU out", NO_QEMU_REASON),
)  # fmt: skip


class _Skipped(Protocol):
    nodeid: str

    @property
    def skip_reason(self) -> str: ...


def allowed_for(ras: bool, with_qemu: bool) -> Callable[[_Skipped], Optional[str]]:
    """For one boot: a function that gives why a skipped test is accepted, or None."""
    kinds = {ALWAYS, RAS if ras else NO_RAS} | (set() if with_qemu else {NO_QEMU})

    def why(result: _Skipped) -> Optional[str]:
        for entry in ALLOWED:
            if entry.when not in kinds or not entry.matches(result.nodeid):
                continue
            if result.skip_reason != entry.reason:
                continue
            return entry.why
        return None

    return why
