"""``--no-readback`` (``readback=False``): the vCPU is held for the fault's checks and its
send alone, and the guest still takes the fault.

The remote ioctls a held thread runs are counted through a seam of this test process
(:meth:`RemoteThread.syscall` wrapped in-process): an NMI without readback runs
KVM_NMI alone instead of GET_VCPU_EVENTS, KVM_NMI, GET_VCPU_EVENTS; a machine check
keeps the reads its checks need (MSRs, SREGS). An SError's checks need both readings,
so the flag does not exist for it. Campaign files take ``readback = false``.
"""

from __future__ import annotations

import os
from typing import Iterator, List

import pytest

import serrinj
from serrinj.campaign import model, schema
from serrinj.kvm import api
from serrinj.kvm import x86_64 as kvm_x86
from serrinj.remote import session
from serrinj.testvm.process import TestVmProcess
from tests.helpers import serrinj_cli
from tests.helpers.testvm import VmFactory

pytestmark = pytest.mark.skipif(
    os.uname().machine != "x86_64", reason="x86_64 faults (NMI, MCE); the lab runs arm64"
)

GET = api.KVM_GET_VCPU_EVENTS


@pytest.fixture
def ioctls(monkeypatch: pytest.MonkeyPatch) -> Iterator[List[int]]:
    """The ioctl requests every held thread ran, in order (this process only)."""
    seen: List[int] = []
    real = session.RemoteThread.syscall

    def counting(self: session.RemoteThread, nr: int, *args: int) -> int:
        if nr == self.arch.nr["ioctl"]:
            seen.append(args[1])
        return real(self, nr, *args)

    monkeypatch.setattr(session.RemoteThread, "syscall", counting)
    yield seen


@pytest.fixture
def test_vm(start_vm: VmFactory) -> TestVmProcess:
    return start_vm(vcpus=2)


@pytest.mark.kvm
@pytest.mark.root
def test_an_nmi_without_readback_runs_kvm_nmi_alone_and_the_guest_takes_it(
    test_vm: TestVmProcess, ioctls: List[int]
) -> None:
    vm = serrinj.find(pid=test_vm.pid)
    mark = test_vm.mark()
    inj = vm.nmi(vcpu=1, readback=False)
    assert ioctls == [kvm_x86.KVM_NMI]
    assert inj.before == {} and inj.after == {} and inj.as_dict()["readback"] is False
    assert inj.registers_restored
    test_vm.wait_event(lambda e: e.get("event") == "nmi" and e.get("vcpu") == 1, 10, since=mark)

    del ioctls[:]
    inj = vm.nmi(vcpu=1)  # the default reads the events before and after
    assert ioctls == [GET, kvm_x86.KVM_NMI, GET]
    assert inj.after["nmi"]["pending"] == 1 or inj.after["nmi"]["injected"] == 1  # type: ignore[index]
    assert inj.as_dict()["readback"] is True


@pytest.mark.kvm
@pytest.mark.root
def test_a_machine_check_without_readback_keeps_the_reads_its_checks_need(
    test_vm: TestVmProcess, ioctls: List[int]
) -> None:
    vm = serrinj.find(pid=test_vm.pid)
    inj = vm.mce(1, preset="corrected", vcpu=0, readback=False)
    assert ioctls == [kvm_x86.KVM_GET_MSRS, kvm_x86.KVM_GET_SREGS, kvm_x86.KVM_X86_SET_MCE]
    assert inj.before == {} and inj.after == {} and inj.prediction["outcome"]

    del ioctls[:]
    vm.mce(1, preset="corrected", vcpu=0)
    assert ioctls == [
        GET,
        kvm_x86.KVM_GET_MSRS,
        kvm_x86.KVM_GET_SREGS,
        kvm_x86.KVM_X86_SET_MCE,
        GET,
    ]


@pytest.mark.kvm
@pytest.mark.root
def test_a_dry_run_reads_the_vcpu_whatever_readback_says(
    test_vm: TestVmProcess, ioctls: List[int]
) -> None:
    inj = serrinj.find(pid=test_vm.pid).nmi(vcpu=1, readback=False, dry_run=True)
    assert ioctls == [GET]  # read, nothing sent
    assert inj.before and inj.after == inj.before and inj.as_dict()["readback"] is True


@pytest.mark.kvm
@pytest.mark.root
def test_the_command_line_says_what_it_did_not_read(test_vm: TestVmProcess) -> None:
    mark = test_vm.mark()
    r = serrinj_cli.run("--json", "nmi", "--pid", test_vm.pid, "--vcpu", 1, "--no-readback")
    assert r.rc == 0, r
    (inj,) = r.data["injections"]
    assert (inj["before"], inj["after"], inj["readback"]) == ({}, {}, False)
    test_vm.wait_event(lambda e: e.get("event") == "nmi" and e.get("vcpu") == 1, 10, since=mark)
    r = serrinj_cli.run("nmi", "--pid", test_vm.pid, "--vcpu", 1, "--no-readback")
    assert r.rc == 0 and "not read (--no-readback)" in r.stdout, r
    assert "before" not in r.stdout and "after" not in r.stdout


def test_a_campaign_step_takes_readback() -> None:
    text = '[[steps]]\ninject = "nmi"\nvcpus = [0]\nreadback = false\n'
    (step,) = schema.loads(text).steps
    assert step.readback is False  # type: ignore[attr-defined]
    (step,) = schema.loads(text.replace("readback = false\n", "")).steps
    assert step.readback is True  # type: ignore[attr-defined]
    with pytest.raises(model.CampaignError, match="readback"):
        schema.loads(text.replace("false", '"no"'))
