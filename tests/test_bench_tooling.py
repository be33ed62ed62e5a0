"""The benchmark's own statistics, parsing and rendering (``bench/``): pure code, no timing."""

from __future__ import annotations

import json
import math
import os
import statistics
from typing import Any, Dict, List

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench import crowd, fig_list, fig_throughput, fig_vcpu_all, report, stats
from bench.fig_cli import gdb_call_argv, gdb_call_result
from bench.fig_startup import import_groups, parse_importtime
from bench.machine import kvm_kind

floats = st.floats(min_value=-1e9, max_value=1e9, allow_nan=False, allow_infinity=False)


# ---------------------------------------------------------------------- percentiles
def test_percentile_interpolates_like_numpy_linear() -> None:
    xs = [1.0, 2.0, 3.0, 4.0]
    assert stats.percentile(xs, 0) == 1.0
    assert stats.percentile(xs, 100) == 4.0
    assert stats.percentile(xs, 50) == 2.5
    assert stats.percentile(xs, 25) == pytest.approx(1.75)
    assert stats.percentile(xs, 90) == pytest.approx(3.7)
    assert stats.percentile([7.0], 10) == 7.0


def test_percentile_ignores_input_order() -> None:
    assert stats.percentile([9.0, 1.0, 5.0], 50) == 5.0


@pytest.mark.parametrize("bad", [-0.1, 100.1])
def test_percentile_rejects_out_of_range(bad: float) -> None:
    with pytest.raises(ValueError):
        stats.percentile([1.0], bad)


def test_percentile_of_nothing_is_an_error() -> None:
    with pytest.raises(ValueError):
        stats.percentile([], 50)


@given(st.lists(floats, min_size=1, max_size=60))
def test_median_matches_the_standard_library(xs: List[float]) -> None:
    assert stats.percentile(xs, 50) == pytest.approx(statistics.median(xs), rel=1e-9, abs=1e-6)


@given(st.lists(floats, min_size=1, max_size=60))
def test_summary_is_ordered(xs: List[float]) -> None:
    s = stats.summarize(xs)
    eps = 1e-6
    assert s.min - eps <= s.p10 <= s.q1 + eps
    assert s.q1 - eps <= s.median <= s.q3 + eps
    assert s.q3 - eps <= s.p90 <= s.max + eps
    assert s.n == len(xs)
    assert s.iqr >= -eps


def test_summary_dict_has_iqr() -> None:
    d = stats.summarize([1.0, 2.0, 3.0, 4.0, 5.0]).as_dict()
    assert d["median"] == 3.0 and d["iqr"] == d["q3"] - d["q1"] == 2.0


# ---------------------------------------------------------------------- ratios
def test_ratio_of_medians_and_pairs() -> None:
    a = [10.0, 20.0, 30.0]
    b = [1.0, 2.0, 5.0]
    r = stats.ratio(a, b)
    assert r.of_medians == 10.0
    assert sorted([10.0, 10.0, 6.0]) == sorted([a[i] / b[i] for i in range(3)])
    assert r.pairs.median == 10.0 and r.pairs.min == 6.0


def test_ratio_pairs_up_to_the_shorter_side() -> None:
    r = stats.ratio([4.0, 4.0, 4.0], [2.0, 2.0])
    assert r.pairs.n == 2 and r.pairs.median == 2.0


@pytest.mark.parametrize(("a", "b"), [([], [1.0]), ([1.0], []), ([0.0], [1.0]), ([1.0], [-1.0])])
def test_ratio_rejects_empty_or_non_positive(a: List[float], b: List[float]) -> None:
    with pytest.raises(ValueError):
        stats.ratio(a, b)


# ---------------------------------------------------------------------- interleaving
def test_interleave_rotates_the_order_each_round() -> None:
    order = [v for _, v in stats.interleave(4, ["A", "B"])]
    assert order == ["A", "B", "B", "A", "A", "B", "B", "A"]


