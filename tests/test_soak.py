"""Soak: thousands of injections into live test VMs whose guests check themselves.

Three test VMs (halt, spin and futex mode, two vCPUs each) run their guests'
self-checking loop (registers and a memory checksum). A separate serrinj
process (this file run as a script: the injector whose memory is measured)
cycles NMIs, corrected and uncorrected machine checks over every VM and vCPU,
each confirmed with ``--wait``-style polling, and samples its own VmRSS and
each VMM's every so often. Afterwards:

- every guest counted exactly what was injected into it (NMIs, #MCs, polled
  corrected errors) and its self-check never failed;
- no VMM reported an error or an exit;
- every injection is in the audit trail as ``ok``;
- the RSS of serrinj and of every VMM is flat after warm-up (least-squares
  slope in KiB per 1,000 injections).

``pytest tests/test_soak.py --soak-count=10000`` (``make soak``) is the full
run; the normal test run makes 500 injections.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
X86 = os.uname().machine == "x86_64"
MODES = ("halt", "spin", "futex")
KINDS = ("nmi", "mce-ce", "mce-uc", "nmi")  # the cycle each vCPU goes through
UC_BANKS = (1, 2, 3)
CE_BANKS = (4, 5, 6, 7, 8, 9)
#: the first part of the run, excluded from the RSS slope (caches, arenas filling)
WARMUP = 0.2


# ====================================================================== the injector
def plan(i: int, n_vms: int) -> Tuple[int, int, str, int]:
    """Injection ``i``: (VM index, vCPU, kind, bank). Each VM/vCPU pair sees the
    kinds in turn, so machine checks on one vCPU are 4 visits apart."""
    pairs = n_vms * 2
    vm, vcpu = i % n_vms, (i // n_vms) % 2
    visit = i // pairs
    kind = KINDS[visit % len(KINDS)]
    if kind == "mce-uc":
        bank = UC_BANKS[(visit // len(KINDS)) % len(UC_BANKS)]
    elif kind == "mce-ce":
        bank = CE_BANKS[(visit // len(KINDS)) % len(CE_BANKS)]
    else:
        bank = -1
    return vm, vcpu, kind, bank


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def _heap_kib(gc: Any, tracemalloc: Any) -> int:
    """The Python objects alive in serrinj (tracemalloc, after a full collection)."""
    gc.collect()
    return int(tracemalloc.get_traced_memory()[0] // 1024)


def drive(pids: Sequence[int], count: int, every: int) -> None:
    """Inject ``count`` faults through serrinj's use cases; JSON lines on stdout."""
    from serrinj import mce
    from serrinj.errors import SerrinjError
    from serrinj.ops import inject, target

    def emit(obj: Dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    import gc
    import tracemalloc

    tracemalloc.start()
    me = os.getpid()
    counts: Dict[str, int] = {}
    failures: List[str] = []
    t0 = time.monotonic()
    for i in range(count):
        if i % every == 0:
            emit(
                {
                    "sample": i,
                    "t": time.monotonic() - t0,
                    "serrinj": _rss_kib(me),
                    "heap": _heap_kib(gc, tracemalloc),
                    "vmms": [_rss_kib(p) for p in pids],
                }
            )
        vm_index, vcpu, kind, bank = plan(i, len(pids))
        try:
            tgt = target.resolve(pid=pids[vm_index], vcpu=vcpu)
            if kind == "nmi":
                res = inject.inject_nmi(tgt, wait=5.0)
            else:
                preset = "srao" if kind == "mce-uc" else "corrected"
                m = mce.preset(preset).build(bank=bank, addr=0x100000 + 0x1000 * i)
                res = inject.inject_mce(tgt, inject.MceRequest(m), wait=5.0)
            (one,) = res
            assert one.registers_restored and one.delivery is not None and one.delivery.delivered
        except (SerrinjError, AssertionError) as err:
            failures.append(f"{i} {kind} vm{vm_index}/{vcpu}: {type(err).__name__}: {err}")
            continue
        key = f"{vm_index}/{vcpu}/{kind}"
        counts[key] = counts.get(key, 0) + 1
    emit(
        {
            "sample": count,
            "t": time.monotonic() - t0,
            "serrinj": _rss_kib(me),
            "heap": _heap_kib(gc, tracemalloc),
            "vmms": [_rss_kib(p) for p in pids],
        }
    )
    emit({"done": count, "seconds": time.monotonic() - t0, "counts": counts, "failures": failures})


def slope_kib_per_1000(samples: Sequence[Tuple[int, int]]) -> float:
    """Least-squares slope of (injection index, KiB), in KiB per 1,000 injections."""
    n = len(samples)
    mx = sum(x for x, _ in samples) / n
    my = sum(y for _, y in samples) / n
    sxx = sum((x - mx) ** 2 for x, _ in samples)
    sxy = sum((x - mx) * (y - my) for x, y in samples)
    return 1000.0 * sxy / sxx if sxx else 0.0


# ====================================================================== the test
@pytest.fixture
def soak_count(request: pytest.FixtureRequest) -> int:
    return int(request.config.getoption("--soak-count"))


@pytest.fixture
def vms() -> Iterator[List[Any]]:
    from serrinj.testvm.process import TestVmProcess

    started: List[TestVmProcess] = []
    try:
        for mode in MODES:
            vm = TestVmProcess.start(vcpus=2, mode=mode)
            started.append(vm)
        for vm in started:
            for v in (0, 1):
                vm.wait_event(
                    lambda e, v=v: e.get("event") == "guest-ready" and e.get("vcpu") == v, 20
                )
        yield started
    finally:
        for vm in started:
            vm.stop()


def _heartbeat(vm: Any, vcpu: int) -> Dict[str, Any]:
    mark = vm.mark()
    vm.command({"cmd": "heartbeat", "vcpu": vcpu})
    hb: Dict[str, Any] = vm.wait_event(
        lambda e: e.get("event") == "heartbeat" and e.get("vcpu") == vcpu, 10, since=mark
    )
    return hb


@pytest.mark.kvm
@pytest.mark.root
@pytest.mark.skipif(not X86, reason="x86_64 NMIs and machine checks; arm64 runs in the lab")
def test_soak(vms: List[Any], soak_count: int, tmp_path: Path) -> None:
    count = soak_count
    every = max(10, count // 200)
    audit_log = tmp_path / "audit.jsonl"
    proc = subprocess.Popen(
        [sys.executable, __file__, "drive", ",".join(str(vm.pid) for vm in vms), str(count),
         str(every)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "SERRINJ_AUDIT_LOG": str(audit_log)},
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=120 + count * 0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    lines = [json.loads(x) for x in out.splitlines()]
    samples = [x for x in lines if "sample" in x]
    (done,) = [x for x in lines if "done" in x]
    assert done["failures"] == [], done["failures"][:10]

    # every guest took exactly what was injected into it, and its self-check held
    want: Dict[Tuple[int, int], Dict[str, int]] = {}
    for i in range(count):
        vm_index, vcpu, kind, _bank = plan(i, len(vms))
        want.setdefault((vm_index, vcpu), {}).setdefault(kind, 0)
        want[(vm_index, vcpu)][kind] += 1
    for vm_index, vm in enumerate(vms):
        assert vm.alive(), f"the {MODES[vm_index]} VMM died"
        for vcpu in (0, 1):
            w = want.get((vm_index, vcpu), {})
            hb = _heartbeat(vm, vcpu)
            got = (hb["nmi_count"], hb["mce_count"], hb["poll_count"], hb["check_failures"])
            assert got == (w.get("nmi", 0), w.get("mce-uc", 0), w.get("mce-ce", 0), 0), (
                MODES[vm_index],
                vcpu,
                hb,
            )
        bad = [
            e for e in vm.events_seen if e.get("event") in ("error", "exit", "guest-check-failed")
        ]
        assert bad == [], bad[:5]

    # every injection is in the audit trail
    with open(audit_log) as f:
        records = [json.loads(x) for x in f]
    assert len(records) == count
    assert {r["outcome"] for r in records} == {"ok"}

    # memory: flat after warm-up
    steady = [s for s in samples if s["sample"] >= WARMUP * count]
    slopes = {"serrinj": slope_kib_per_1000([(s["sample"], s["serrinj"]) for s in steady])}
    heap_slope = slope_kib_per_1000([(s["sample"], s["heap"]) for s in steady])
    for vm_index, mode in enumerate(MODES):
        slopes[f"vmm-{mode}"] = slope_kib_per_1000(
            [(s["sample"], s["vmms"][vm_index]) for s in steady]
        )
    report = {
        "injections": count,
        "seconds": round(done["seconds"], 1),
        "per_injection_ms": round(1000 * done["seconds"] / count, 2),
        "rss_kib_first_last": {
            "serrinj": (samples[0]["serrinj"], samples[-1]["serrinj"]),
            **{
                f"vmm-{m}": (samples[0]["vmms"][i], samples[-1]["vmms"][i])
                for i, m in enumerate(MODES)
            },
        },
        "slope_kib_per_1000": {k: round(v, 3) for k, v in slopes.items()},
        "serrinj_heap_kib_first_last": (samples[0]["heap"], samples[-1]["heap"]),
        "serrinj_heap_slope_kib_per_1000": round(heap_slope, 3),
    }
    print("SOAK " + json.dumps(report))
    # RSS moves in whole pages and serrinj's own grows for its first ~1,000
    # injections (allocator arenas, free lists): a short run can only bound the
    # slope loosely (a kept result per injection is several KiB, far above it);
    # the full run holds the line of 1 KiB per 1,000 injections.
    limit = 1.0 if count >= 5000 else 256.0
    for name, slope in slopes.items():
        assert slope < limit, (name, report)
    # Python objects kept alive per injection (tracemalloc, free lists included)
    assert heap_slope < 64.0, report


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description="the soak test's injector process")
    parser.add_argument("what", choices=["drive"])
    parser.add_argument("pids")
    parser.add_argument("count", type=int)
    parser.add_argument("every", type=int)
    ns = parser.parse_args(argv)
    drive([int(p) for p in ns.pids.split(",")], ns.count, ns.every)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
