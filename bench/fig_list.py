"""Figure 6: ``serrinj list --json`` on a crowded host: 500-2,000 other processes, 1-50 VMs.

The host gets ``P`` extra sleeping processes and ``V`` tiny real KVM VMs
(:mod:`bench.crowd`: one-thread VMMs whose halted vCPU sits in ``KVM_RUN``),
and ``serrinj list --json`` runs as a fresh process, timed from spawn to
reaped; its peak RSS is taken once per cell. At each process count the VM
counts take turns (1, 10, 50, then rotated), a few runs per turn, so the
cells the goal compares are measured side by side. Only runs that listed
every one of the bench's VMs count.

Other users' processes and VMs on the host are listed too: each row says how
many processes the host had and how many VMs ``list`` returned.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, List, Optional

from bench import stats
from bench.crowd import Crowd
from bench.harness import Context, peak_rss_kb, run_cmd

PROCS = (500, 1000, 2000)
VMS = (1, 10, 50)
GOAL_RATIO = 1.6
#: the sleeping processes are started in chunks that add up to each of PROCS
_PROC_CHUNKS = (500, 500, 1000)
#: the VMs in crowds that add up to each of VMS
_VM_CHUNKS = (1, 9, 40)


def host_processes() -> int:
    return sum(1 for name in os.listdir("/proc") if name.isdigit())


def cell_key(procs: int, vms: int) -> str:
    return f"{procs}/{vms}"


def goal_ratio(seconds: Dict[str, List[float]]) -> Optional[float]:
    """Median time at 2,000 processes and 50 VMs over the median at 2,000 and 1 VM."""
    big = seconds.get(cell_key(PROCS[-1], VMS[-1])) or []
    one = seconds.get(cell_key(PROCS[-1], VMS[0])) or []
    if not big or not one:
        return None
    return stats.percentile(big, 50) / stats.percentile(one, 50)


def profile_top(stdout: str, lines: int = 18) -> List[str]:
    """The table ``python -m cProfile -s ...`` printed after the command's own output."""
    out = stdout.splitlines()
    for i, line in enumerate(out):
        if line.strip().startswith("ncalls"):
            return [x.rstrip() for x in out[i : i + 1 + lines] if x.strip()]
    return []


class _Vms:
    """The bench's VM crowds, grown or shrunk to a total."""

    def __init__(self) -> None:
        self.crowds: List[Crowd] = []
        self.every: List[Crowd] = []  # to check, at the end, that all of them are gone

    @property
    def pids(self) -> List[int]:
        return [p for c in self.crowds for p in c.pids]

    def set(self, n: int) -> None:
        want = 0
        while sum(_VM_CHUNKS[:want]) < n:
            want += 1
        while len(self.crowds) > want:
            self.crowds.pop().stop()
        while len(self.crowds) < want:
            crowd = Crowd("kvm", _VM_CHUNKS[len(self.crowds)])
            self.crowds.append(crowd)
            self.every.append(crowd)

    def stop(self) -> None:
        while self.crowds:
            self.crowds.pop().stop()