def test_interleave_runs_every_variant_once_per_round() -> None:
    got = list(stats.interleave(5, ["x", "y", "z"]))
    for r in range(5):
        assert sorted(v for rr, v in got if rr == r) == ["x", "y", "z"]
    firsts = [v for rr, v in got if rr in range(5)][::3]
    assert set(firsts) == {"x", "y", "z"}  # nobody always goes first


def test_interleave_of_nothing() -> None:
    assert list(stats.interleave(3, [])) == []


# ---------------------------------------------------------------------- linear fit
def test_linear_fit_recovers_a_line() -> None:
    xs = [0.0, 1.0, 2.0, 3.0]
    fit = stats.linear_fit(xs, [2 * x + 1 for x in xs])
    assert fit.slope == pytest.approx(2.0)
    assert fit.intercept == pytest.approx(1.0)
    assert fit.r == pytest.approx(1.0)


def test_linear_fit_of_a_flat_series_has_zero_slope_and_r() -> None:
    fit = stats.linear_fit([1.0, 2.0, 3.0], [5.0, 5.0, 5.0])
    assert fit.slope == 0.0 and fit.r == 0.0


counts = st.integers(min_value=-(10**6), max_value=10**6).map(float)


@given(st.lists(st.tuples(counts, counts), min_size=2, max_size=40))
def test_linear_fit_residuals_sum_to_zero(points: List[Any]) -> None:
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    if len(set(xs)) < 2:
        with pytest.raises(ValueError):
            stats.linear_fit(xs, ys)
        return
    fit = stats.linear_fit(xs, ys)
    residual = sum(y - (fit.slope * x + fit.intercept) for x, y in zip(xs, ys))
    scale = max(1.0, max(abs(y) for y in ys)) * len(ys)
    assert abs(residual) <= 1e-6 * scale
    assert -1 - 1e-9 <= fit.r <= 1 + 1e-9


@pytest.mark.parametrize(
    ("xs", "ys"), [([1.0], [1.0]), ([1.0, 2.0], [1.0]), ([3.0, 3.0], [1.0, 2.0])]
)
def test_linear_fit_rejects_degenerate_input(xs: List[float], ys: List[float]) -> None:
    with pytest.raises(ValueError):
        stats.linear_fit(xs, ys)


# ---------------------------------------------------------------------- histogram
def test_log2_histogram_in_microseconds() -> None:
    counts = [0] * 32
    counts[11] = 5
    counts[20] = 1
    out = stats.log2_histogram_us(counts, tsc_khz=1_000_000)  # 1 GHz: 1 tick = 1 ns
    assert out == [
        {"from_us": 2.048, "to_us": 4.096, "count": 5},
        {"from_us": 1048.576, "to_us": 2097.152, "count": 1},
    ]


def test_log2_histogram_needs_a_rate() -> None:
    with pytest.raises(ValueError):
        stats.log2_histogram_us([1], 0)


# ---------------------------------------------------------------------- formatting
@pytest.mark.parametrize(
    ("us", "text"),
    [
        (0.25, "250 ns"),
        (1.0, "1.00 µs"),
        (42.123, "42.1 µs"),
        (999.0, "999 µs"),
        (1500.0, "1.50 ms"),
        (309_000.0, "309 ms"),
        (2_500_000.0, "2.50 s"),
        (-12.0, "-12.0 µs"),
        (math.nan, "n/a"),
    ],
)
def test_fmt_duration(us: float, text: str) -> None:
    assert stats.fmt_duration_us(us) == text


@pytest.mark.parametrize(
    ("n", "text"),
    [(512, "512 B"), (2048, "2.00 KiB"), (20 * 2**20, "20.0 MiB"), (-4096, "-4.00 KiB")],
)
def test_fmt_bytes(n: float, text: str) -> None:
    assert stats.fmt_bytes(n) == text


def test_fmt_ratio() -> None:
    assert stats.fmt_ratio(5.123) == "5.12x"
    assert stats.fmt_ratio(123.4) == "123x"
    assert stats.fmt_ratio(math.nan) == "n/a"


