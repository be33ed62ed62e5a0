"""Figure 4: how long the CLI takes to start, against bare Python and bare imports.

Fresh processes, interleaved: ``python -c pass``, ``python -c 'import click,
rich, cffi'`` (the floor for any CLI on these dependencies), ``serrinj
--help``, ``serrinj --json esr decode`` (a command that touches no VM),
``serrinj status --json`` against the test VM and ``serrinj --json nmi --dry-run``
(an x86 NMI's start-up and vCPU read; nothing is sent). Then ``-X importtime`` of
the status command shows what is imported and what it costs, and whether any
``rich`` module is loaded on a ``--json`` path (it must not be).
"""

from __future__ import annotations

import collections
import json
from typing import Any, Callable, Dict, List, Sequence, Tuple

from bench import stats
from bench.harness import Context, peak_rss_kb, run_cmd

GOAL_RATIO = 1.5
#: an x86 NMI from the command line (read the vCPU, send nothing): the start-up that
#: most of ``serrinj nmi``'s wall time is (figure 1 compares the NMI with gdb)
NMI_ROW = "serrinj --json nmi --dry-run (test VM)"


def parse_importtime(stderr: str) -> Dict[str, Tuple[int, int]]:
    """``-X importtime`` lines as module -> (self µs, cumulative µs)."""
    out: Dict[str, Tuple[int, int]] = {}
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        head, cumulative, name = line.split("|", 2)
        try:
            out[name.strip()] = (int(head.split(":", 1)[1]), int(cumulative))
        except ValueError:
            continue
    return out


def import_groups(best: Dict[str, int]) -> List[Tuple[str, int]]:
    """Self time summed by package (``serrinj.x`` kept apart), largest first."""
    groups: Dict[str, int] = collections.Counter()
    for name, us in best.items():
        parts = name.split(".")
        key = ".".join(parts[:2]) if parts[0] == "serrinj" else parts[0]
        groups[key] += us
    return sorted(groups.items(), key=lambda kv: -kv[1])


def _importtime(ctx: Context, argv: Sequence[str], runs: int = 5) -> Dict[str, Any]:
    best: Dict[str, int] = {}
    for _ in range(runs):
        env = dict(ctx.env, PYTHONPROFILEIMPORTTIME="1")
        res = run_cmd(argv, env=env)
        for name, (self_us, _cum) in parse_importtime(res.stderr).items():
            best[name] = min(best.get(name, 1 << 62), self_us)
    rich = sorted(n for n in best if n == "rich" or n.startswith("rich."))
    return {
        "modules": len(best),
        "total_self_ms": sum(best.values()) / 1000,
        "by_package_ms": [(k, v / 1000) for k, v in import_groups(best)[:15]],
        "top_modules_ms": [
            (n, us / 1000) for n, us in sorted(best.items(), key=lambda kv: -kv[1])[:15]
        ],
        "rich_modules": rich,
    }


#: counts the classes ``dataclasses`` builds while the status path is imported, and
#: the time that takes (Python 3.11 builds each generated method with exec)
_DATACLASS_PROBE = """
import dataclasses, json, sys, time
spent = [0.0, 0]
build = dataclasses._process_class
def timed(*args, **kwargs):
    t = time.perf_counter()
    try:
        return build(*args, **kwargs)
    finally:
        spent[0] += time.perf_counter() - t
        spent[1] += 1
dataclasses._process_class = timed
t0 = time.perf_counter()
import serrinj.cli, serrinj.ops.status
print(json.dumps({"import_ms": (time.perf_counter() - t0) * 1e3,
                  "dataclass_ms": spent[0] * 1e3, "dataclasses": spent[1]}))
"""


def _dataclass_cost(ctx: Context, runs: int = 5) -> Dict[str, float]:
    """The smallest of ``runs`` fresh measurements of :data:`_DATACLASS_PROBE`."""
    best: Dict[str, float] = {}
    for _ in range(runs):
        res = run_cmd([ctx.python, "-c", _DATACLASS_PROBE], env=ctx.env)
        if res.returncode != 0:
            continue
        for key, value in json.loads(res.stdout).items():
            best[key] = min(best.get(key, value), value)
    return best


