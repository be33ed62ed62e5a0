"""arm64 RAS checks against a Linux guest: a CE SError is survived, a UER SError panics.

Point it at the VM under test (an arm64 host with the RAS extension, a Linux
guest) and the file its serial console is written to::

    pytest examples/pytest --serrinj-name arm64-ras --serrinj-console /var/log/arm64-ras.console

The tests run in file order: the last one makes the guest panic.
"""

from __future__ import annotations

import pytest

import serrinj
from serrinj.pytest_plugin import Console

pytestmark = pytest.mark.serrinj_needs("arm64", "ras")

SERROR_LINE = r"SError Interrupt on CPU\d+, code 0x[0-9a-f]*"


def test_a_corrected_serror_is_survived(serrinj_vm: serrinj.Vm, serrinj_console: Console) -> None:
    inj = serrinj_vm.inject_serror(severity="ce", vcpu=serrinj_vm.vcpu_ids[0], wait=10.0)
    assert inj.delivered
    assert inj.request["esr"] == 0x1811
    assert inj.prediction["outcome"] == "survives"
    # Linux logs nothing for a corrected error: it must not report an SError, nor panic
    serrinj_console.expect_not(rf"{SERROR_LINE}|Kernel panic", within=5)


def test_an_uncorrectable_recoverable_serror_panics(
    serrinj_vm: serrinj.Vm, serrinj_console: Console
) -> None:
    inj = serrinj_vm.inject_serror(severity="uer", vcpu=serrinj_vm.vcpu_ids[0], wait=10.0)
    assert inj.delivered
    assert inj.prediction["outcome"] == "panics"
    # the guest prints the syndrome it took (ESR_EL1 = EC 0x2f, IL, ISS 0xc11), then panics
    serrinj_console.expect(rf"{SERROR_LINE}be000c11\b", timeout=60)
    serrinj_console.expect(r"Kernel panic - not syncing", timeout=60)
