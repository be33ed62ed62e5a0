"""Figure 7: ``serrinj nmi --vcpu all`` on a 64-vCPU test VM.

serrinj injects into the vCPUs one after another, each in its own engine
session, so a vCPU should be held for one injection, never for the whole
sweep (gdb, by contrast, stops every thread of the VMM for its whole run).
Measured, with fresh CLI processes, interleaved:

- *sweep*: ``serrinj --json nmi --vcpu all``: its wall time, and the engine's
  hold of each of the 64 vCPUs (``timings_us.held``, from PTRACE_INTERRUPT to
  PTRACE_DETACH);
- *one*: ``serrinj --json nmi --vcpu 63``: one injection into the probed vCPU.

vCPU 63's guest runs the stall probe (:mod:`bench.guest`) on a CPU of its own,
so the largest gap its guest sees in a window around a sweep is what a single
vCPU suffers from the sweep; the *one* runs give the same for one injection.
Every guest's NMI count is read from guest RAM before and after.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Dict, List, Optional

from bench import stats
from bench.guest import GuestProbe, ProbeError
from bench.harness import Context, pin_test_vm, run_cmd, unpin

VCPUS = 64
PROBED = VCPUS - 1
#: the sweep's stall on the probed vCPU may be at most this times a single injection's
GOAL_FACTOR = 2.0
TICK_MS = 1000


def sweep_holds(stdout: str) -> Dict[int, Dict[str, float]]:
    """vcpu_id -> engine timings (µs) from one ``--json nmi --vcpu all`` output."""
    out: Dict[int, Dict[str, float]] = {}
    for inj in json.loads(stdout)["injections"]:
        out[int(inj["vcpu_id"])] = {k: float(v) for k, v in inj.get("timings_us", {}).items()}
    return out


def _cell(xs: List[float]) -> str:
    if not xs:
        return "n/a"
    s = stats.summarize(xs)
    return (
        f"{stats.fmt_duration_us(s.median)} ({stats.fmt_duration_us(s.p10)}-"
        f"{stats.fmt_duration_us(s.p90)})"
    )


def run(ctx: Context, progress: Callable[[str], None]) -> Dict[str, Any]:
    progress(f"figure 7: nmi --vcpu all on a {VCPUS}-vCPU test VM")
    cpus = sorted(os.sched_getaffinity(0))
    pinned = len(cpus) >= 2
    rounds = ctx.rounds(10)
    wall: Dict[str, List[float]] = {"sweep": [], "one": []}
    stall: Dict[str, List[float]] = {"sweep": [], "one": [], "baseline": []}
    max_held: List[float] = []  # per sweep, the longest hold of any vCPU
    held_all: List[float] = []  # every vCPU's hold in every sweep
    seize_all: List[float] = []
    slowest: List[Dict[str, Any]] = []
    failures: List[str] = []
    sent = [0] * VCPUS
    t_start = time.monotonic()
    # a guest timer tick once a second: 64 halted vCPUs at the default 10 ms would wake
    # 6,400 times a second, each wake a software-emulated exit on this nested host
    with ctx.test_vm(vcpus=VCPUS, mode="halt", extra_args=("--tick-ms", str(TICK_MS))) as vm:
        started_s = time.monotonic() - t_start
        argv = {
            "sweep": [*ctx.serrinj, "--json", "nmi", "--pid", str(vm.pid), "--vcpu", "all"],
            "one": [*ctx.serrinj, "--json", "nmi", "--pid", str(vm.pid), "--vcpu", str(PROBED)],
        }
        counters = [GuestProbe.of(vm.ready, vm.pid, i) for i in range(VCPUS)]
        probe = counters[PROBED]
        try:
            if pinned:
                pin_test_vm(vm, PROBED, quiet_cpu=cpus[-1], other_cpus=cpus[:-1])
            before = [c._u32("PC_NMI_COUNT") for c in counters]
            for variant in ("sweep", "one"):  # warm-up: bytecode, page cache
                run_cmd(argv[variant], env=ctx.env)
                for v in range(VCPUS) if variant == "sweep" else (PROBED,):
                    sent[v] += 1
            probe.start()
            for _, variant in stats.interleave(rounds, ["sweep", "one"]):
                time.sleep(0.02)
                probe.new_window()
                res = run_cmd(argv[variant], env=ctx.env, timeout=120)
                try:
                    gap = probe.window_max_us()
                    probe.new_window()
                    time.sleep(res.seconds)
                    stall["baseline"].append(probe.window_max_us())
                except ProbeError as err:
                    failures.append(f"{variant}: {err}")
                    continue
                if res.returncode != 0:
                    failures.append(f"{variant}: exit {res.returncode}: {res.stderr[-200:]}")
                    continue
                holds = sweep_holds(res.stdout)
                for v in holds:
                    sent[v] += 1
                wall[variant].append(res.seconds)
                stall[variant].append(gap)
                if variant == "sweep":
                    held = {v: t.get("held", 0.0) for v, t in holds.items()}
                    held_all.extend(held.values())
                    seize_all.extend(t.get("seize", 0.0) for t in holds.values())
                    worst = max(held, key=held.__getitem__)
                    max_held.append(held[worst])
                    slowest.append({"vcpu": worst, "timings_us": holds[worst]})
                if not vm.alive():
                    failures.append("the test VM exited")
                    break
            probe.stop()
            time.sleep(0.1)
            taken = [c._u32("PC_NMI_COUNT") - b for c, b in zip(counters, before)]
        finally:
            unpin(vm)

    every_vcpu_took = all(t >= 1 for t in taken) and sum(taken) > 0
    sweep_med: Optional[float] = stats.percentile(stall["sweep"], 50) if stall["sweep"] else None
    one_med: Optional[float] = stats.percentile(stall["one"], 50) if stall["one"] else None
    rows = [
        [
            f"nmi --vcpu all ({VCPUS} injections)",
            _cell([x * 1e6 for x in wall["sweep"]]),
            _cell(stall["sweep"]),
            _cell(max_held),
        ],
        [
            f"nmi --vcpu {PROBED} (one injection)",
            _cell([x * 1e6 for x in wall["one"]]),
            _cell(stall["one"]),
            "",
        ],
        ["no injection (same window length)", "", _cell(stall["baseline"]), ""],
    ]
    goals = [
        {
            "goal": f"no vCPU held longer than one injection: vCPU {PROBED}'s stall during a"
            f" sweep <= {GOAL_FACTOR:g}x its stall from one injection (medians)",
            "measured": (sweep_med / one_med) if sweep_med and one_med else None,
            "met": bool(sweep_med and one_med and sweep_med <= GOAL_FACTOR * one_med),
        },
        {
            "goal": "every vCPU's guest took the NMIs (guest counters)",
            "measured": f"{sum(taken):,} taken of {sum(sent):,} sent",
            "met": every_vcpu_took and not failures,
        },
    ]
    notes = [
        f"the {VCPUS}-vCPU test VM started in {started_s:.2f} s; every vCPU halted in KVM_RUN"
        f" (guest timer every {TICK_MS} ms)",
        f"engine hold per vCPU over all sweeps: {_cell(held_all)}; seize: {_cell(seize_all)}",
        (
            f"vCPU {PROBED} had CPU {cpus[-1]} to itself; everything else shared the rest"
            if pinned
            else "nothing pinned (one CPU)"
        ),
        "the sweep's total time is the sum of its injections: serrinj holds one vCPU at a"
        " time, so the guest-seen stall of one vCPU is its own injection, not the sweep",
    ]
    if failures:
        notes.append(f"{len(failures)} runs failed: {'; '.join(failures[:3])}")
    return {
        "id": "vcpu_all",
        "title": f"7. nmi --vcpu all on a {VCPUS}-vCPU test VM (fresh CLI process,"
        " median (p10-p90))",
        "table": {
            "headers": [
                "command",
                "wall",
                f"vCPU {PROBED}'s stall (guest)",
                "longest engine hold of any vCPU",
            ],
            "rows": rows,
        },
        "goals": goals,
        "notes": notes,
        "data": {
            "wall_s": wall,
            "stall_us": stall,
            "max_held_us_per_sweep": max_held,
            "held_us": stats.summarize(held_all).as_dict() if held_all else None,
            "seize_us": stats.summarize(seize_all).as_dict() if seize_all else None,
            "slowest_vcpu_per_sweep": slowest,
            "nmis_sent": sent,
            "nmis_taken": taken,
            "startup_s": started_s,
            "failures": failures,
        },
    }
