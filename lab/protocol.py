"""The line protocol between the lab's guest and the host, over the serial console.

The console also carries kernel messages and pytest's own verbose output, so
every line meant for the host starts with :data:`TAG` and is found by a search
(a kernel message may have been printed in front of it on the same line)::

    @@LAB@@ BEGIN kernel=6.1.0-56-arm64 cpu=max expect_ras=1
    @@LAB@@ INFO ras_detected=1 kvm=1 cap41=1 cap158=1 cap178=1
    @@LAB@@ RESULT PASSED lab/suite/test_smoke.py::test_dev_kvm_opens 0.01
    @@LAB@@ RESULT FAILED lab/suite/test_smoke.py::test_x 0.20
    @@LAB@@ | assert 0 == 1            (failure detail of the RESULT above)
    @@LAB@@ RESULT PASSED lab/suite/test_x.py::test_y 3.10
    @@LAB@@ OBS guest ESR_EL1 0xbe001811   (what the passing test above printed)
    @@LAB@@ ERROR serrinj could not be imported: ...
    @@LAB@@ END rc=0

This module is imported on both sides: the guest writes with :func:`line`, the
host reads with :func:`parse`. It must stay free of dependencies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional

TAG = "@@LAB@@"

BEGIN = "BEGIN"
INFO = "INFO"
RESULT = "RESULT"
DETAIL = "|"
OBSERVED = "OBS"
ERROR = "ERROR"
END = "END"

#: outcomes a RESULT line may carry; the first two count as failures
FAILING = ("FAILED", "ERROR")
OUTCOMES = ("FAILED", "ERROR", "PASSED", "SKIPPED", "XFAIL", "XPASS")

_LINE = re.compile(re.escape(TAG) + r" (\S+) ?(.*)$")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def line(kind: str, text: str = "") -> str:
    """One protocol line (without the newline)."""
    flat = text.replace("\r", " ").replace("\n", " ")
    if kind in (DETAIL, OBSERVED):
        return f"{TAG} {kind} {flat}"
    return f"{TAG} {kind} {flat}".rstrip()


def fields(text: str) -> Dict[str, str]:
    """``key=value`` words of a BEGIN/INFO/END line."""
    out: Dict[str, str] = {}
    for word in text.split():
        key, sep, value = word.partition("=")
        if sep:
            out[key] = value
    return out


@dataclass
class CaseResult:
    """One test as the guest reported it."""

    outcome: str
    nodeid: str
    duration: float = 0.0
    details: List[str] = field(default_factory=list)
    #: what the test printed (its observations), sent for passing tests
    observed: List[str] = field(default_factory=list)
    #: why a skip is accepted (the allow-list entry), set by :meth:`BootReport.problems`
    allowed_because: Optional[str] = None

    @property
    def failed(self) -> bool:
        return self.outcome in FAILING

    @property
    def skip_reason(self) -> str:
        return self.details[0] if self.outcome == "SKIPPED" and self.details else ""


@dataclass
class BootReport:
    """Everything the guest said during one boot."""

    begin: Optional[Dict[str, str]] = None
    info: Dict[str, str] = field(default_factory=dict)
    results: List[CaseResult] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)
    end: Optional[Dict[str, str]] = None

    def count(self, *outcomes: str) -> int:
        return sum(1 for r in self.results if r.outcome in outcomes)

    @property
    def passed(self) -> int:
        return self.count("PASSED", "XFAIL")

    @property
    def failed(self) -> int:
        return self.count(*FAILING) + self.count("XPASS")

    @property
    def skipped(self) -> int:
        return self.count("SKIPPED")

    @property
    def reached_suite(self) -> bool:
        return self.begin is not None

    @property
    def finished(self) -> bool:
        return self.end is not None

    def unexpected_skips(self, allowed: Callable[[CaseResult], Optional[str]]) -> List[CaseResult]:
        """The skipped tests ``allowed`` gives no reason for (it notes the others' reasons)."""
        out: List[CaseResult] = []
        for r in self.results:
            if r.outcome != "SKIPPED":
                continue
            r.allowed_because = allowed(r)
            if r.allowed_because is None:
                out.append(r)
        return out

    def problems(
        self, allowed_skip: Optional[Callable[[CaseResult], Optional[str]]] = None
    ) -> List[str]:
        """Why this boot does not count as a pass (empty when it does).

        Every skip is a problem unless ``allowed_skip`` returns why it is accepted
        (the boot's allow-list, :mod:`lab.skips`).
        """
        out: List[str] = []
        if not self.reached_suite:
            out.append("the boot never reached the suite")
            return out
        if not self.finished:
            out.append("the suite did not finish (no END line)")
        elif self.end is not None and self.end.get("rc") != "0":
            out.append(f"the suite exited with rc={self.end.get('rc')}")
        if self.failed:
            out.append(f"{self.failed} test(s) failed")
        skips = self.unexpected_skips(allowed_skip or (lambda r: None))
        if skips:
            names = ", ".join(r.nodeid for r in skips[:5]) + (", ..." if len(skips) > 5 else "")
            out.append(f"{len(skips)} test(s) skipped outside the boot's allow-list: {names}")
        if self.finished and not self.results:
            out.append("no test ran")
        out.extend(f"guest error: {e}" for e in self.errors)
        return out

    @property
    def ok(self) -> bool:
        return not self.problems()


def clean(raw: str) -> str:
    """A console line without carriage returns and terminal escapes."""
    return _ANSI.sub("", raw).replace("\r", "")


def feed(report: BootReport, raw_line: str) -> Optional[CaseResult]:
    """Add one console line to ``report``; returns the CaseResult it completed, if any."""
    match = _LINE.search(clean(raw_line))
    if match is None:
        return None
    kind, text = match.group(1), match.group(2)
    if kind == BEGIN:
        report.begin = fields(text)
    elif kind == INFO:
        report.info.update(fields(text))
    elif kind == RESULT:
        parts = text.split()
        if len(parts) >= 2 and parts[0] in OUTCOMES:
            try:
                duration = float(parts[2]) if len(parts) > 2 else 0.0
            except ValueError:
                duration = 0.0
            result = CaseResult(parts[0], parts[1], duration)
            report.results.append(result)
            return result
        report.errors.append(f"malformed RESULT line: {text}")
    elif kind == DETAIL:
        if report.results:
            report.results[-1].details.append(text)
    elif kind == OBSERVED:
        if report.results:
            report.results[-1].observed.append(text)
    elif kind == ERROR:
        report.errors.append(text)
    elif kind == END:
        report.end = fields(text)
    return None


def parse(lines: Iterable[str]) -> BootReport:
    """The :class:`BootReport` of a whole console transcript."""
    report = BootReport()
    for raw in lines:
        feed(report, raw)
    return report
