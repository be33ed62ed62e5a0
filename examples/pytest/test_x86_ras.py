"""x86_64 RAS checks: machine checks are logged, an NMI is handled, the guest lives on.

Point it at the VM under test and the file its serial console is written to::

    pytest examples/pytest --serrinj-pid PID --serrinj-console /var/log/vm.console

The patterns match what three guests print: serrinj's firmware guest booted by
QEMU (``python -m serrinj.testvm.firmware_x86``), serrinj's built-in test VM
(its JSON event lines), and Linux. Put your own guest's lines in their place.
"""

from __future__ import annotations

import pytest

import serrinj
from serrinj.pytest_plugin import Console

pytestmark = pytest.mark.serrinj_needs("x86_64", "mce")

#: what a guest prints when it crashes: the firmware guest's unexpected exception,
#: the test VM's exit or self-check failure, Linux's panic
CRASH = r"^exception cpu=|\"event\":\"(exit|guest-check-failed|error)\"|Kernel panic"
BANK_CORRECTED = 1
BANK_UNCORRECTED = 2
ADDR = 0x12345000


def logged(vcpu: int, bank: int, status: int) -> str:
    """A console line that reports this machine check, from any of the three guests."""
    return (
        rf"^mce(-poll)? cpu={vcpu} bank={bank} status={status:#018x} "  # firmware guest
        rf'|"vcpu":{vcpu},.*"bank":{bank},"status":{status}\b'  # test VM
        rf"|Bank {bank}: {status:016x}|Machine check events logged"  # Linux
    )


def test_a_corrected_machine_check_is_logged(
    serrinj_vm: serrinj.Vm, serrinj_console: Console
) -> None:
    """A corrected error raises no exception: the guest finds it when it polls its banks."""
    inj = serrinj_vm.mce(
        BANK_CORRECTED, preset="corrected", addr=ADDR, vcpu=serrinj_vm.vcpu_ids[0], wait=5.0
    )
    assert inj.delivered
    assert inj.prediction["outcome"] == "logged"
    status = inj.request["status"]
    assert isinstance(status, int)
    serrinj_console.expect(logged(inj.vcpu_id, BANK_CORRECTED, status), timeout=10)
    serrinj_console.expect_not(CRASH, within=1)


def test_an_uncorrected_machine_check_is_logged(
    serrinj_vm: serrinj.Vm, serrinj_console: Console
) -> None:
    """An action-optional uncorrected error (SRAO) raises #MC, which the guest takes and logs."""
    inj = serrinj_vm.mce(
        BANK_UNCORRECTED, preset="srao", addr=ADDR, vcpu=serrinj_vm.vcpu_ids[0], wait=5.0
    )
    assert inj.delivered
    status = inj.request["status"]
    assert isinstance(status, int) and status >> 61 & 1  # UC
    serrinj_console.expect(logged(inj.vcpu_id, BANK_UNCORRECTED, status), timeout=10)
    serrinj_console.expect_not(CRASH, within=1)


def test_an_nmi_is_handled(serrinj_vm: serrinj.Vm, serrinj_console: Console) -> None:
    vcpu = serrinj_vm.vcpu_ids[-1]
    inj = serrinj_vm.nmi(vcpu=vcpu, wait=5.0)
    assert inj.delivered
    serrinj_console.expect(
        rf'^nmi cpu={vcpu} count=\d+|"event":"nmi","vcpu":{vcpu},|NMI received for unknown reason',
        timeout=10,
    )
    serrinj_console.expect_not(CRASH, within=1)


def test_the_vcpus_are_left_as_they_were(serrinj_vm: serrinj.Vm) -> None:
    """Every vCPU is back in its guest with nothing left pending; no register was changed."""
    report = serrinj_vm.status()
    for v in report.vcpus:
        assert v.registers_restored
        assert v.state in ("halted", "in-guest"), v
        events = v.events
        nmi = events["nmi"]
        assert isinstance(nmi, dict) and not nmi["pending"], events
