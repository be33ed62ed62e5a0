"""A real Linux guest (Debian's arm64 kernel) under a real VMM (Debian's QEMU, -accel kvm).

serrinj is used through its CLI, in its own process. What the guest kernel
does with each SError is decided by its arch/arm64/kernel/traps.c
(``do_serror``, ``arm64_is_fatal_ras_serror``): a corrected error (CE) is
survived silently; a recoverable-state one (UER) is fatal, and the kernel
prints ``SError Interrupt on CPU0, code 0x...`` before it panics. ``serrinj
esr decode`` predicts both, and the test checks that the prediction came true.

The guest's console is its shell (lab/guest/nested_init.sh): a command typed
there and answered proves the guest still runs. The QEMU ends by itself when
the guest panics (``panic=-1`` reboots, ``-no-reboot`` exits); the fixture kills
it by its pid otherwise.
"""

from __future__ import annotations

import re
from typing import Iterator

import pytest

from lab.guest import env
from lab.guest.cli import serrinj
from lab.guest.nested import MARKER, InnerQemu, NestedAssets

NAME = "linux-ras"
#: the boot's host has RAS (decided by the lab host from the CPU model; the skips need it
#: before the fixture boots Linux)
RAS = env.current().expect_ras
BOOT_TIMEOUT_S = 120
SERROR_LINE = re.compile(r"SError Interrupt on CPU\d+, code 0x[0-9a-f]+.*")
PANIC = "Kernel panic - not syncing: Asynchronous SError Interrupt"


@pytest.fixture
def linux(nested: NestedAssets) -> Iterator[InnerQemu]:
    vm = InnerQemu.start(nested, name=NAME, tick=0)
    try:
        vm.wait_for(MARKER, BOOT_TIMEOUT_S)
        yield vm
    finally:
        vm.stop()


def _alive(vm: InnerQemu, n: int) -> None:
    """The guest's shell computes and prints something: it runs."""
    vm.send(f"echo LAB-ALIVE-$(({n} * 7))")
    vm.wait_for(rf"^LAB-ALIVE-{n * 7}$", 30)


def _serror_line(vm: InnerQemu) -> str:
    """The guest kernel's SError report, from 'SError Interrupt' on (no printk time)."""
    line = vm.wait_for(SERROR_LINE.pattern, 60)
    m = SERROR_LINE.search(line)
    assert m is not None
    return m.group(0).rstrip()


def _died(vm: InnerQemu) -> None:
    vm.wait_for(re.escape(PANIC), 60)
    assert vm.proc.wait(timeout=60) == 0  # the reboot after the panic ends QEMU (-no-reboot)


@pytest.mark.skipif(not RAS, reason="a RAS syndrome needs a host with RAS: see the no-RAS test")
def test_ce_is_survived_and_uer_panics_as_predicted(linux: InnerQemu) -> None:
    # what serrinj predicts, from the syndrome alone
    ce = serrinj("esr", "decode", "0x1811")
    uer = serrinj("esr", "decode", "0x0c11")
    assert ce.rc == 0 and uer.rc == 0, (ce, uer)
    ce_pred, uer_pred = ce.data["linux"], uer.data["linux"]
    assert ce_pred["survives"] is True and ce_pred["console_line"] is None
    assert uer_pred["survives"] is False
    assert uer_pred["panic_message"] == PANIC
    assert uer_pred["console_line"].startswith("SError Interrupt on CPU0, code 0x00000000be000c11")

    _alive(linux, 1)
    r = serrinj("inject", "--name", NAME, "--severity", "ce", "--wait", "20")
    assert r.rc == 0, r
    inj = r.data["injections"][0]
    assert inj["request"]["esr"] == 0x1811 and inj["delivery"]["delivered"] is True
    assert inj["prediction"]["survives"] is True
    _alive(linux, 2)  # taken, and survived, as predicted
    assert not [x for x in linux.lines if "SError" in x or "Kernel panic" in x], linux.tail()

    r = serrinj("inject", "--name", NAME, "--esr", "0x0C11")
    assert r.rc == 0, r
    assert r.data["injections"][0]["prediction"]["console_line"] == uer_pred["console_line"]
    seen = _serror_line(linux)
    print(f"guest: {seen!r}; predicted {uer_pred['console_line']!r}")
    # traps.c: "SError Interrupt on CPU%d, code 0x%016lx" (newer kernels add " -- SError")
    assert seen.startswith("SError Interrupt on CPU0, code 0x00000000be000c11")
    assert uer_pred["console_line"].startswith(seen) or seen.startswith(uer_pred["console_line"])
    _died(linux)


@pytest.mark.skipif(RAS, reason="the host without RAS is the cortex-a57 boot")
def test_without_ras_an_esr_is_refused_and_the_cpus_own_serror_is_fatal(
    linux: InnerQemu,
) -> None:
    _alive(linux, 1)
    r = serrinj("inject", "--name", NAME, "--severity", "ce")
    assert r.rc == 5 and "KVM_CAP_ARM_INJECT_SERROR_ESR is 0" in r.error["message"], r
    _alive(linux, 2)  # nothing was sent
    r = serrinj("inject", "--name", NAME)
    assert r.rc == 0, r
    pred = r.data["injections"][0]["prediction"]
    assert pred["survives"] is False and pred["guest_esr"] is None  # chosen by the CPU
    seen = _serror_line(linux)
    print(f"guest without RAS: {seen!r}")
    assert seen.startswith(pred["console_line"])  # "SError Interrupt on CPU0, code 0x"
    code = int(seen.split("code 0x", 1)[1].split()[0], 16)
    assert code >> 26 & 0x3F == 0x2F  # an SError, whatever syndrome the CPU chose
    _died(linux)
