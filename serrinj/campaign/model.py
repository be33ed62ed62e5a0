"""The campaign as data: its target, its steps, and the problems found in it."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import (
    Any,
    ClassVar,
    Dict,
    Mapping,
    Optional,
    Pattern,
    Sequence,
    Tuple,
    Union,
)

from serrinj.codec import tomlsubset
from serrinj.errors import (
    InvalidInput,
    SerrinjError,
)
from serrinj.faults import KINDS
from serrinj.kvm.arch import Arch

#: which VM architecture each fault needs
FAULT_ARCH: Mapping[str, Arch] = MappingProxyType({k: f.arch for k, f in KINDS.items()})
ARCH_ALIASES: Mapping[str, Arch] = MappingProxyType(
    {"x86_64": Arch.X86_64, "aarch64": Arch.AARCH64, "arm64": Arch.AARCH64}
)
DEFAULT_WAIT_S = 5.0
DEFAULT_PAUSE_TIMEOUT_S = 600.0
DEFAULT_TIMEOUTS: Mapping[str, float] = MappingProxyType(
    {"delivered": 5.0, "pending": 1.0, "log": 10.0}
)
EXPECT_KINDS = ("delivered", "pending", "log")
SINCE_CHOICES = ("inject", "start", "beginning")
ON_FAILURE = ("stop", "continue")
_MAX_REPEAT = 1_000_000

VcpuSel = Union[None, str, Tuple[int, ...]]  # None: the VM's only vCPU; "all"; explicit ids


# ====================================================================== the model
@dataclass(frozen=True)
class TargetSpec:
    """The ``[target]`` table: which VM, its arch, and its console log."""

    pid: Optional[int] = None
    name: Optional[str] = None
    pid_file: Optional[str] = None
    arch: Optional[str] = None
    log: Optional[str] = None

    def as_dict(self) -> Dict[str, object]:
        return {
            "pid": self.pid,
            "name": self.name,
            "pid_file": self.pid_file,
            "arch": self.arch,
            "log": self.log,
        }


@dataclass(frozen=True)
class TargetOverride:
    """Command-line target options. Any of ``pid``/``name``/``pid_file`` replaces the
    file's whole VM selection; ``log`` replaces ``[target] log``."""

    pid: Optional[int] = None
    name: Optional[str] = None
    pid_file: Optional[str] = None
    log: Optional[str] = None

    @property
    def selects_vm(self) -> bool:
        return self.pid is not None or self.name is not None or self.pid_file is not None


@dataclass(frozen=True)
class Step:
    """One ``[[steps]]`` table. ``number`` counts from 1; ``keys`` maps each key to its line."""

    kind: ClassVar[str] = ""

    number: int
    line: int
    name: Optional[str]
    repeat: int
    interval: float
    on_failure: Optional[str]
    keys: Mapping[str, int]

    def label(self) -> str:
        """A short description: ``inject nmi``, ``expect log /.../``, ``wait 2 s``."""
        return self.kind

    def key_line(self, key: str) -> int:
        return self.keys.get(key, self.line)


@dataclass(frozen=True)
class InjectStep(Step):
    kind: ClassVar[str] = "inject"

    fault: str
    #: the request (:mod:`serrinj.faults`); None only for a step that had problems
    request: Any
    vcpus: VcpuSel
    wait: Optional[float]
    dry_run: bool
    #: for an MCE: whether it raises #MC on a healthy guest (else it is only logged)
    raises_mc: Optional[bool] = None
    #: read the vCPU before and after for the report (``readback = false``: only what
    #: the fault's checks need, the shortest hold)
    readback: bool = True

    def label(self) -> str:
        detail = self.request.label() if self.request is not None else ""
        return f"inject {self.fault}" + (f" ({detail})" if detail else "")


@dataclass(frozen=True)
class WaitStep(Step):
    kind: ClassVar[str] = "wait"

    seconds: float

    def label(self) -> str:
        return f"wait {self.seconds:g} s"


@dataclass(frozen=True)
class PauseStep(Step):
    kind: ClassVar[str] = "pause"

    message: str
    seconds: Optional[float]
    until_file: Optional[str]
    timeout: float

    def label(self) -> str:
        if self.until_file is not None:
            return f"pause until {self.until_file}"
        return f"pause {self.seconds:g} s"


@dataclass(frozen=True)
class ExpectStep(Step):
    kind: ClassVar[str] = "expect"

    expect: str
    timeout: float
    #: the number of the inject step a delivered/pending expectation checks
    inject_step: Optional[int] = None
    match: Optional[Pattern[str]] = None
    file: Optional[str] = None
    absent: bool = False
    count: int = 1
    since: str = "inject"

    def label(self) -> str:
        if self.expect != "log":
            return f"expect {self.expect} (step {self.inject_step})"
        assert self.match is not None
        what = "no log line" if self.absent else "log"
        return f"expect {what} /{self.match.pattern}/"


@dataclass(frozen=True)
class Campaign:
    """A parsed and validated campaign file."""

    name: str
    description: str
    source: str
    on_failure: str
    target: TargetSpec
    steps: Tuple[Step, ...]
    #: the arch the steps need (declared in [target] or implied by the faults), if any
    arch: Optional[str]
    document: tomlsubset.Document = field(repr=False, compare=False)

    def as_dict(self) -> Dict[str, object]:
        return {
            "name": self.name,
            "description": self.description,
            "source": self.source,
            "on_failure": self.on_failure,
            "target": self.target.as_dict(),
            "arch": self.arch,
            "steps": [{"number": s.number, "line": s.line, "label": s.label()} for s in self.steps],
        }


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a campaign, at a line of its file."""

    source: str
    line: int
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}"
        return (
            f"{where}: key '{self.key}': {self.message}" if self.key else f"{where}: {self.message}"
        )


class CampaignError(InvalidInput):
    """The campaign file is wrong, or does not fit the VM; nothing was sent."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        n = len(self.problems)
        hint = None if n == 1 else f"{n} problems; nothing was injected"
        super().__init__("\n".join(str(p) for p in self.problems), hint=hint)


def _with_hint(err: SerrinjError, message: Optional[str] = None) -> str:
    text = err.message if message is None else message
    return f"{text} ({err.hint})" if err.hint else text