def test_markdown_table_escapes_pipes() -> None:
    md = stats.markdown_table(["a", "b"], [["x|y", 1], [None, "z"]])
    assert md.splitlines() == ["| a | b |", "|---|---|", "| x\\|y | 1 |", "|  | z |"]


def test_tables_need_one_cell_per_header() -> None:
    with pytest.raises(ValueError):
        stats.markdown_table(["a", "b"], [["only one"]])
    with pytest.raises(ValueError):
        stats.text_table(["a"], [["1", "2"]])


def test_text_table_aligns_and_cuts() -> None:
    out = stats.text_table(["name", "value"], [["abc", "1"], ["a", "123456"]], width=4)
    lines = out.splitlines()
    assert lines[0] == "name  value"
    assert lines[1] == "----  -----"
    assert lines[3] == "a     123…"


# ---------------------------------------------------------------------- gdb and importtime
def test_gdb_argv_casts_the_call_and_selects_a_thread() -> None:
    argv = gdb_call_argv(123, 7, tid=130)
    assert argv[:6] == ["gdb", "-nx", "-q", "-batch", "-p", "123"]
    assert argv[-1] == "call (int)ioctl(7, 0xae9a, 0)"
    assert "t.ptid[1] == 130" in argv[-3]
    assert "-ex" in gdb_call_argv(1, 2) and len(gdb_call_argv(1, 2)) == 8


def test_gdb_call_result() -> None:
    assert gdb_call_result("junk\n$1 = 0\n[Inferior 1 (process 5) detached]\n") == 0
    assert gdb_call_result("$1 = -1\n") == -1
    assert gdb_call_result("Couldn't write extended state status: Bad address.\n") is None


IMPORTTIME = """\
import time: self [us] | cumulative | imported package
import time:       100 |        100 |   _io
import time:      2000 |       2500 |     serrinj.kvm.api
import time:      3000 |       6000 |   serrinj.kvm
import time:       400 |        400 |       rich.text
import time:       250 |        900 | click
not an importtime line
"""


def test_parse_importtime_and_group_by_package() -> None:
    parsed = parse_importtime(IMPORTTIME)
    assert parsed["serrinj.kvm.api"] == (2000, 2500)
    assert parsed["click"] == (250, 900)
    assert len(parsed) == 5
    groups = dict(import_groups({k: v[0] for k, v in parsed.items()}))
    assert groups == {"serrinj.kvm": 5000, "rich": 400, "click": 250, "_io": 100}


# ---------------------------------------------------------------------- machine and report
@pytest.mark.parametrize(
    ("flags", "kind"),
    [
        (["vmx"], "bare metal, hardware-assisted KVM"),
        (["svm", "hypervisor"], "nested KVM with virtualization extensions passed through"),
        (
            ["hypervisor"],
            "nested KVM without vmx/svm in this guest (virtualization done in software)",
        ),
    ],
)
def test_kvm_kind(flags: List[str], kind: str) -> None:
    assert kvm_kind(flags)["kind"] == kind


def _doc() -> Dict[str, Any]:
    return {
        "started": "2026-01-01T00:00:00+00:00",
        "duration_s": 12.5,
        "machine": {
            "cpu_model": "CPU X",
            "cpus_online": 2,
            "memory_bytes": 2 * 2**30,
            "kernel": "Linux 6.1",
            "kvm": {"kind": "bare metal, hardware-assisted KVM"},
            "load_average_start": [0.1],
            "load_average_end": [0.2],
        },
        "figures": {
            "f": {
                "title": "1. A figure",
                "table": {"headers": ["h1", "h2"], "rows": [["a", "b|c"]]},
                "goals": [
                    {"goal": "fast", "measured": 5.25, "met": True},
                    {"goal": "small", "measured": None, "met": False},
                ],
                "notes": ["a note"],
            }
        },
        "errors": {"g": "RuntimeError: broke"},
    }


