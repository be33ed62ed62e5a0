"""Figure 5: memory: the CLI's peak RSS, and a 10,000-injection campaign's RSS over time.

The campaign runs in a child process (:mod:`bench.campaign_worker`) so that
its resident set is its own; its RSS is sampled as it goes and a least-squares
line through the samples after the first 10 % (imports, first-use caches)
gives the growth per injection. A campaign must not grow with its length.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, List

from bench import stats
from bench.guest import GuestProbe
from bench.harness import Context, peak_rss_kb, run_cmd

#: the growth over the whole campaign that still counts as flat
FLAT_KIB = 512


def run(ctx: Context, progress: Callable[[str], None]) -> Dict[str, Any]:
    progress("figure 5: memory (CLI peak RSS; RSS over a long library campaign)")
    count = max(1000, round(10000 * min(ctx.scale, 1.0)))
    with ctx.test_vm(vcpus=1, mode="halt") as vm:
        commands = {
            "python -c pass": [ctx.python, "-c", "pass"],
            "serrinj --help": [*ctx.serrinj, "--help"],
            "serrinj status --json": [*ctx.serrinj, "status", "--json", "--pid", str(vm.pid)],
            "serrinj nmi --json": [*ctx.serrinj, "--json", "nmi", "--pid", str(vm.pid)],
        }
        peaks: Dict[str, List[int]] = {k: [] for k in commands}
        for _, name in stats.interleave(ctx.rounds(3), list(commands)):
            rss, code = peak_rss_kb(commands[name], env=ctx.env)
            if code == 0:
                peaks[name].append(rss)
        progress(f"figure 5: campaign of {count:,} injections in one process")
        counter = GuestProbe.of(vm.ready, vm.pid, 0)
        before = counter._u32("PC_NMI_COUNT")
        res = run_cmd(
            [
                ctx.python, "-m", "bench.campaign_worker", "--pid", str(vm.pid),
                "--count", str(count), "--every", str(max(1, count // 50)),
            ],
            env=ctx.env,
            timeout=900,
            cwd=_root(),
        )  # fmt: skip
        taken = counter._u32("PC_NMI_COUNT") - before
        healthy = vm.alive() and not [
            e for e in vm.events_seen if e.get("event") in ("error", "exit")
        ]
    if res.returncode != 0:
        raise RuntimeError(f"the campaign worker failed: {res.stderr[-1000:]}")
    lines = [json.loads(x) for x in res.stdout.splitlines() if x.strip()]
    samples = [x for x in lines if "i" in x]
    final = next(x for x in lines if x.get("done"))
    settled = [x for x in samples if x["i"] >= count // 10]
    fit = stats.linear_fit([x["i"] for x in settled], [x["rss_kb"] for x in settled])
    growth_kib = fit.slope * count
    rows = []
    for name, xs in peaks.items():
        rows.append([name, f"{max(xs) / 1024:.1f} MiB" if xs else "failed", ""])
    rows.append(
        [
            f"campaign, {count:,} x inject.inject_nmi() in one process",
            f"{final['maxrss_kb'] / 1024:.1f} MiB",
            f"{fit.slope * 1000:+.2f} KiB per 1,000 injections"
            f" (RSS {samples[0]['rss_kb'] / 1024:.1f} -> {samples[-1]['rss_kb'] / 1024:.1f} MiB)",
        ]
    )
    return {
        "id": "memory",
        "title": "5. Memory (peak RSS; RSS slope of a long campaign)",
        "table": {"headers": ["what", "peak RSS", "growth"], "rows": rows},
        "goals": [
            {
                "goal": f"a {count:,}-injection campaign does not grow (fitted growth over the"
                f" run < {FLAT_KIB} KiB)",
                "measured": growth_kib,
                "met": growth_kib < FLAT_KIB,
            }
        ],
        "notes": [
            f"campaign: {final['seconds']:.1f} s, {count / final['seconds']:,.0f} injections/s;"
            f" the guest took {taken:,} of {count:,} NMIs; test VM healthy: {healthy}",
            "fit over the samples after the first 10 % of the run"
            f" (r = {fit.r:.2f}, {fit.n} samples)",
        ],
        "data": {
            "cli_maxrss_kb": peaks,
            "campaign": {
                "count": count,
                "samples": samples,
                "maxrss_kb": final["maxrss_kb"],
                "seconds": final["seconds"],
                "fit_kib_per_injection": fit.as_dict(),
                "growth_kib": growth_kib,
                "nmis_taken": taken,
                "vm_healthy": healthy,
            },
        },
    }


def _root() -> str:
    import os

    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