def run(ctx: Context, progress: Callable[[str], None]) -> Dict[str, Any]:
    progress("figure 6: serrinj list --json with 500-2,000 other processes and 1-50 VMs")
    argv = [*ctx.serrinj, "list", "--json"]
    visits = ctx.rounds(3)
    per_visit = 3
    seconds: Dict[str, List[float]] = {}
    rss: Dict[str, int] = {}
    listed: Dict[str, List[int]] = {}
    hosts: Dict[str, List[int]] = {}
    failures: List[str] = []
    profile: List[str] = []
    sleepers: List[Crowd] = []
    vms = _Vms()
    base_procs = host_processes()
    try:
        for level, chunk in zip(PROCS, _PROC_CHUNKS):
            sleepers.append(Crowd("sleep", chunk))
            for _, v in stats.interleave(visits, [str(v) for v in VMS]):
                nv = int(v)
                vms.set(nv)
                mine = set(vms.pids)
                key = cell_key(level, nv)
                if key not in rss:
                    run_cmd(argv, env=ctx.env)  # warm-up: dentries of the new processes
                    rss[key] = peak_rss_kb(argv, env=ctx.env)[0]
                for _ in range(per_visit):
                    hosts.setdefault(key, []).append(host_processes())
                    res = run_cmd(argv, env=ctx.env)
                    try:
                        got = {int(vm["pid"]) for vm in json.loads(res.stdout)["vms"]}
                    except (ValueError, KeyError, TypeError):
                        got = set()
                    if res.returncode != 0 or not mine <= got:
                        failures.append(
                            f"{key}: exit {res.returncode}, {len(mine - got)} of the bench's"
                            f" VMs missing: {res.stderr[-200:]}"
                        )
                        continue
                    seconds.setdefault(key, []).append(res.seconds)
                    listed.setdefault(key, []).append(len(got))
            progress(f"figure 6: {level} processes done")
        vms.set(VMS[-1])
        prof = run_cmd(
            [ctx.python, "-m", "cProfile", "-s", "tottime", "-m", "serrinj", "list", "--json"],
            env=ctx.env,
        )
        profile = profile_top(prof.stdout)
    finally:
        vms.stop()
        for crowd in sleepers:
            crowd.stop()
    left = [c for c in (*sleepers, *vms.every) if not c.gone()]
    if left:
        failures.append(f"{len(left)} crowds left processes behind")

    rows: List[List[object]] = []
    for level in PROCS:
        one = seconds.get(cell_key(level, VMS[0])) or []
        for nv in VMS:
            key = cell_key(level, nv)
            xs = seconds.get(key) or []
            if not xs:
                rows.append([level, nv, "failed", "", "", "", ""])
                continue
            s = stats.summarize([x * 1e6 for x in xs])
            rel = stats.percentile(xs, 50) / stats.percentile(one, 50) if one else None
            rows.append(
                [
                    f"{level:,}",
                    nv,
                    f"{stats.fmt_duration_us(s.median)} ({stats.fmt_duration_us(s.p10)}-"
                    f"{stats.fmt_duration_us(s.p90)})",
                    stats.fmt_ratio(rel) if rel else "n/a",
                    f"{rss.get(key, 0) / 1024:.1f} MiB",
                    f"{min(hosts[key]):,}-{max(hosts[key]):,}",
                    f"{min(listed[key])}-{max(listed[key])}",
                ]
            )
    ratio = goal_ratio(seconds)
    goals = [
        {
            "goal": f"list --json at 2,000 processes and 50 VMs <= {GOAL_RATIO}x its time"
            " with 1 VM (median ratio)",
            "measured": ratio,
            "met": ratio is not None and ratio <= GOAL_RATIO,
        }
    ]
    notes = [
        f"the host had {base_procs} processes before the bench added its own;"
        " other users' VMs are listed too (the 'VMs listed' column)",
        "the VMs are real KVM VMs (one vCPU halted in KVM_RUN, 4 KiB of guest RAM) in"
        " one-thread VMMs forked from one small parent; the other processes sleep",
        f"{visits} turns per VM count at each process count, {per_visit} runs per turn;"
        " peak RSS from one run per cell",
    ]
    if failures:
        notes.append(f"{len(failures)} runs failed: {'; '.join(failures[:3])}")
    return {
        "id": "list",
        "title": "6. serrinj list --json on a crowded host (fresh process, median (p10-p90))",
        "table": {
            "headers": [
                "other processes",
                "VMs",
                "wall",
                "vs 1 VM",
                "peak RSS",
                "host processes",
                "VMs listed",
            ],
            "rows": rows,
        },
        "goals": goals,
        "notes": notes,
        "data": {
            "seconds": seconds,
            "summary_ms": stats.summaries_ms(seconds),
            "peak_rss_kb": rss,
            "host_processes": hosts,
            "vms_listed": listed,
            "ratio_2000_50_over_2000_1": ratio,
            "profile_2000_50": profile,
            "failures": failures,
        },
    }
