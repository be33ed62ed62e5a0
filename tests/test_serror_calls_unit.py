"""The arm64 KVM_SET_VCPU_EVENTS calls serrinj makes, recorded, and the per-boot cache
of its probe of the kernel's SError behaviour. Pure logic on fakes; the arm64 lab runs
the real calls (lab/suite, tests/test_engine_kvm.py).

Since Linux 6.17 KVM injects ``ext_dabt_pending`` *before* it validates the SError
fields, so one call carrying an abort and a refused ESR would return EINVAL with the
abort delivered anyway (BRIEF section 2): serrinj never puts both in one call.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Tuple

import pytest

from serrinj.errors import InvalidInput
from serrinj.host import kvmcaps as host
from serrinj.kvm import api
from serrinj.kvm import arm64 as kvm_arm64
from serrinj.ops import events
from serrinj.vcpu import probe as kvmprobe
from serrinj.vcpu.arm64 import Arm64Vcpu as Vcpu
from serrinj.vcpu.executor import BufferSpec, materialize


class RecordingExecutor:
    """Records every vCPU ioctl and its argument; GET answers zeros."""

    def __init__(self) -> None:
        self.calls: List[Tuple[int, bytes]] = []

    def ioctl_int(self, fd: int, request: int, arg: int = 0) -> int:
        self.calls.append((request, b""))
        return 0

    def ioctl_buf(self, fd: int, request: int, data: BufferSpec) -> bytes:
        raw = materialize(data, 0x1000)
        self.calls.append((request, raw))
        return raw

    def read_memory(self, addr: int, size: int) -> bytes:
        return bytes(size)

    def sets(self) -> List[kvm_arm64.VcpuEvents]:
        return [
            kvm_arm64.VcpuEvents.unpack(raw)
            for request, raw in self.calls
            if request == api.KVM_SET_VCPU_EVENTS
        ]


def _vcpu() -> Tuple[Vcpu, RecordingExecutor]:
    ex = RecordingExecutor()
    return Vcpu(ex, 10, 0, "aarch64"), ex


def test_serror_and_ext_dabt_go_in_separate_calls() -> None:
    vc, ex = _vcpu()
    vc.inject_ext_dabt()
    vc.inject_serror(0x1811)
    vc.inject_serror(None)
    dabt, serror, own = ex.sets()
    assert (dabt.ext_dabt_pending, dabt.serror_pending, dabt.serror_has_esr) == (1, 0, 0)
    assert (serror.ext_dabt_pending, serror.serror_pending, serror.serror_esr) == (0, 1, 0x1811)
    assert (own.ext_dabt_pending, own.serror_pending, own.serror_has_esr) == (0, 1, 0)


def test_a_combined_call_is_refused_before_anything_is_sent() -> None:
    vc, ex = _vcpu()
    both = kvm_arm64.VcpuEvents(
        serror_pending=1, serror_has_esr=1, ext_dabt_pending=1, serror_esr=0x11
    )
    with pytest.raises(InvalidInput, match="never sent in one KVM_SET_VCPU_EVENTS"):
        vc.set_events(both)
    assert ex.calls == []


def test_events_load_never_carries_an_abort_with_the_serror() -> None:
    """A saved record can never show an abort (GET never reports one); a forged file
    that sets both loads the SError alone."""
    caps = host.HostCaps("aarch64", 12, {"KVM_CAP_ARM_INJECT_SERROR_ESR": 1})
    forged = kvm_arm64.VcpuEvents(
        serror_pending=1, serror_has_esr=1, ext_dabt_pending=1, serror_esr=0x1811
    )
    new = events._for_set("aarch64", forged, caps)
    assert isinstance(new, kvm_arm64.VcpuEvents)
    assert (new.ext_dabt_pending, new.serror_pending, new.serror_esr) == (0, 1, 0x1811)
    vc, ex = _vcpu()
    vc.set_events(new)
    assert [s.ext_dabt_pending for s in ex.sets()] == [0]


# ---------------------------------------------------------------------- probe cache


def test_probe_is_cached_per_boot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    boot = tmp_path / "boot_id"
    boot.write_text("boot-a\n")
    monkeypatch.setattr(kvmprobe, "BOOT_ID", str(boot))
    monkeypatch.setenv("SERRINJ_LOCK_DIR", str(tmp_path / "run"))
    monkeypatch.setattr(kvmprobe, "_memo", {})
    probes: List[str] = []

    def probe(bid: str = "") -> kvmprobe.SErrorBehaviour:
        probes.append(bid)
        return kvmprobe.SErrorBehaviour(len(probes) == 1, f"probe {len(probes)}", bid)

    monkeypatch.setattr(kvmprobe, "probe_serror", probe)
    first = kvmprobe.serror_behaviour()
    assert first.commits_at_set is True and not first.cached and probes == ["boot-a"]
    kvmprobe._memo.clear()  # another serrinj process, same boot: the file answers
    again = kvmprobe.serror_behaviour()
    assert again.commits_at_set is True and again.cached and probes == ["boot-a"]
    boot.write_text("boot-b\n")  # a reboot (perhaps into another kernel): probe again
    kvmprobe._memo.clear()
    after = kvmprobe.serror_behaviour()
    assert after.commits_at_set is False and probes == ["boot-a", "boot-b"]
    assert not kvmprobe.serror_behaviour(use_cache=False).cached


def test_an_unknown_answer_is_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    boot = tmp_path / "boot_id"
    boot.write_text("boot-a\n")
    monkeypatch.setattr(kvmprobe, "BOOT_ID", str(boot))
    monkeypatch.setenv("SERRINJ_LOCK_DIR", str(tmp_path / "run"))
    monkeypatch.setattr(kvmprobe, "_memo", {})
    monkeypatch.setattr(
        kvmprobe, "probe_serror", lambda bid="": kvmprobe.SErrorBehaviour(None, "failed", bid)
    )
    assert kvmprobe.serror_behaviour().commits_at_set is None
    assert not os.path.exists(tmp_path / "run" / kvmprobe.CACHE_NAME)


def test_probe_on_a_host_that_is_not_arm64(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "machine", lambda: "x86_64")
    found = kvmprobe.probe_serror("x")
    assert found.commits_at_set is None and "not an arm64 host" in found.observed
