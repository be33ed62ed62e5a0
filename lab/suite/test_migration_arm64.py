"""A pending SError, with its ESR, moved from one VM to another: ``serrinj events save|load``.

KVM's split between "an SError is pending" and "pending with this ESR" is
there so that a VMM can migrate a pending SError. As tests/test_events_migration.py
does for a pending NMI on x86_64, the SError is made pending in VM A (its guest
masks SErrors), saved, loaded into VM B (whose guest masks them too), and B's
guest must take it with the same syndrome when it unmasks. Both VMs are the
built-in test VM in processes of their own; serrinj runs through its CLI.
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
from typing import Iterator, Tuple

import pytest

from lab.guest import env
from lab.guest.cli import serrinj
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

ISS = 0x101D1ED  # IDS | 0x1d1ed, the kselftest's value: nothing KVM would make up itself
#: events files saved by test_pending_serror_moves_with_its_esr on each kernel's RAS boot
SAVED = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "data", "events-*.json")))
ESR_SERROR = 0xBE000000
EC_SERROR = 0x2F


@pytest.fixture
def pair() -> Iterator[Tuple[TestVmProcess, TestVmProcess]]:
    a = start("halt", vcpus=2, extra=["--mask-serror"])
    try:
        b = start("halt", vcpus=2, extra=["--mask-serror"])
        try:
            yield a, b
        finally:
            b.stop()
    finally:
        a.stop()


def _raw_serror(esr: int) -> str:
    """struct kvm_vcpu_events (arm64, BRIEF section 2) with an SError pending with ``esr``."""
    raw = bytes([1, 1, 0, 0, 0, 0, 0, 0]) + esr.to_bytes(8, "little") + bytes(48)
    assert len(raw) == 64
    return raw.hex()


def test_pending_serror_moves_with_its_esr(
    pair: Tuple[TestVmProcess, TestVmProcess], lab: env.LabConfig
) -> None:
    a, b = pair
    ras = lab.expect_ras
    with tempfile.TemporaryDirectory(prefix="events-") as tmp:
        saved = os.path.join(tmp, "a.json")
        # A: an SError pending on masked vCPU 1 (with an ESR on a RAS host)
        esr = ["--esr", hex(ISS)] if ras else []
        r = serrinj("inject", "--pid", str(a.pid), "--vcpu", "1", *esr)
        assert r.rc == 0, r
        assert r.data["injections"][0]["after"]["serror_pending"] is True
        r = serrinj("events", "save", "--pid", str(a.pid), "-o", saved)
        assert r.rc == 0, r
        with open(saved) as fh:
            doc = json.load(fh)
        assert doc["schema"] == "serrinj-events/1" and doc["arch"] == "aarch64"
        assert doc["source"]["pid"] == a.pid
        by_id = {v["vcpu_id"]: v for v in doc["vcpus"]}
        assert sorted(by_id) == [0, 1]
        raw = bytes.fromhex(by_id[1]["raw"])  # the bytes of GET, laid out as BRIEF section 2 says
        assert raw[0] == 1 and raw[1] == int(ras) and raw[2] == 0
        assert int.from_bytes(raw[8:16], "little") == (ISS if ras else 0)
        assert by_id[1]["decoded"]["serror_pending"] is True
        assert by_id[1]["decoded"]["serror_masked"] is True
        assert by_id[0]["decoded"]["serror_pending"] is False
        assert doc["host"]["kernel"] == os.uname().release
        # the file as saved on this kernel (lab/suite/data/ keeps one per kernel, which
        # test_files_saved_on_every_kernel_load_here loads on every boot)
        # (without "decoded", which load re-derives from "raw"), in pieces a console
        # line can carry: lab/suite/data/events-<kernel>.json are these pieces joined
        kept = dict(
            doc, vcpus=[{k: v for k, v in x.items() if k != "decoded"} for x in doc["vcpus"]]
        )
        text = json.dumps(kept, separators=(",", ":"))
        pieces = [text[i : i + 160] for i in range(0, len(text), 160)]
        for i, piece in enumerate(pieces):
            print(f"events file {lab.kernel} {i + 1}/{len(pieces)}: {piece}")

        if not ras:
            # A file with an ESR cannot load on a host without RAS: exit 5, nothing sent
            forged = dict(doc)
            forged["vcpus"] = [{"vcpu_id": 1, "raw": _raw_serror(0x1811)}]
            bad = os.path.join(tmp, "esr.json")
            with open(bad, "w") as fh:
                json.dump(forged, fh)
            r = serrinj("events", "load", bad, "--pid", str(b.pid))
            assert r.rc == 5, r
            assert "KVM_CAP_ARM_INJECT_SERROR_ESR is 0" in r.error["message"], r
            assert local_events(b, 1)["events"]["serror_pending"] is False

        # B: load; the VMM's own read-back shows it pending with the same ESR
        r = serrinj("events", "load", saved, "--pid", str(b.pid))
        assert r.rc == 0, r
        res = {x["vcpu_id"]: x for x in r.data["results"]}
        assert res[1]["after"]["serror_pending"] is True
        assert any("nothing pending" in n for n in res[0]["notes"]), res[0]
        own = local_events(b, 1)
        assert own["events"]["serror_pending"] is True and own["pstate_a"] is True
        if ras:
            assert res[1]["after"]["serror_esr"] == ISS
            assert own["events"]["serror_esr"] == ISS
    mark = b.mark()
    heartbeat(b, 1)
    assert serrors(b, 1, mark) == []  # B's guest runs, masked, and has not taken it
    unmask(b, 1)
    seen = b.wait_event(on("serror", 1), EVENT_TIMEOUT_S, since=mark)
    print(f"B's guest took the migrated SError: ESR_EL1 {seen['esr']:#x}")
    if ras:
        assert seen["esr"] == ESR_SERROR | ISS
    assert seen["ec"] == EC_SERROR
    # nothing was loaded onto B's vCPU 0, and A still has its own pending
    unmask(b, 0)
    assert heartbeat(b, 0)["serror_count"] == 0 and serrors(b, 0) == []
    assert heartbeat(b, 1)["serror_count"] == 1
    assert local_events(a, 1)["events"]["serror_pending"] is True
    assert trouble(a) == [] and trouble(b) == []


@pytest.mark.parametrize("saved", SAVED, ids=[os.path.basename(p)[7:-5] for p in SAVED])
def test_files_saved_on_every_kernel_load_here(saved: str, lab: env.LabConfig) -> None:
    """Across kernels: a pending SError with its ESR, saved on each kernel the lab boots
    (6.1, 6.12, 7.2), loads into this boot's VM. Into a vCPU that masks SErrors it stays
    pending with its ESR until the guest unmasks; into one that has them unmasked it is
    taken with that ESR, at once on a kernel that commits at SET (6.17+, the load says
    so), else when the vCPU runs. Without RAS the file is refused, nothing sent."""
    with open(saved) as fh:
        doc = json.load(fh)
    print(f"{os.path.basename(saved)}: saved on Linux {doc['host']['kernel']}")
    vm = start("halt", vcpus=2, extra=["--mask-serror"])
    try:
        unmask(vm, 0)
        heartbeat(vm, 0)
        if not lab.expect_ras:
            r = serrinj("events", "load", saved, "--pid", str(vm.pid))
            assert r.rc == 5 and "KVM_CAP_ARM_INJECT_SERROR_ESR is 0" in r.error["message"], r
            assert local_events(vm, 1)["events"]["serror_pending"] is False
            return
        # the file holds vCPU 0 (nothing pending) and vCPU 1 (pending, masked): put the
        # saved vCPU 1 onto both of ours
        one = next(v for v in doc["vcpus"] if v["vcpu_id"] == 1)
        both = dict(doc, vcpus=[dict(one, vcpu_id=0), one])
        path = os.path.join(tempfile.mkdtemp(prefix="events-"), "both.json")
        with open(path, "w") as fh:
            json.dump(both, fh)
        mark = vm.mark()
        r = serrinj("events", "load", path, "--pid", str(vm.pid))
        assert r.rc == 0, r
        res = {x["vcpu_id"]: x for x in r.data["results"]}
        # masked vCPU 1: pending with the saved ESR, on every kernel
        assert res[1]["after"]["serror_pending"] is True and res[1]["after"]["serror_esr"] == ISS
        own = local_events(vm, 1)
        assert own["events"]["serror_pending"] is True and own["events"]["serror_esr"] == ISS
        # unmasked vCPU 0: taken at load on 6.17+, else pending until it runs
        assert res[0]["after"]["serror_pending"] is (not lab.expect_commit), res[0]
        assert any("taken at once" in n for n in res[0]["notes"]) is lab.expect_commit, res[0]
        seen0 = vm.wait_event(on("serror", 0), EVENT_TIMEOUT_S, since=mark)
        assert seen0["esr"] == ESR_SERROR | ISS
        assert serrors(vm, 1, mark) == []
        unmask(vm, 1)
        seen1 = vm.wait_event(on("serror", 1), EVENT_TIMEOUT_S, since=mark)
        print(
            f"  loaded: vCPU 0 took ESR_EL1 {seen0['esr']:#x},"
            f" vCPU 1 after unmask {seen1['esr']:#x}"
        )
        assert seen1["esr"] == ESR_SERROR | ISS
        assert heartbeat(vm, 0)["serror_count"] == 1 and heartbeat(vm, 1)["serror_count"] == 1
        assert trouble(vm) == []
    finally:
        vm.stop()
