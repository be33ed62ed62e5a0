"""`events save` / `events load`: a pending event moves from one VM to another.

The KVM API separates "pending" from "pending with this ESR" so that a VMM can
migrate a pending SError; the x86_64 equivalent proven here is a pending NMI
(the arm64 scenario with a masked SError and its ESR runs in the arm64 lab).
"""

from __future__ import annotations

import json
import os
import time
from typing import Tuple

import pytest

from serrinj.errors import InvalidInput, Unsupported
from serrinj.host import kvmcaps as host
from serrinj.kvm import arm64 as kvm_arm64
from serrinj.kvm import x86_64 as kvm_x86
from serrinj.ops import events, inject
from serrinj.target import attach as target
from serrinj.testvm.process import TestVmProcess
from tests.helpers.testvm import VmFactory

X86 = os.uname().machine == "x86_64"
ARM64 = os.uname().machine == "aarch64"
ISS_KSELFTEST = 0x101D1ED  # IDS | 0x1d1ed: a syndrome KVM would not make up itself


@pytest.fixture
def pair(start_vm: VmFactory) -> Tuple[TestVmProcess, TestVmProcess]:
    paused = ["--start-paused"]
    return start_vm(vcpus=2, extra=paused), start_vm(vcpus=2, extra=paused)


@pytest.mark.kvm
@pytest.mark.root
@pytest.mark.skipif(not X86, reason="the arm64 migration scenario runs in the arm64 lab")
def test_pending_nmi_moves_to_another_vm(pair: Tuple[TestVmProcess, TestVmProcess]) -> None:
    a, b = pair
    inject.inject_nmi(target.resolve(pid=a.pid, vcpu=1))
    snap = events.save(target.resolve(pid=a.pid))
    text = snap.dumps()
    doc = json.loads(text)
    assert doc["schema"] == events.SCHEMA and doc["arch"] == "x86_64"
    assert [v["decoded"]["nmi"]["pending"] for v in doc["vcpus"]] == [0, 1]
    loaded = events.parse(text, "a.json")
    res = events.load(target.resolve(pid=b.pid), loaded)
    assert [r.vcpu_id for r in res] == [0, 1]
    assert res[1].after["nmi"]["pending"] == 1  # type: ignore[index]
    mark = b.mark()
    b.command({"cmd": "run"})
    ev = b.wait_event(lambda e: e["event"] == "nmi", since=mark, timeout=20)
    assert ev["vcpu"] == 1
    time.sleep(0.3)
    assert [e["vcpu"] for e in b.events_seen[mark:] if e["event"] == "nmi"] == [1]


@pytest.mark.kvm
@pytest.mark.root
@pytest.mark.skipif(not ARM64, reason="arm64 SErrors (the arm64 lab runs this file)")
def test_pending_serror_moves_to_another_vm(pair: Tuple[TestVmProcess, TestVmProcess]) -> None:
    """A pending SError keeps its ESR through save and load, and B's guest takes it with
    that ESR once it runs (a host without RAS moves it without one)."""
    a, b = pair
    iss = ISS_KSELFTEST if host.probe().serror_esr else None
    inject.inject_serror(target.resolve(pid=a.pid, vcpu=1), inject.SErrorRequest(iss))
    snap = events.save(target.resolve(pid=a.pid))
    doc = json.loads(snap.dumps())
    assert doc["arch"] == "aarch64"
    assert [v["decoded"]["serror_pending"] for v in doc["vcpus"]] == [False, True]
    if iss is not None:
        assert doc["vcpus"][1]["decoded"]["serror_esr"] == iss
    res = events.load(target.resolve(pid=b.pid), events.parse(snap.dumps(), "a.json"))
    assert [r.vcpu_id for r in res] == [0, 1]
    assert res[1].after["serror_pending"] is True
    assert res[0].after["serror_pending"] is False
    mark = b.mark()
    b.command({"cmd": "run"})
    ev = b.wait_event(lambda e: e["event"] == "serror", since=mark, timeout=20)
    assert ev["vcpu"] == 1 and ev["ec"] == 0x2F
    if iss is not None:
        assert ev["esr"] == 0xBE000000 | iss
    time.sleep(0.3)
    assert [e["vcpu"] for e in b.events_seen[mark:] if e["event"] == "serror"] == [1]


def _snapshot(arch: str, raw: bytes) -> events.Snapshot:
    return events.Snapshot(arch, [events.SavedVcpu(0, raw)], {}, {}, "")


def test_file_that_disagrees_with_itself_is_refused() -> None:
    raw = kvm_x86.VcpuEvents().with_nmi_pending().pack()
    doc = _snapshot("x86_64", raw).as_dict()
    doc["vcpus"][0]["decoded"]["nmi"]["pending"] = 0  # type: ignore[index]
    with pytest.raises(InvalidInput, match=r"vcpus\[0\]\.decoded: does not match 'raw'"):
        events.parse(json.dumps(doc), "f.json")


@pytest.mark.parametrize(
    "mutate, where",
    [
        (lambda d: d.update(schema="other/9"), "schema"),
        (lambda d: d.update(arch="riscv64"), "arch"),
        (lambda d: d.update(vcpus=[]), "vcpus"),
        (lambda d: d["vcpus"][0].update(raw="00"), r"vcpus\[0\]\.raw"),
        (lambda d: d["vcpus"][0].update(vcpu_id=-1), r"vcpus\[0\]\.vcpu_id"),
        (lambda d: d["vcpus"].append(dict(d["vcpus"][0])), r"vcpus\[1\]\.vcpu_id"),
    ],
)
def test_each_malformed_key_is_named(mutate, where) -> None:  # type: ignore[no-untyped-def]
    doc = _snapshot("x86_64", bytes(64)).as_dict()
    mutate(doc)
    with pytest.raises(InvalidInput, match=f"f.json: {where}"):
        events.parse(json.dumps(doc), "f.json")


def test_not_json_names_the_line() -> None:
    with pytest.raises(InvalidInput, match="line 2"):
        events.parse('{\n "schema": oops}', "f.json")


def test_cross_arch_and_no_ras_loads_are_refused() -> None:
    arm = _snapshot("aarch64", kvm_arm64.VcpuEvents.serror(0x1811).pack())
    ras = host.HostCaps("aarch64", 12, {"KVM_CAP_ARM_INJECT_SERROR_ESR": 1})
    no_ras = host.HostCaps("aarch64", 12, {"KVM_CAP_ARM_INJECT_SERROR_ESR": 0})
    with pytest.raises(Unsupported, match="saved from an aarch64 VM; this VM is x86_64"):
        events.check_compatible(arm, "x86_64", ras)
    with pytest.raises(Unsupported, match="KVM_CAP_ARM_INJECT_SERROR_ESR is 0"):
        events.check_compatible(arm, "aarch64", no_ras)
    events.check_compatible(arm, "aarch64", ras)
    # A pending SError without an ESR loads on a host without RAS.
    plain = _snapshot("aarch64", kvm_arm64.VcpuEvents.serror(None).pack())
    events.check_compatible(plain, "aarch64", no_ras)