def run(ctx: Context, progress: Callable[[str], None]) -> Dict[str, Any]:
    progress("figure 4: CLI start-up (fresh processes, interleaved)")
    py = ctx.python
    rounds = ctx.rounds(20)
    with ctx.test_vm(vcpus=2, mode="halt") as vm:
        commands: Dict[str, List[str]] = {
            "python -c pass": [py, "-c", "pass"],
            "python -c 'import click, rich, cffi'": [py, "-c", "import click, rich, cffi"],
            "serrinj --help": [*ctx.serrinj, "--help"],
            "serrinj --json esr decode 0x1811": [*ctx.serrinj, "--json", "esr", "decode", "0x1811"],
            "serrinj status --json (test VM, 2 vCPUs)": [
                *ctx.serrinj, "status", "--json", "--pid", str(vm.pid),
            ],
            NMI_ROW: [
                *ctx.serrinj, "--json", "nmi", "--dry-run", "--pid", str(vm.pid), "--vcpu", "1",
            ],
        }  # fmt: skip
        for argv in commands.values():  # warm-up: bytecode and page cache
            run_cmd(argv, env=ctx.env)
        seconds: Dict[str, List[float]] = {k: [] for k in commands}
        failed: Dict[str, int] = {k: 0 for k in commands}
        for _, name in stats.interleave(rounds, list(commands)):
            res = run_cmd(commands[name], env=ctx.env)
            if res.returncode != 0:
                failed[name] += 1
                continue
            seconds[name].append(res.seconds)
        rss = {name: [peak_rss_kb(argv, env=ctx.env)[0]] for name, argv in commands.items()}
        progress("figure 4: -X importtime of serrinj status --json and --help")
        status_imports = _importtime(ctx, commands["serrinj status --json (test VM, 2 vCPUs)"])
        help_imports = _importtime(ctx, commands["serrinj --help"])
        nmi_imports = _importtime(ctx, commands[NMI_ROW])
        dataclass_cost = _dataclass_cost(ctx)

    base = "python -c 'import click, rich, cffi'"
    rows = []
    for name, xs in seconds.items():
        if not xs:
            rows.append([name, "failed", "", ""])
            continue
        s = stats.summarize([x * 1e6 for x in xs])
        r = stats.ratio(xs, seconds[base]) if seconds[base] else None
        rows.append(
            [
                name,
                f"{stats.fmt_duration_us(s.median)} ({stats.fmt_duration_us(s.p10)}-"
                f"{stats.fmt_duration_us(s.p90)})",
                stats.fmt_ratio(r.of_medians) if r else "n/a",
                f"{max(rss[name]) / 1024:.1f} MiB",
            ]
        )
    status_name = "serrinj status --json (test VM, 2 vCPUs)"
    ratio = (
        stats.ratio(seconds[status_name], seconds[base])
        if seconds[status_name] and seconds[base]
        else None
    )
    goals = [
        {
            "goal": f"serrinj status --json <= {GOAL_RATIO}x python -c 'import click, rich, cffi'"
            " (median ratio)",
            "measured": ratio.of_medians if ratio else None,
            "met": bool(ratio and ratio.of_medians <= GOAL_RATIO),
        },
        {
            "goal": "no rich module imported by serrinj status --json",
            "measured": ", ".join(status_imports["rich_modules"]) or "none",
            "met": not status_imports["rich_modules"],
        },
    ]
    top = ", ".join(f"{k} {v:.1f}" for k, v in status_imports["by_package_ms"][:8])
    notes = [
        f"status --json imports {status_imports['modules']} modules,"
        f" {status_imports['total_self_ms']:.0f} ms self time (min of 5 runs);"
        f" by package (ms): {top}",
        "cffi is imported without compiling or parsing anything (out-of-line ABI mode)",
        f"nmi --dry-run imports {nmi_imports['modules']} modules,"
        f" {nmi_imports['total_self_ms']:.0f} ms self time; --help {help_imports['modules']},"
        f" {help_imports['total_self_ms']:.0f} ms (min of 5 runs)",
    ]
    if dataclass_cost:
        notes.append(
            f"importing the status path (serrinj.cli, serrinj.ops.status) took"
            f" {dataclass_cost['import_ms']:.1f} ms, of which"
            f" {dataclass_cost['dataclass_ms']:.1f} ms built"
            f" {dataclass_cost['dataclasses']:.0f} dataclasses (min of 5 fresh processes)"
        )
    return {
        "id": "startup",
        "title": "4. CLI start-up (fresh process, median (p10-p90))",
        "table": {
            "headers": ["command", "wall", "vs import click,rich,cffi", "peak RSS"],
            "rows": rows,
        },
        "goals": goals,
        "notes": notes,
        "data": {
            "seconds": seconds,
            "summary_ms": stats.summaries_ms(seconds),
            "maxrss_kb": rss,
            "failed": failed,
            "ratio_status_over_imports": ratio.as_dict() if ratio else None,
            "importtime_status_json": status_imports,
            "importtime_help": help_imports,
            "importtime_nmi_dry_run": nmi_imports,
            "dataclass_cost_status_path": dataclass_cost,
        },
    }
