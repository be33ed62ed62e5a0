"""pytest plugin (``-p lab.guest.plugin``): one protocol line per test.

pytest's own verbose output stays on the console for humans. After each test
this plugin adds a ``RESULT`` line with the final outcome (a failing teardown
turns a pass into ERROR), followed by ``|`` detail lines for failures and the
reason of skips, and, for a pass, ``OBS`` lines with what the test printed
while it ran (its observations: the guest's ESR_EL1, QEMU still running, ...),
which pytest itself would not show. The host prints them under the test.

Tests print observations to stdout; process chatter (each serrinj command and
its time, a VM's start) goes to stderr, which pytest shows for failures only.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import pytest

from lab import protocol

MAX_DETAIL_LINES = 40
#: observation lines sent per passing test, and their width (the boot log keeps them)
MAX_OBSERVED_LINES = 60
MAX_OBSERVED_WIDTH = 240

_RANK = {"PASSED": 0, "XFAIL": 0, "SKIPPED": 1, "XPASS": 2, "FAILED": 3, "ERROR": 4}


class _State:
    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.outcome: Dict[str, str] = {}
        self.details: Dict[str, List[str]] = {}
        self.duration: Dict[str, float] = {}
        self.observed: Dict[str, List[str]] = {}

    def write(self, text: str) -> None:
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(text)  # starts a fresh line after "PASSED [ 20%]"
        else:
            print(text, flush=True)


_state: Optional[_State] = None


def _outcome(report: pytest.TestReport) -> Optional[str]:
    xfail = hasattr(report, "wasxfail")
    if report.when == "call":
        if report.passed:
            return "XPASS" if xfail else "PASSED"
        if report.skipped:
            return "XFAIL" if xfail else "SKIPPED"
        return "FAILED"
    if report.failed:
        return "ERROR"
    if report.skipped:
        return "XFAIL" if xfail else "SKIPPED"
    return None


def _detail(report: pytest.TestReport) -> List[str]:
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2])
        return [reason[len("Skipped: ") :] if reason.startswith("Skipped: ") else reason]
    text = report.longreprtext or ""
    lines = text.splitlines()
    if len(lines) > MAX_DETAIL_LINES:
        lines = ["...", *lines[-MAX_DETAIL_LINES:]]
    return lines


def _observed(report: pytest.TestReport) -> List[str]:
    """The non-blank lines the test body printed to stdout (not its fixtures)."""
    text = "".join(c for name, c in report.sections if name == "Captured stdout call")
    lines = [x.rstrip() for x in text.splitlines() if x.strip()]
    if len(lines) > MAX_OBSERVED_LINES:
        more = len(lines) - MAX_OBSERVED_LINES
        lines = [*lines[:MAX_OBSERVED_LINES], f"... {more} more line(s)"]
    return [
        x if len(x) <= MAX_OBSERVED_WIDTH else x[: MAX_OBSERVED_WIDTH - 3] + "..." for x in lines
    ]


def pytest_configure(config: pytest.Config) -> None:
    global _state
    _state = _State(config)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if _state is None:
        return
    outcome = _outcome(report)
    nodeid = report.nodeid
    _state.duration[nodeid] = _state.duration.get(nodeid, 0.0) + report.duration
    if report.when == "call" and report.passed:
        _state.observed[nodeid] = _observed(report)
    if outcome is None:
        return
    previous = _state.outcome.get(nodeid)
    if previous is None or _RANK[outcome] > _RANK[previous]:
        _state.outcome[nodeid] = outcome
        if outcome not in ("PASSED", "XFAIL"):
            _state.details[nodeid] = _detail(report)


def pytest_runtest_logfinish(nodeid: str) -> None:
    if _state is None:
        return
    outcome = _state.outcome.pop(nodeid, "ERROR")
    duration = _state.duration.pop(nodeid, 0.0)
    _state.write(protocol.line(protocol.RESULT, f"{outcome} {nodeid} {duration:.2f}"))
    for text in _state.details.pop(nodeid, []):
        _state.write(protocol.line(protocol.DETAIL, text))
    observed = _state.observed.pop(nodeid, [])
    if outcome == "PASSED":
        for text in observed:
            _state.write(protocol.line(protocol.OBSERVED, text))


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if _state is None or not report.failed:
        return
    _state.write(protocol.line(protocol.RESULT, f"ERROR {report.nodeid or '<collection>'} 0.00"))
    for text in (report.longreprtext or "").splitlines()[-MAX_DETAIL_LINES:]:
        _state.write(protocol.line(protocol.DETAIL, text))
