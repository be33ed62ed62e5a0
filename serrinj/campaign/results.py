"""What a campaign run reports: progress events, step executions and the result."""

from __future__ import annotations

import datetime
import os
import socket
import traceback
from dataclasses import dataclass, field
from typing import (
    Any,
    Dict,
    Mapping,
    Optional,
    Tuple,
)

from serrinj.campaign.model import _with_hint
from serrinj.errors import (
    Conflict,
    ExitCode,
    InvalidInput,
    SerrinjError,
)


# ====================================================================== results
@dataclass(frozen=True)
class Progress:
    """A progress event for ``run(on_event=...)``.

    ``event`` is ``campaign-started``, ``step-started``, ``step-finished``,
    ``message`` (a pause's text for the operator) or ``campaign-finished``.
    ``index``/``total`` count step executions (a step runs once per vCPU and
    repetition) from 1; ``index`` is 0 for campaign-level events.
    """

    event: str
    index: int
    total: int
    step: Optional[int] = None
    name: str = ""
    kind: str = ""
    vcpu: Optional[int] = None
    repetition: Optional[int] = None
    outcome: Optional[str] = None
    duration_s: Optional[float] = None
    message: str = ""

    def as_dict(self) -> Dict[str, object]:
        return {
            "event": self.event,
            "index": self.index,
            "total": self.total,
            "step": self.step,
            "name": self.name,
            "kind": self.kind,
            "vcpu": self.vcpu,
            "repetition": self.repetition,
            "outcome": self.outcome,
            "duration_s": self.duration_s,
            "message": self.message,
        }


OUTCOMES = ("passed", "failed", "error", "skipped")


@dataclass(frozen=True)
class Execution:
    """One run of one step (for one vCPU and one repetition): a JUnit test case."""

    index: int
    step: int
    line: int
    kind: str
    label: str
    step_name: Optional[str]
    vcpu: Optional[int]
    repetition: int
    repetitions: int
    outcome: str = "skipped"
    message: str = ""
    duration_s: float = 0.0
    injections: Tuple[Mapping[str, object], ...] = ()
    detail: Mapping[str, object] = field(default_factory=dict)
    error: Optional[Mapping[str, object]] = None

    @property
    def name(self) -> str:
        """The test case name: step number, what it does, vCPU, repetition, its name."""
        out = f"step {self.step:02d}: {self.label}"
        if self.vcpu is not None:
            out += f" [vcpu {self.vcpu}]"
        if self.repetitions > 1:
            out += f" [{self.repetition}/{self.repetitions}]"
        if self.step_name:
            out += f" - {self.step_name}"
        return out

    @property
    def exit_code(self) -> int:
        if self.outcome == "error":
            code: Any = (self.error or {}).get("exit_code", int(ExitCode.ERROR))
            return int(code)
        return int(ExitCode.EXPECTATION_FAILED) if self.outcome == "failed" else 0

    def as_dict(self) -> Dict[str, object]:
        return {
            "index": self.index,
            "name": self.name,
            "step": self.step,
            "line": self.line,
            "kind": self.kind,
            "label": self.label,
            "step_name": self.step_name,
            "vcpu": self.vcpu,
            "repetition": self.repetition,
            "repetitions": self.repetitions,
            "outcome": self.outcome,
            "message": self.message,
            "duration_s": round(self.duration_s, 6),
            "injections": [dict(i) for i in self.injections],
            "detail": dict(self.detail),
            "error": dict(self.error) if self.error else None,
        }


@dataclass(frozen=True)
class CampaignResult:
    """What a campaign run did: every step execution, and the exit code."""

    name: str
    source: str
    description: str
    started_at: str
    duration_s: float
    dry_run: bool
    vm: Mapping[str, object]
    executions: Tuple[Execution, ...]
    hostname: str = field(default_factory=socket.gethostname)

    def count(self, outcome: str) -> int:
        return sum(1 for e in self.executions if e.outcome == outcome)

    @property
    def exit_code(self) -> int:
        """0: nothing failed; 9: a step failed; an error's own code if a step errored."""
        for e in self.executions:
            if e.outcome == "error":
                return e.exit_code
        if any(e.outcome == "failed" for e in self.executions):
            return int(ExitCode.EXPECTATION_FAILED)
        return int(ExitCode.OK)

    @property
    def passed(self) -> bool:
        return self.exit_code == 0

    def summary(self) -> str:
        parts = [f"{self.count(o)} {o}" for o in OUTCOMES if self.count(o)]
        return (
            f"campaign {self.name}: {', '.join(parts) or 'nothing run'}"
            f" in {self.duration_s:.2f} s (exit {self.exit_code})"
        )

    def as_dict(self) -> Dict[str, object]:
        return {
            "campaign": {
                "name": self.name,
                "source": self.source,
                "description": self.description,
            },
            "started_at": self.started_at,
            "duration_s": round(self.duration_s, 6),
            "dry_run": self.dry_run,
            "vm": dict(self.vm),
            "counts": {o: self.count(o) for o in OUTCOMES},
            "exit_code": self.exit_code,
            "executions": [e.as_dict() for e in self.executions],
        }

    @classmethod
    def from_error(
        cls, err: SerrinjError, source: str, name: Optional[str] = None
    ) -> CampaignResult:
        """A result holding one errored test case, for a campaign that could not start
        (a bad file, no such VM), so that CI still gets a report that says why."""
        if isinstance(err, InvalidInput):
            label = "load and check the campaign"
        elif isinstance(err, Conflict):
            label = "lock the VM"  # another serrinj run holds it
        else:
            label = "find the VM"
        ex = Execution(
            index=1,
            step=0,
            line=0,
            kind="campaign",
            label=label,
            step_name=None,
            vcpu=None,
            repetition=1,
            repetitions=1,
            outcome="error",
            message=_with_hint(err),
            error=_error_dict(err),
        )
        return cls(
            name=name or os.path.splitext(os.path.basename(source))[0],
            source=source,
            description="",
            started_at=_now(),
            duration_s=0.0,
            dry_run=False,
            vm={},
            executions=(ex,),
        )

    def junit_xml(self) -> str:
        """The result as JUnit XML (the format Jenkins and GitLab read)."""
        from serrinj.campaign.junit import _junit

        return _junit(self)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="seconds")


def _error_dict(err: BaseException) -> Dict[str, object]:
    if isinstance(err, SerrinjError):
        return {
            "kind": err.kind,
            "message": err.message,
            "hint": err.hint,
            "exit_code": int(err.exit_code),
        }
    if isinstance(err, KeyboardInterrupt):
        return {
            "kind": "interrupted",
            "message": "interrupted",
            "exit_code": int(ExitCode.INTERRUPTED),
        }
    return {
        "kind": type(err).__name__,
        "message": str(err),
        "exit_code": int(ExitCode.ERROR),
        "traceback": "".join(traceback.format_exception(type(err), err, err.__traceback__)),
    }