def test_render_text() -> None:
    out = report.render_text(_doc())
    assert "CPU X, 2 CPUs, 2 GiB; Linux 6.1; bare metal" in out
    assert "[MET ] fast: 5.25" in out and "[MISS] small: None" in out
    assert "note: a note" in out and "ERROR in g: RuntimeError: broke" in out


def test_render_markdown() -> None:
    out = report.render_markdown(_doc())
    assert "| a | b\\|c |" in out
    assert "- met: fast (5.25)" in out and "- **missed**: small (None)" in out


# ---------------------------------------------------------------------- scale figures
def test_list_goal_ratio_compares_the_biggest_cells() -> None:
    seconds = {
        fig_list.cell_key(2000, 1): [0.10, 0.12, 0.11],
        fig_list.cell_key(2000, 50): [0.16, 0.15, 0.17],
        fig_list.cell_key(500, 50): [9.0],
    }
    assert fig_list.goal_ratio(seconds) == pytest.approx(0.16 / 0.11)
    assert fig_list.goal_ratio({fig_list.cell_key(2000, 1): [0.1]}) is None


def test_list_profile_top_keeps_the_table_after_the_output() -> None:
    out = (
        '{"vms": []}\n   123 function calls\n\n'
        "   ncalls  tottime  percall\n  10  0.5  0.05 x.py:1(f)\n"
    )
    assert fig_list.profile_top(out) == ["   ncalls  tottime  percall", "  10  0.5  0.05 x.py:1(f)"]
    assert fig_list.profile_top('{"vms": []}\n') == []


def test_sweep_holds_by_vcpu() -> None:
    doc = {
        "injections": [
            {"vcpu_id": 0, "timings_us": {"held": 500.5, "seize": 10}},
            {"vcpu_id": 63, "timings_us": {"held": 700}},
        ]
    }
    assert fig_vcpu_all.sweep_holds(json.dumps(doc)) == {
        0: {"held": 500.5, "seize": 10.0},
        63: {"held": 700.0},
    }


def test_in_kvm_run_reads_the_syscall_file() -> None:
    assert not crowd.in_kvm_run(os.getpid())  # this thread is running, not in KVM_RUN
    assert not crowd.in_kvm_run(2**22 + 1)  # no such process


def test_a_crowd_of_sleepers_is_gone_after_stop() -> None:
    c = crowd.Crowd("sleep", 5)
    try:
        assert len(c.pids) == 5
        assert all(os.path.exists(f"/proc/{p}") for p in c.pids)
    finally:
        c.stop()
    assert c.gone()


@pytest.mark.kvm
def test_a_crowd_of_vms_is_listed_by_serrinj_and_gone_after_stop() -> None:
    from serrinj.target import discover

    c = crowd.Crowd("kvm", 2)
    try:
        for pid in c.pids:
            vm = discover.find(pid=pid)
            assert [v.vcpu_id for v in vm.vcpus] == [0]
            assert vm.vcpus[0].thread is not None and vm.vcpus[0].thread.tid == pid
    finally:
        c.stop()
    assert c.gone()


def test_crowd_kind_is_checked() -> None:
    with pytest.raises(ValueError):
        crowd.Crowd("busy", 1)


def test_throughput_profile_splits_the_wall_time_of_one_operation() -> None:
    # two operations: the engine's microseconds summed, and 2,000 µs of wall time
    sums = {"seize": 400.0, "held": 1000.0, "syscall_total": 600.0, "restore": 50.0}
    p = fig_throughput._profile(sums, 2000.0, 2)
    assert p == {
        "wall": 1000.0,
        "seize": 200.0,
        "held": 500.0,
        "ioctls": 300.0,
        "outside_session": 300.0,
    }
    assert fig_throughput._profile({}, 0.0, 0) == {}
    note = fig_throughput._profile_note("use case", p)
    assert note == (
        "use case, mean per op: 1000 µs = checks and seize 200 + held 500 (its ioctls 300)"
        " + outside the session 300"
    )
