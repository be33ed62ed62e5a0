"""Sandboxed VMMs (seccomp) and inherited vCPU fds, against the real test VM.

A sandboxed VMM's filter may trap or kill on the vCPU-event ioctls from a
vCPU thread (Firecracker's does, and its SIGSYS handler shuts the VM down).
serrinj must never let such a call reach the filter: it runs it from another
thread whose filter allows it, with the vCPU thread held, or refuses.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, List, Optional

import pytest

from serrinj.errors import SeccompBlocked
from serrinj.ops import inject, status
from serrinj.target import attach as target
from serrinj.testvm.process import TestVmProcess
from tests.helpers.testvm import VmFactory

pytestmark = [pytest.mark.kvm, pytest.mark.root]
X86 = os.uname().machine == "x86_64"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: the fault each arch's guest reports: an NMI on x86_64, an SError (KVM's syndrome) on arm64
FAULT = "nmi" if X86 else "serror"


def _inject(vm: TestVmProcess, vcpu: int, wait: Optional[float] = None) -> List[Any]:
    tgt = target.resolve(pid=vm.pid, vcpu=vcpu)
    if X86:
        return inject.inject_nmi(tgt, wait=wait)
    return inject.inject_serror(tgt, inject.SErrorRequest(None), wait=wait)


@pytest.fixture
def sandboxed(request: pytest.FixtureRequest, start_vm: VmFactory) -> TestVmProcess:
    return start_vm(vcpus=2, mode="halt", extra=request.param)


def _seccomp_of(pid: int, tid: int) -> int:
    with open(f"/proc/{pid}/task/{tid}/status") as f:
        for line in f:
            if line.startswith("Seccomp:"):
                return int(line.split()[1])
    return -1


@pytest.mark.parametrize(
    "sandboxed",
    [["--seccomp", "trap"], ["--seccomp", "kill"]],
    indirect=True,
    ids=["trap", "kill"],
)
def test_filtered_vcpu_thread_is_served_from_another_thread(sandboxed: TestVmProcess) -> None:
    vm = sandboxed
    assert _seccomp_of(vm.pid, vm.vcpu(1).tid) == 2
    mark = vm.mark()
    res = _inject(vm, 1, wait=5.0)
    assert res[0].delivery is not None and res[0].delivery.delivered
    vm.wait_event(lambda e: e["event"] == FAULT and e["vcpu"] == 1, since=mark)
    rep = status.status(pid=vm.pid)
    assert [s.vcpu_id for s in rep.vcpus] == [0, 1]
    assert vm.alive(), "the VMM was killed by its own filter"
    assert not [e for e in vm.events_seen if e["event"] in ("exit", "error")]


@pytest.mark.parametrize(
    "sandboxed", [["--seccomp", "trap", "--seccomp-threads", "all"]], indirect=True, ids=["all"]
)
def test_filter_on_every_thread_is_refused_before_anything_is_sent(
    sandboxed: TestVmProcess,
) -> None:
    vm = sandboxed
    mark = vm.mark()
    with pytest.raises(SeccompBlocked) as err:
        _inject(vm, 0)
    assert "TRAP" in err.value.message and "no other thread" in err.value.message
    assert vm.alive()
    # The guest is still healthy and took nothing.
    hb_mark = vm.mark()
    vm.command({"cmd": "heartbeat", "vcpu": 0})
    hb = vm.wait_event(lambda e: e["event"] == "heartbeat", since=hb_mark)
    assert hb[f"{FAULT}_count"] == 0
    assert not [e for e in vm.events_seen[mark:] if e["event"] == FAULT]


@pytest.fixture
def plain(start_vm: VmFactory) -> TestVmProcess:
    return start_vm(vcpus=2, mode="halt")


def test_inherited_fd_owner_found_with_kcmp(plain: TestVmProcess) -> None:
    """A child of the VMM inherits the vCPU fd; KVM refuses it there (EIO), and
    serrinj finds the VMM that owns the same open file with kcmp."""
    vm = plain
    fd = vm.vcpu(1).fd
    code = (
        "import json, sys; from serrinj.target import attach as target\n"
        f"r = target.resolve_fd({fd})\n"
        "print(json.dumps(r._asdict()))"
    )
    mark = vm.mark()
    vm.command({"cmd": "spawn", "argv": [sys.executable, "-c", code]})
    done = vm.wait_event(lambda e: e["event"] == "spawn-exit", since=mark, timeout=30)
    assert done["returncode"] == 0, done["stderr"]
    res = json.loads(done["stdout"])
    assert res["local"] is False
    assert res["owner_pid"] == vm.pid
    assert res["owner_fd"] == fd
    assert res["vcpu_id"] == 1
    assert "EIO" in res["explanation"]
