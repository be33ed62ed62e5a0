"""Campaigns: scripted RAS tests, run step by step against one VM, with a JUnit report.

A campaign is a TOML file (read by :mod:`serrinj.codec.tomlsubset`, which
works on Python 3.9 and knows the line of every key)::

    [campaign]
    name = "x86-smoke"               # default: the file name without .toml
    description = "..."
    on_failure = "stop"              # or "continue": what a failed step does to the rest

    [target]                         # all optional; command-line options replace it
    name = "vm-a"                    # the VM's name; or pid = 1234; or pid_file = "/run/vm-a.pid"
    arch = "x86_64"                  # or "aarch64" ("arm64"): checked before the VM is known
    log = "/var/log/vm-a.console"    # default file for log expectations

    [[steps]]                        # steps run in file order
    inject = "nmi"                   # a fault: serror, ext-dabt, mce or nmi
    vcpus = "all"                    # a vCPU id, a list of ids, or "all"
    wait = 5                         # confirm delivery within 5 s (true: 5 s)
    repeat = 3                       # any step: run it 3 times ...
    interval = 0.5                   # ... 0.5 s apart

    [[steps]]
    expect = "log"                   # a line matching a regex appears in a file
    match = 'mce: \\[Hardware Error\\]'
    timeout = 30

Steps (each ``[[steps]]`` table does exactly one thing, named by its key):

``inject = KIND``
    ``vcpus`` (required when the VM has more than one vCPU), ``wait``
    (seconds, or ``true`` for 5 s: poll until the guest has taken the fault;
    still pending then is a failure), ``dry_run`` (check and read the vCPU,
    send nothing), and per kind:

    - ``serror`` (arm64): ``esr`` (the ISS, bits [24:0]: a number or a
      severity name) or ``severity`` (``ce``, ``ueo``, ``uer``, ``ueu``,
      ``uc``), neither for KVM's own syndrome; ``force``;
    - ``ext-dabt`` (arm64): ``mmio_addr``, ``mmio_timeout``;
    - ``mce`` (x86_64): ``bank`` (required), ``preset`` (``corrected``,
      ``ucna``, ``srao``, ``srar``, ``uc-fatal``) and/or ``status``,
      ``mcg_status`` (numbers, or flag names as ``"val,uc,en"`` or
      ``["val", "uc", "en"]``), ``addr``, ``misc``; ``force``;
    - ``nmi`` (x86_64): nothing more.

``wait = SECONDS``
    Sleep (a ``wait`` key *inside* an inject step is its delivery timeout).

``pause = "message for the operator"``
    Show the message, then either sleep ``seconds`` or wait until the file
    ``until_file`` appears or is touched (at most ``timeout`` s, default 600).

``expect = "delivered"`` / ``expect = "pending"``
    The faults of the last inject step were taken by the guest within
    ``timeout`` (default 5 s) / are still pending for all of ``timeout``
    (default 1 s; e.g. an SError while the guest masks it).

``expect = "log"``
    ``match`` (a Python regex) is found on a line of ``file`` (default:
    ``[target] log``) within ``timeout`` (default 10 s); ``count = N`` needs N
    matching lines; ``absent = true`` instead requires that no line matches
    for all of ``timeout`` (the guest survived). Only lines written after
    ``since`` count: ``"inject"`` (default: the start of the last inject
    step), ``"start"`` (the start of the campaign) or ``"beginning"`` (the
    whole file).

Every step also takes ``name`` (shown in reports), ``repeat``, ``interval``
and ``on_failure``. Relative paths in the file are relative to the file's
directory. Steps are numbered from 1, and so are array indices in messages:
``steps[3].vcpus[1]`` is the first vCPU of the third step.

Everything is checked before anything is sent: :func:`load` checks the file
(unknown keys, types, values, syndromes, presets, arm64 faults mixed with
x86 ones); :func:`run` then checks it against the VM (its arch, vCPU ids,
the host's KVM capabilities, a log file for every log expectation). Each
problem reads ``FILE:LINE: key 'steps[3].sevrity': unknown key (did you mean
'severity'?)``; all of them are raised together as :class:`CampaignError`
(an :class:`~serrinj.errors.InvalidInput`).

Outcomes and exit codes: a step execution *passes*, *fails* (an expectation
or an injection did not hold: not delivered, refused, rejected by KVM),
*errors* (the VM is gone, permissions, an unsupported host: the campaign
stops) or is *skipped* (dry runs, and the steps left after a stop).
:attr:`CampaignResult.exit_code` is 0 when nothing failed,
``ExitCode.EXPECTATION_FAILED`` (9) when a step failed, and the error's own
code when one errored (130 for an interrupt).

API::

    c = campaign.load("x86-smoke.toml")
    result = campaign.run(c, target_override=campaign.TargetOverride(pid=1234),
                          on_event=print)
    open("report.xml", "w").write(result.junit_xml())
    sys.exit(result.exit_code)

The VM's lock (:mod:`serrinj.ops.lock`) is held from the first step to the
last, so another serrinj run on the VM, a second campaign included, waits
for the campaign to end (or gives up after ``--lock-wait``) instead of
interleaving with it. Every injection goes through :mod:`serrinj.ops.inject`,
so each is audited like a command-line injection. The command line is
``serrinj run`` (:mod:`serrinj.cli`).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import re
import socket
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import (
    IO,
    Any,
    Callable,
    ClassVar,
    Dict,
    List,
    Mapping,
    Optional,
    Pattern,
    Sequence,
    Tuple,
    Union,
)

from serrinj import __version__
from serrinj.codec import tomlsubset
from serrinj.codec.tomlsubset import Path
from serrinj.errors import (
    Conflict,
    ExitCode,
    ExpectationFailed,
    InvalidInput,
    KvmRejected,
    NotDelivered,
    SerrinjError,
    TargetGone,
    TargetNotFound,
)
from serrinj.faults import KINDS, fields
from serrinj.kvm.arch import Arch

__all__ = [
    "Campaign",
    "CampaignError",
    "CampaignResult",
    "Execution",
    "ExpectStep",
    "InjectStep",
    "PauseStep",
    "Problem",
    "Progress",
    "Step",
    "TargetOverride",
    "TargetSpec",
    "WaitStep",
    "check_arch",
    "load",
    "loads",
    "run",
]

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
_LOG_POLL_S = 0.05
_VCPU_POLL_S = 0.05
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


# ====================================================================== validation
_TOP_KEYS = ("campaign", "target", "steps")
_CAMPAIGN_KEYS = ("name", "description", "on_failure")
_TARGET_KEYS = ("pid", "name", "pid_file", "arch", "log")
_COMMON_KEYS = ("name", "repeat", "interval", "on_failure")
_INJECT_KEYS = ("inject", "vcpus", "wait", "dry_run")
_FAULT_KEYS: Mapping[str, Tuple[str, ...]] = MappingProxyType(
    {k: f.fields for k, f in KINDS.items()}
)
_EXPECT_KEYS: Mapping[str, Tuple[str, ...]] = MappingProxyType(
    {
        "delivered": ("expect", "timeout"),
        "pending": ("expect", "timeout"),
        "log": ("expect", "match", "file", "timeout", "absent", "count", "since"),
    }
)
_PAUSE_KEYS = ("pause", "seconds", "until_file", "timeout")
_ALL_STEP_KEYS = frozenset(
    _COMMON_KEYS
    + _INJECT_KEYS
    + _PAUSE_KEYS
    + tuple(k for ks in _FAULT_KEYS.values() for k in ks)
    + tuple(k for ks in _EXPECT_KEYS.values() for k in ks)
)


_type_name = fields.type_name
_suggest = fields.suggest
_show = fields.show


def _unknown(word: str, allowed: Sequence[str]) -> str:
    """``unknown key (did you mean 'x'?)``, or the keys there are when nothing is close."""
    hint = _suggest(word, allowed)
    return f"unknown key{hint or ' (the keys here are ' + ', '.join(allowed) + ')'}"


class _Checker:
    """Collects problems while building the campaign from a parsed document."""

    def __init__(self, doc: tomlsubset.Document, source: str) -> None:
        self.doc = doc
        self.source = source
        self.problems: List[Problem] = []

    def problem(self, path: Path, message: str, line: Optional[int] = None) -> None:
        where = self.doc.line(path) if line is None else line
        key = tomlsubset.format_path(path)
        self.problems.append(Problem(self.source, where, key, message))

    def unknown_keys(
        self, path: Path, table: Mapping[str, Any], allowed: Sequence[str], what: str
    ) -> None:
        for key in table:
            if key in allowed:
                continue
            self.problem((*path, key), _unknown(key, allowed) + what)

    # ---- typed getters: None when absent or wrong (the problem is recorded)
    def get(
        self,
        path: Path,
        table: Mapping[str, Any],
        key: str,
        types: Tuple[type, ...],
        expected: str,
    ) -> Any:
        if key not in table:
            return None
        value = table[key]
        ok = any(type(value) is t for t in types)
        if not ok:
            self.problem(
                (*path, key), f"must be {expected}, not {_type_name(value)} ({_show(value)})"
            )
            return None
        return value

    def string(
        self,
        path: Path,
        table: Mapping[str, Any],
        key: str,
        choices: Optional[Sequence[str]] = None,
        *,
        empty_ok: bool = False,
    ) -> Optional[str]:
        value = self.get(path, table, key, (str,), "a string")
        if value is None:
            return None
        if choices is not None and value not in choices:
            shown = ", ".join(repr(c) for c in choices)
            self.problem((*path, key), f"{value!r} is not one of {shown}{_suggest(value, choices)}")
            return None
        if not empty_ok and not value:
            self.problem((*path, key), "must not be empty")
            return None
        return str(value)

    def integer(
        self,
        path: Path,
        table: Mapping[str, Any],
        key: str,
        lo: int = 0,
        hi: Optional[int] = None,
    ) -> Optional[int]:
        value = self.get(path, table, key, (int,), "an integer")
        if value is None:
            return None
        if value < lo or (hi is not None and value > hi):
            bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            self.problem((*path, key), f"{value} is out of range: it must be {bound}")
            return None
        return int(value)

    def seconds(
        self, path: Path, table: Mapping[str, Any], key: str, *, zero_ok: bool
    ) -> Optional[float]:
        value = self.get(path, table, key, (int, float), "a number of seconds")
        if value is None:
            return None
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
            need = "0 or more" if zero_ok else "more than 0"
            self.problem((*path, key), f"{_show(value)} seconds: it must be {need}")
            return None
        return float(value)

    def boolean(self, path: Path, table: Mapping[str, Any], key: str) -> Optional[bool]:
        value = self.get(path, table, key, (bool,), "true or false")
        return None if value is None else bool(value)


def loads(text: str, source: str = "<campaign>", *, arch: Optional[str] = None) -> Campaign:
    """Parse and validate campaign text; ``arch`` also checks it against a VM arch."""
    doc = tomlsubset.loads(text, source)
    return _build(doc, source, arch)


def load(path: str, *, arch: Optional[str] = None) -> Campaign:
    """Read, parse and validate a campaign file (:class:`CampaignError` lists every problem).

    ``arch`` (``"x86_64"`` or ``"aarch64"``) also checks the steps against a
    VM of that arch, as :func:`run` does once it has found the VM.
    """
    from serrinj.host import privilege

    try:
        with privilege.open_file(path, "rb", "campaign file") as f:
            raw = f.read()
        doc = tomlsubset.loadb(raw, path)
    except FileNotFoundError:
        raise InvalidInput(f"campaign file {path} does not exist") from None
    except IsADirectoryError:
        raise InvalidInput(f"campaign file {path} is a directory") from None
    except PermissionError:
        raise InvalidInput(f"campaign file {path} is not readable") from None
    return _build(doc, path, arch)


def check_arch(campaign: Campaign, arch: str) -> None:
    """Raise :class:`CampaignError` if a step cannot run on a VM of ``arch``."""
    arch = _norm_arch(arch)
    problems = _arch_problems(campaign, arch, f"this is an {arch} VM")
    if problems:
        raise CampaignError(problems)


def _norm_arch(arch: str) -> str:
    return ARCH_ALIASES.get(arch, arch)


def _arch_problems(campaign: Campaign, arch: str, what: str) -> List[Problem]:
    out = []
    for step in campaign.steps:
        if isinstance(step, InjectStep) and FAULT_ARCH[step.fault] != arch:
            out.append(
                Problem(
                    campaign.source,
                    step.key_line("inject"),
                    f"steps[{step.number}].inject",
                    f"{_fault_name(step.fault)} injection needs an {FAULT_ARCH[step.fault]} VM;"
                    f" {what}",
                )
            )
    return out


def _fault_name(fault: str) -> str:
    return KINDS[fault].title


def _build(doc: tomlsubset.Document, source: str, arch: Optional[str]) -> Campaign:
    ck = _Checker(doc, source)
    data = doc.data
    ck.unknown_keys((), data, _TOP_KEYS, "; the top level has [campaign], [target] and [[steps]]")
    directory = os.path.dirname(os.path.abspath(source))

    def path_of(value: Optional[str]) -> Optional[str]:
        if value is None:
            return None
        return os.path.normpath(os.path.join(directory, os.path.expanduser(value)))

    # ---- [campaign]
    camp = data.get("campaign", {})
    name = os.path.splitext(os.path.basename(source))[0] or "campaign"
    description = ""
    on_failure = "stop"
    if not isinstance(camp, dict):
        ck.problem(("campaign",), f"must be a table ([campaign]), not {_type_name(camp)}")
    else:
        ck.unknown_keys(("campaign",), camp, _CAMPAIGN_KEYS, "")
        name = ck.string(("campaign",), camp, "name") or name
        description = ck.string(("campaign",), camp, "description", empty_ok=True) or ""
        on_failure = ck.string(("campaign",), camp, "on_failure", ON_FAILURE) or on_failure

    # ---- [target]
    tgt_data = data.get("target", {})
    spec = TargetSpec()
    if not isinstance(tgt_data, dict):
        ck.problem(("target",), f"must be a table ([target]), not {_type_name(tgt_data)}")
    else:
        p: Path = ("target",)
        ck.unknown_keys(p, tgt_data, _TARGET_KEYS, "")
        chosen = [k for k in ("pid", "name", "pid_file") if k in tgt_data]
        if len(chosen) > 1:
            ck.problem(
                (*p, chosen[1]),
                f"give one of pid, name and pid_file, not {' and '.join(chosen)}",
            )
        arch_text = ck.string(p, tgt_data, "arch", tuple(ARCH_ALIASES))
        spec = TargetSpec(
            pid=ck.integer(p, tgt_data, "pid", lo=1),
            name=ck.string(p, tgt_data, "name"),
            pid_file=path_of(ck.string(p, tgt_data, "pid_file")),
            arch=_norm_arch(arch_text) if arch_text else None,
            log=path_of(ck.string(p, tgt_data, "log")),
        )

    # ---- [[steps]]
    steps: List[Step] = []
    raw_steps = data.get("steps")
    if raw_steps is None:
        ck.problem((), "the campaign has no [[steps]]", line=1)
    elif not isinstance(raw_steps, list) or not all(isinstance(s, dict) for s in raw_steps):
        ck.problem(("steps",), "must be an array of tables: write each step as [[steps]]")
    else:
        last_inject: Optional[InjectStep] = None
        for i, raw in enumerate(raw_steps):
            step = _step(ck, i, raw, last_inject, path_of)
            if "inject" in raw and not isinstance(step, InjectStep):
                # A broken inject step: its own problems are reported; expectations
                # after it must not also claim that there is no inject step.
                last_inject = _BROKEN_INJECT
            if step is None:
                continue
            steps.append(step)
            if isinstance(step, InjectStep):
                last_inject = step

    # ---- one arch for the whole campaign
    campaign_arch = spec.arch
    arch_source: Optional[InjectStep] = None
    for step in steps:
        if not isinstance(step, InjectStep):
            continue
        need = FAULT_ARCH[step.fault]
        if campaign_arch is None:
            campaign_arch, arch_source = need, step
        elif need != campaign_arch:
            why = (
                f"step {arch_source.number} ({arch_source.fault}, line {arch_source.line})"
                f" needs {campaign_arch}; a campaign targets one VM"
                if arch_source is not None
                else f"[target] arch is {campaign_arch}"
            )
            ck.problem(
                ("steps", step.number - 1, "inject"),
                f"{_fault_name(step.fault)} injection needs an {need} VM, but {why}",
            )
    campaign = Campaign(
        name=name,
        description=description,
        source=source,
        on_failure=on_failure,
        target=spec,
        steps=tuple(steps),
        arch=campaign_arch,
        document=doc,
    )
    if arch is not None and not ck.problems:
        arch = _norm_arch(arch)
        ck.problems.extend(_arch_problems(campaign, arch, f"this is an {arch} VM"))
    if ck.problems:
        raise CampaignError(sorted(ck.problems, key=lambda pr: pr.line))
    return campaign


def _step(
    ck: _Checker,
    index: int,
    raw: Mapping[str, Any],
    last_inject: Optional[InjectStep],
    path_of: Callable[[Optional[str]], Optional[str]],
) -> Optional[Step]:
    path: Path = ("steps", index)
    kinds = [k for k in ("inject", "expect", "pause") if k in raw]
    if len(kinds) > 1:
        ck.problem(
            (*path, kinds[1]),
            f"a step does one thing: this one has both {kinds[0]!r} and {kinds[1]!r};"
            " split it into two [[steps]]",
        )
        return None
    if not kinds:
        if "wait" in raw:
            kinds = ["wait"]
        else:
            ck.problem(path, "a step needs one of inject, expect, pause or wait")
            return None
    kind = kinds[0]
    before = len(ck.problems)
    common: Dict[str, Any] = dict(
        number=index + 1,
        line=ck.doc.line(path),
        name=ck.string(path, raw, "name"),
        repeat=ck.integer(path, raw, "repeat", lo=1, hi=_MAX_REPEAT) or 1,
        interval=ck.seconds(path, raw, "interval", zero_ok=True) or 0.0,
        on_failure=ck.string(path, raw, "on_failure", ON_FAILURE),
        keys=MappingProxyType({k: ck.doc.line((*path, k)) for k in raw}),
    )
    step: Optional[Step]
    if kind == "inject":
        step = _inject_step(ck, path, raw, common)
    elif kind == "wait":
        _unknown_step_keys(ck, path, raw, (*_COMMON_KEYS, "wait"), "a wait step")
        seconds = ck.seconds(path, raw, "wait", zero_ok=True)
        step = None if seconds is None else WaitStep(**common, seconds=seconds)
    elif kind == "pause":
        step = _pause_step(ck, path, raw, common, path_of)
    else:
        step = _expect_step(ck, path, raw, common, last_inject, path_of)
    return step if len(ck.problems) == before else None


def _unknown_step_keys(
    ck: _Checker, path: Path, raw: Mapping[str, Any], allowed: Sequence[str], what: str
) -> None:
    for key in raw:
        if key in allowed:
            continue
        if key in _ALL_STEP_KEYS:
            ck.problem((*path, key), f"{key!r} does not apply to {what}")
        else:
            ck.problem((*path, key), _unknown(key, allowed))


def _inject_step(
    ck: _Checker, path: Path, raw: Mapping[str, Any], common: Dict[str, Any]
) -> Optional[InjectStep]:
    fault = ck.string(path, raw, "inject", tuple(FAULT_ARCH))
    if fault is None:
        return None
    allowed = (*_COMMON_KEYS, *_INJECT_KEYS, *_FAULT_KEYS[fault])
    _unknown_step_keys(ck, path, raw, allowed, f"an inject = {fault!r} step")
    vcpus = _vcpus(ck, path, raw)
    wait: Optional[float] = None
    if fault == "ext-dabt" and "wait" in raw:
        # the same refusal as `inject --ext-dabt --wait` (inject.validate_ext_dabt)
        ck.problem(
            (*path, "wait"),
            "'wait' does not apply to an inject = 'ext-dabt' step: KVM never reports an"
            " external data abort as pending, so its delivery cannot be confirmed;"
            " mmio_timeout bounds the wait for the MMIO exit",
        )
    elif "wait" in raw and type(raw["wait"]) is bool:
        wait = DEFAULT_WAIT_S if raw["wait"] else None
    else:
        wait = ck.seconds(path, raw, "wait", zero_ok=False)
    dry_run = bool(ck.boolean(path, raw, "dry_run"))
    request: Any = None
    try:
        request = KINDS[fault].from_fields(raw)
    except fields.FieldErrors as err:
        for e in err.problems:
            text = e.render(cli=False)
            ck.problem(
                (*path, e.field) if e.field else path, text if e.missing else _with_hint(e, text)
            )
        return None
    raises_mc = request.raises_exception()
    return InjectStep(
        **common,
        fault=fault,
        request=request,
        vcpus=vcpus,
        wait=wait,
        dry_run=dry_run,
        raises_mc=raises_mc,
    )


def _vcpus(ck: _Checker, path: Path, raw: Mapping[str, Any]) -> VcpuSel:
    if "vcpus" not in raw:
        return None
    value = raw["vcpus"]
    key_path = (*path, "vcpus")
    if value == "all":
        return "all"
    if type(value) is int:
        if value < 0:
            ck.problem(key_path, f"vCPU id {value} is negative")
            return None
        return (value,)
    if type(value) is list:
        if not value:
            ck.problem(key_path, 'is empty: give vCPU ids, or "all"')
            return None
        ids: List[int] = []
        for j, item in enumerate(value):
            if type(item) is not int or item < 0:
                ck.problem((*key_path, j), f"{_show(item)} is not a vCPU id")
            elif item in ids:
                ck.problem((*key_path, j), f"vCPU {item} is listed twice")
            else:
                ids.append(item)
        return tuple(ids)
    ck.problem(
        key_path,
        f'must be a vCPU id, an array of ids, or "all"; not {_type_name(value)} ({_show(value)})',
    )
    return None


def _with_hint(err: SerrinjError, message: Optional[str] = None) -> str:
    text = err.message if message is None else message
    return f"{text} ({err.hint})" if err.hint else text


def _pause_step(
    ck: _Checker,
    path: Path,
    raw: Mapping[str, Any],
    common: Dict[str, Any],
    path_of: Callable[[Optional[str]], Optional[str]],
) -> Optional[PauseStep]:
    _unknown_step_keys(ck, path, raw, (*_COMMON_KEYS, *_PAUSE_KEYS), "a pause step")
    message = ck.string(path, raw, "pause", empty_ok=True)
    seconds = ck.seconds(path, raw, "seconds", zero_ok=True)
    until = path_of(ck.string(path, raw, "until_file"))
    timeout = ck.seconds(path, raw, "timeout", zero_ok=False)
    if "seconds" in raw and "until_file" in raw:
        ck.problem((*path, "until_file"), "give either seconds or until_file, not both")
    elif "seconds" not in raw and "until_file" not in raw:
        ck.problem(path, "a pause step needs 'seconds' or 'until_file'")
    if "timeout" in raw and "until_file" not in raw:
        ck.problem((*path, "timeout"), "timeout goes with until_file")
    if message is None:
        return None
    return PauseStep(
        **common,
        message=message,
        seconds=seconds,
        until_file=until,
        timeout=DEFAULT_PAUSE_TIMEOUT_S if timeout is None else timeout,
    )


#: stands for an inject step that had problems of its own
_BROKEN_INJECT = InjectStep(
    number=0,
    line=0,
    name=None,
    repeat=1,
    interval=0.0,
    on_failure=None,
    keys=MappingProxyType({}),
    fault="nmi",
    request=None,
    vcpus=None,
    wait=None,
    dry_run=False,
)


def _expect_step(
    ck: _Checker,
    path: Path,
    raw: Mapping[str, Any],
    common: Dict[str, Any],
    last_inject: Optional[InjectStep],
    path_of: Callable[[Optional[str]], Optional[str]],
) -> Optional[ExpectStep]:
    what = ck.string(path, raw, "expect", EXPECT_KINDS)
    if what is None:
        return None
    _unknown_step_keys(
        ck, path, raw, (*_COMMON_KEYS, *_EXPECT_KEYS[what]), f"an expect = {what!r} step"
    )
    timeout = ck.seconds(path, raw, "timeout", zero_ok=False)
    timeout = DEFAULT_TIMEOUTS[what] if timeout is None else timeout
    if what in ("delivered", "pending"):
        key = (*path, "expect")
        if last_inject is _BROKEN_INJECT:
            return None
        if last_inject is None:
            ck.problem(
                key, f"expect = {what!r} checks the last inject step, and there is none before it"
            )
            return None
        if last_inject.fault == "ext-dabt":
            ck.problem(
                key,
                f"an external data abort cannot be read back, so {what!r} cannot be checked"
                f" (step {last_inject.number}); expect a line in the guest's log instead",
            )
            return None
        if what == "pending" and last_inject.fault == "mce" and last_inject.raises_mc is False:
            ck.problem(
                key,
                f"the machine check of step {last_inject.number} raises no exception (it is"
                " only logged in the bank), so nothing can stay pending",
            )
            return None
        return ExpectStep(**common, expect=what, timeout=timeout, inject_step=last_inject.number)
    pattern: Optional[Pattern[str]] = None
    text = ck.string(path, raw, "match")
    if "match" not in raw:
        ck.problem(path, "an expect = 'log' step needs 'match' (a regular expression)")
    elif text is not None:
        try:
            pattern = re.compile(text)
        except re.error as err:
            ck.problem((*path, "match"), f"not a valid regular expression: {err}")
    absent = bool(ck.boolean(path, raw, "absent"))
    count = ck.integer(path, raw, "count", lo=1)
    if absent and "count" in raw:
        ck.problem(
            (*path, "count"), "count goes with a line that must appear, not with absent = true"
        )
    since = ck.string(path, raw, "since", SINCE_CHOICES) or "inject"
    file = path_of(ck.string(path, raw, "file"))
    if pattern is None:
        return None
    # Without file and [target] log, the log may still come from the command line:
    # run() checks that there is one.
    return ExpectStep(
        **common,
        expect="log",
        timeout=timeout,
        match=pattern,
        file=file,
        absent=absent,
        count=count or 1,
        since=since,
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


# ---------------------------------------------------------------------- JUnit
# XML 1.0 cannot carry most control characters; console logs are full of them.
_XML_BAD = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")


def _xml_text(text: str) -> str:
    return _XML_BAD.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _junit_time(seconds: float) -> str:
    return f"{max(seconds, 0.0):.3f}"


def _junit(result: CampaignResult) -> str:
    suites = ET.Element("testsuites")
    suites.set("name", "serrinj")
    suites.set("tests", str(len(result.executions)))
    suites.set("failures", str(result.count("failed")))
    suites.set("errors", str(result.count("error")))
    suites.set("time", _junit_time(result.duration_s))
    suite = ET.SubElement(suites, "testsuite")
    attrs = {
        "name": result.name,
        "tests": str(len(result.executions)),
        "failures": str(result.count("failed")),
        "errors": str(result.count("error")),
        "skipped": str(result.count("skipped")),
        "time": _junit_time(result.duration_s),
        "timestamp": result.started_at,
        "hostname": result.hostname,
        "file": result.source,
    }
    for name, value in attrs.items():
        suite.set(name, _xml_text(value))
    props = ET.SubElement(suite, "properties")
    properties: List[Tuple[str, object]] = [
        ("serrinj.version", __version__),
        ("campaign.file", result.source),
        ("campaign.description", result.description),
        ("dry_run", "true" if result.dry_run else "false"),
    ]
    properties += [(f"vm.{k}", v) for k, v in result.vm.items() if v is not None]
    for k, v in properties:
        prop = ET.SubElement(props, "property")
        prop.set("name", k)
        prop.set("value", _xml_text(str(v)))
    classname = "serrinj." + result.name.replace(".", "_")
    for ex in result.executions:
        case = ET.SubElement(suite, "testcase")
        case.set("classname", _xml_text(classname))
        case.set("name", _xml_text(ex.name))
        case.set("time", _junit_time(ex.duration_s))
        if ex.outcome in ("failed", "error", "skipped"):
            tag = {"failed": "failure", "error": "error", "skipped": "skipped"}[ex.outcome]
            el = ET.SubElement(case, tag)
            el.set("message", _xml_text(ex.message))
            if ex.error:
                el.set("type", _xml_text(str(ex.error.get("kind", ""))))
            body = [ex.message]
            if ex.error and ex.error.get("hint"):
                body.append(f"hint: {ex.error['hint']}")
            if ex.error and ex.error.get("traceback"):
                body.append(str(ex.error["traceback"]))
            body.append(f"{result.source}:{ex.line}: step {ex.step}")
            el.text = _xml_text("\n".join(body))
        out = _system_out(ex)
        if out:
            so = ET.SubElement(case, "system-out")
            so.text = _xml_text(out)
    ET.indent(suites)
    text = ET.tostring(suites, encoding="unicode")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + text + "\n"


def _system_out(ex: Execution) -> str:
    parts: List[str] = []
    if ex.injections:
        parts.append(json.dumps(list(ex.injections), indent=2, sort_keys=True, default=str))
    if ex.detail:
        parts.append(json.dumps(dict(ex.detail), indent=2, sort_keys=True, default=str))
    return "\n".join(parts)


# ====================================================================== running
EventCallback = Callable[[Progress], None]


@dataclass(frozen=True)
class _Plan:
    step: Step
    vcpu: Optional[int]
    repetition: int
    #: the first execution of its repetition (the step's interval goes before it)
    starts_repetition: bool


class _StepFailed(Exception):
    """An expectation did not hold (the step fails; the message says why)."""

    def __init__(self, message: str, detail: Optional[Mapping[str, object]] = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = dict(detail or {})


class _StepSkipped(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


#: step errors that mean "this check or injection did not hold" (a JUnit failure);
#: every other error means the run cannot go on (a JUnit error, the campaign stops)
_FAILURES = (NotDelivered, Conflict, KvmRejected, ExpectationFailed, InvalidInput)


def run(
    campaign: Campaign,
    *,
    target_override: Optional[TargetOverride] = None,
    dry_run: bool = False,
    on_event: Optional[EventCallback] = None,
) -> CampaignResult:
    """Run ``campaign`` against its VM and return what happened.

    Before anything is sent, the VM is found (``target_override`` first, then
    ``[target]``) and the campaign is checked against it; problems raise
    :class:`CampaignError`, a missing VM :class:`~serrinj.errors.TargetNotFound`.
    The VM's lock is then held until the last step has run; when another
    serrinj run holds it for longer than ``guard.LOCK_WAIT`` (``--lock-wait``),
    :class:`~serrinj.errors.Conflict` names that run and nothing is sent.
    After that, failures are recorded in the result rather than raised.
    ``dry_run`` runs every check and reads each vCPU but sends nothing and
    skips waits, pauses and expectations. ``on_event`` receives
    :class:`Progress` events.
    """
    runner = _Runner(campaign, target_override or TargetOverride(), dry_run, on_event)
    return runner.run()


class _Runner:
    def __init__(
        self,
        campaign: Campaign,
        override: TargetOverride,
        dry_run: bool,
        on_event: Optional[EventCallback],
    ) -> None:
        self.c = campaign
        self.override = override
        self.dry_run = dry_run
        self.on_event = on_event
        self.vm: Any = None  # discover.Vm
        self.log_default: Optional[str] = override.log or campaign.target.log
        self.start_marks: Dict[str, int] = {}
        self.inject_marks: Dict[str, int] = {}
        #: step number -> the executions of that inject step
        self.inject_results: Dict[int, List[Execution]] = {}

    # ------------------------------------------------------------ set-up
    def emit(self, progress: Progress) -> None:
        if self.on_event is not None:
            self.on_event(progress)

    def find_vm(self) -> Any:
        from serrinj.target import discover

        o = self.override
        if o.selects_vm:
            pid, name, pid_file = o.pid, o.name, o.pid_file
        else:
            t = self.c.target
            pid, name, pid_file = t.pid, t.name, t.pid_file
        if pid_file is not None:
            pid = _read_pid_file(pid_file)
        return discover.find(pid=pid, name=name)

    def log_file(self, step: ExpectStep) -> Optional[str]:
        return step.file or self.log_default

    def preflight(self) -> Tuple[List[_Plan], Dict[int, Tuple[int, ...]]]:
        """Check the campaign against the VM and the host; plan every execution."""
        from serrinj.host import kvmcaps as host

        vm = self.vm
        if not vm.vcpus:
            raise TargetNotFound(f"VM {vm.label} has no vCPUs yet", hint="is it still starting?")
        problems = _arch_problems(self.c, vm.arch, f"VM {vm.label} is {vm.arch}")
        caps = host.probe()
        ids = tuple(v.vcpu_id for v in vm.vcpus)
        vcpus_of: Dict[int, Tuple[int, ...]] = {}
        for step in self.c.steps:
            key = f"steps[{step.number}]"
            if isinstance(step, InjectStep) and FAULT_ARCH[step.fault] == vm.arch:
                sel = step.vcpus
                if sel == "all":
                    vcpus_of[step.number] = ids
                elif sel is None:
                    if len(ids) != 1:
                        problems.append(
                            Problem(
                                self.c.source,
                                step.line,
                                key,
                                f"VM {vm.label} has {len(ids)} vCPUs ({_ids(ids)}): say which"
                                ' with vcpus = [...] or vcpus = "all"',
                            )
                        )
                    vcpus_of[step.number] = ids[:1]
                else:
                    assert isinstance(sel, tuple)
                    missing = [i for i in sel if i not in ids]
                    if missing:
                        problems.append(
                            Problem(
                                self.c.source,
                                step.key_line("vcpus"),
                                f"{key}.vcpus",
                                f"VM {vm.label} has no vCPU {_ids(missing)}; its vCPU ids"
                                f" are {_ids(ids)}",
                            )
                        )
                    vcpus_of[step.number] = sel
                problems.extend(self._cap_problems(step, caps, key))
            if isinstance(step, ExpectStep) and step.expect == "log" and not self.log_file(step):
                problems.append(
                    Problem(
                        self.c.source,
                        step.line,
                        key,
                        "which file? give file = ... in the step, log = ... in [target],"
                        " or a log file on the command line",
                    )
                )
        if problems:
            raise CampaignError(sorted(problems, key=lambda p: p.line))
        plan: List[_Plan] = []
        for step in self.c.steps:
            targets: Sequence[Optional[int]] = vcpus_of.get(step.number, (None,))
            for rep in range(1, step.repeat + 1):
                for n, vcpu in enumerate(targets):
                    plan.append(_Plan(step, vcpu, rep, n == 0))
        return plan, vcpus_of

    def check_files(self) -> None:
        """Every file the steps will read, looked up with the caller's rights now,
        before anything is sent: a guest log the caller may not read ends the run
        here (exit 4), whether or not it exists yet."""
        from serrinj.host import privilege

        for step in self.c.steps:
            if isinstance(step, ExpectStep) and step.expect == "log":
                path = self.log_file(step)
                assert path is not None
                # missing (it may appear later) or unreadable for another reason: not here
                with contextlib.suppress(OSError):
                    privilege.open_file(path, "rb", "guest log").close()
            elif isinstance(step, PauseStep) and step.until_file is not None:
                privilege.stat(step.until_file, "pause file")

    def _cap_problems(self, step: InjectStep, caps: Any, key: str) -> List[Problem]:
        try:
            step.request.check(caps)
        except SerrinjError as err:
            return [
                Problem(self.c.source, step.key_line("inject"), f"{key}.inject", _with_hint(err))
            ]
        return []

    # ------------------------------------------------------------ the run
    def run(self) -> CampaignResult:
        from serrinj.ops import guard, lock, policy

        self.vm = self.find_vm()
        plan, _ = self.preflight()
        self.check_files()
        # every inject step against the policy before the first runs
        for step in self.c.steps:
            if isinstance(step, InjectStep):
                policy.enforce(
                    step.fault,
                    self.vm,
                    step.request.severity(),
                    action="campaign-run",
                    audit_request={"step": step.number, "line": step.line, "fault": step.fault},
                )
        # One lock for the whole run, so that no other serrinj run interleaves with the
        # steps; each injection takes it again (the lock is re-entrant in one process).
        vm = self.vm
        with lock.vm_lock(vm.pid, vm.starttime, vm.label, wait=guard.LOCK_WAIT):
            return self._run_plan(plan)

    def _run_plan(self, plan: List[_Plan]) -> CampaignResult:
        from serrinj.ops.status import vm_dict

        t_start = time.monotonic()
        started_at = _now()
        total = len(plan)
        self.start_marks = self._marks()
        self.inject_marks = dict(self.start_marks)
        vm_info = {k: v for k, v in vm_dict(self.vm).items() if k in ("pid", "name", "vmm", "arch")}
        self.emit(Progress("campaign-started", 0, total, message=self.c.name))
        results: List[Execution] = []
        stop_reason: Optional[str] = None
        prev_step: Optional[int] = None
        for index, item in enumerate(plan, start=1):
            step = item.step
            ex = Execution(
                index=index,
                step=step.number,
                line=step.line,
                kind=step.kind,
                label=step.label(),
                step_name=step.name,
                vcpu=item.vcpu,
                repetition=item.repetition,
                repetitions=step.repeat,
            )
            if stop_reason is not None:
                ex = replace(ex, outcome="skipped", message=stop_reason)
                results.append(ex)
                self._emit_finished(ex, total)
                continue
            first_of_step = step.number != prev_step
            prev_step = step.number
            try:
                if item.repetition > 1 and item.starts_repetition and not self.dry_run:
                    time.sleep(step.interval)
                self.emit(
                    Progress(
                        "step-started",
                        index,
                        total,
                        step=step.number,
                        name=ex.name,
                        kind=step.kind,
                        vcpu=item.vcpu,
                        repetition=item.repetition,
                    )
                )
                ex = self._execute(ex, step, item, first_of_step)
            except KeyboardInterrupt as err:
                ex = replace(ex, outcome="error", message="interrupted", error=_error_dict(err))
            if isinstance(step, InjectStep):
                self.inject_results.setdefault(step.number, []).append(ex)
            results.append(ex)
            self._emit_finished(ex, total)
            if ex.outcome == "error":
                stop_reason = f"not run: step {step.number} ended the campaign ({ex.message})"
            elif ex.outcome == "failed" and (step.on_failure or self.c.on_failure) == "stop":
                stop_reason = f"not run: step {step.number} failed (on_failure = 'stop')"
        result = CampaignResult(
            name=self.c.name,
            source=self.c.source,
            description=self.c.description,
            started_at=started_at,
            duration_s=time.monotonic() - t_start,
            dry_run=self.dry_run,
            vm=vm_info,
            executions=tuple(results),
        )
        self.emit(
            Progress(
                "campaign-finished",
                0,
                total,
                outcome="passed" if result.exit_code == 0 else "failed",
                duration_s=result.duration_s,
                message=result.summary(),
            )
        )
        return result

    def _emit_finished(self, ex: Execution, total: int) -> None:
        self.emit(
            Progress(
                "step-finished",
                ex.index,
                total,
                step=ex.step,
                name=ex.name,
                kind=ex.kind,
                vcpu=ex.vcpu,
                repetition=ex.repetition,
                outcome=ex.outcome,
                duration_s=ex.duration_s,
                message=ex.message,
            )
        )

    def _refresh_vm(self) -> Any:
        """Re-read the VM (threads move, VMs exit) and make sure it is the same process."""
        from serrinj.target import discover

        old = self.vm
        try:
            vm = discover.find(pid=old.pid)
        except TargetNotFound as err:
            raise TargetGone(f"VM {old.label} is gone: {err.message}") from err
        if vm.starttime != old.starttime:
            raise TargetGone(f"VM {old.label} is gone: its pid now belongs to another process")
        return vm

    def _execute(self, ex: Execution, step: Step, item: _Plan, first: bool) -> Execution:
        t0 = time.monotonic()
        injections: List[Mapping[str, object]] = []
        detail: Dict[str, object] = {}
        try:
            if isinstance(step, InjectStep) and first:
                self.inject_marks = self._marks()
                self.inject_results[step.number] = []
                self.vm = self._refresh_vm()
            if isinstance(step, InjectStep):
                message = self._inject(step, item.vcpu, injections)
            elif self.dry_run:
                raise _StepSkipped("dry run: not run")
            elif isinstance(step, WaitStep):
                time.sleep(step.seconds)
                message = f"waited {step.seconds:g} s"
            elif isinstance(step, PauseStep):
                message = self._pause(step, detail)
            else:
                assert isinstance(step, ExpectStep)
                if step.expect == "log":
                    message = self._expect_log(step, detail)
                else:
                    message = self._expect_vcpus(step, detail)
            outcome = "passed"
            error = None
        except _StepSkipped as s:
            outcome, message, error = "skipped", s.message, None
        except _StepFailed as f:
            outcome, message, error = "failed", f.message, None
            detail.update(f.detail)
        except _FAILURES as err:
            outcome, message, error = "failed", _with_hint(err), _error_dict(err)
        except SerrinjError as err:
            outcome, message, error = "error", _with_hint(err), _error_dict(err)
        except KeyboardInterrupt:
            raise
        except Exception as err:  # a bug must not cost CI its report; it is in the traceback
            outcome, message, error = "error", f"{type(err).__name__}: {err}", _error_dict(err)
        return replace(
            ex,
            outcome=outcome,
            message=message,
            duration_s=time.monotonic() - t0,
            injections=tuple(injections),
            detail=detail,
            error=error,
        )

    # ------------------------------------------------------------ step kinds
    def _inject(
        self, step: InjectStep, vcpu: Optional[int], out: List[Mapping[str, object]]
    ) -> str:
        from serrinj.ops import inject
        from serrinj.target import attach as target

        assert vcpu is not None
        tgt = target.Target(self.vm, (vcpu,))
        dry = self.dry_run or step.dry_run
        res = inject.inject(tgt, step.request, step.wait, dry_run=dry)
        out.extend(i.as_dict() for i in res)
        if dry:
            why = "campaign dry run" if self.dry_run else "dry_run = true"
            raise _StepSkipped(f"{why}: checked and planned, nothing sent")
        inj = res[0]
        text = f"{step.fault} injected on vCPU {vcpu} (thread {inj.tid}, {inj.thread_state})"
        if inj.delivery is not None and inj.delivery.delivered:
            latency = inj.delivery.latency_s
            text += (
                f"; delivered after {latency * 1000:.1f} ms"
                if latency is not None
                else f"; {inj.delivery.reason or 'delivered'}"
            )
        return text

    def _pause(self, step: PauseStep, detail: Dict[str, object]) -> str:
        # Noted before the operator sees the message: they may act at once.
        before = None if step.until_file is None else _mtime(step.until_file)
        self.emit(Progress("message", 0, 0, step=step.number, kind="pause", message=step.message))
        detail["message"] = step.message
        if step.until_file is None:
            assert step.seconds is not None
            time.sleep(step.seconds)
            return f"paused {step.seconds:g} s"
        path = step.until_file
        deadline = time.monotonic() + step.timeout
        while True:
            now = _mtime(path)
            if now is not None and now != before:
                return f"{path} appeared"
            if time.monotonic() >= deadline:
                raise _StepFailed(f"{path} did not appear within {step.timeout:g} s")
            time.sleep(0.1)

    def _marks(self) -> Dict[str, int]:
        out = {}
        for step in self.c.steps:
            if isinstance(step, ExpectStep) and step.expect == "log":
                path = self.log_file(step)
                if path is not None and path not in out:
                    out[path] = _size(path)
        return out

    def _expect_log(self, step: ExpectStep, detail: Dict[str, object]) -> str:
        path = self.log_file(step)
        assert path is not None and step.match is not None
        if step.since == "beginning":
            offset = 0
        elif step.since == "start":
            offset = self.start_marks.get(path, 0)
        else:
            offset = self.inject_marks.get(path, 0)
        reader = _LogReader(path, offset)
        regex = step.match
        deadline = time.monotonic() + step.timeout
        found: List[Tuple[int, str]] = []
        since = {
            "inject": "the last inject step",
            "start": "the campaign's start",
            "beginning": "the file's beginning",
        }[step.since]
        while True:
            final = time.monotonic() >= deadline
            for lineno, line in reader.lines(final=final):
                if regex.search(line):
                    found.append((lineno, line))
            detail["file"] = path
            detail["lines_read"] = reader.count
            if step.absent and found:
                lineno, line = found[0]
                detail["matched"] = [{"line": n, "text": t} for n, t in found[:10]]
                raise _StepFailed(f"{path}:{lineno} matches /{regex.pattern}/: {line.strip()}")
            if not step.absent and len(found) >= step.count:
                detail["matched"] = [{"line": n, "text": t} for n, t in found[:10]]
                lineno, line = found[step.count - 1]
                return f"{path}:{lineno}: {line.strip()}"
            if final:
                break
            time.sleep(_LOG_POLL_S)
        if not reader.exists:
            raise _StepFailed(f"{path} does not exist (after {step.timeout:g} s)")
        if step.absent:
            return (
                f"no line of {path} matched /{regex.pattern}/ in {step.timeout:g} s"
                f" ({reader.count} new lines since {since})"
            )
        got = f"only {len(found)} of {step.count} lines" if found else "no line"
        detail["matched"] = [{"line": n, "text": t} for n, t in found[:10]]
        raise _StepFailed(
            f"{got} of {path} matched /{regex.pattern}/ within {step.timeout:g} s"
            f" ({reader.count} new lines since {since})"
        )

    def _expect_vcpus(self, step: ExpectStep, detail: Dict[str, object]) -> str:
        assert step.inject_step is not None
        checked = self.inject_results.get(step.inject_step, [])
        sent = [e for e in checked if e.outcome == "passed"]
        if not checked or all(e.outcome == "skipped" for e in checked):
            raise _StepSkipped(f"step {step.inject_step} sent nothing (dry run or not run)")
        if not sent:
            raise _StepFailed(f"step {step.inject_step}'s injections failed; nothing to check")
        targets: List[Tuple[int, str, bool]] = []
        for e in sent:
            for inj in e.injections:
                vcpu = int(inj["vcpu_id"])  # type: ignore[call-overload]
                prediction = inj.get("prediction") or {}
                raises = (
                    bool(prediction.get("raises_mc", True))
                    if isinstance(prediction, dict)
                    else True
                )
                kind = str(inj["kind"])
                if (vcpu, kind, raises) not in targets:
                    targets.append((vcpu, kind, raises))
        fault = next(
            s.request
            for s in self.c.steps
            if isinstance(s, InjectStep) and s.number == step.inject_step
        )
        t0 = time.monotonic()
        deadline = t0 + step.timeout
        state: Dict[int, Optional[float]] = {}
        logged_only = [v for v, k, r in targets if k == "mce" and not r]
        watch = [(v, k) for v, k, r in targets if not (k == "mce" and not r)]
        for v in logged_only:
            state[v] = 0.0
        polls = 0
        while True:
            polls += 1
            for vcpu, kind in watch:
                if state.get(vcpu) is not None:
                    continue
                if not self._pending(vcpu, fault):
                    state[vcpu] = time.monotonic() - t0
                    if step.expect == "pending":
                        detail["taken_after_s"] = state[vcpu]
                        raise _StepFailed(
                            f"vCPU {vcpu} took the {kind} after {state[vcpu]:.2f} s; it was"
                            f" expected to stay pending for {step.timeout:g} s",
                            detail,
                        )
            now = time.monotonic()
            if step.expect == "delivered" and all(state.get(v) is not None for v, _ in watch):
                detail["latency_s"] = {str(v): t for v, t in state.items()}
                detail["polls"] = polls
                note = " (a corrected error: only logged)" if logged_only and not watch else ""
                return f"delivered on vCPU {_ids(sorted(state))}{note}"
            if now >= deadline:
                break
            time.sleep(_VCPU_POLL_S)
        detail["polls"] = polls
        if step.expect == "pending":
            return f"still pending on vCPU {_ids([v for v, _ in watch])} after {step.timeout:g} s"
        late = [v for v, _ in watch if state.get(v) is None]
        raise _StepFailed(f"still pending on vCPU {_ids(late)} after {step.timeout:g} s", detail)

    def _pending(self, vcpu: int, fault: Any) -> bool:
        from serrinj.kvm import api
        from serrinj.target import attach as target

        with target.attach(self.vm, vcpu, (api.KVM_GET_VCPU_EVENTS,)) as (vc, _rt):
            return bool(fault.pending(vc))


def _ids(ids: Sequence[int]) -> str:
    return ", ".join(str(i) for i in ids)


class JunitReport:
    """The JUnit report file, opened (created) with the caller's rights before the run.

    Under sudo, a place the caller may not write raises
    :class:`~serrinj.errors.PermissionDenied` here, before anything is sent; any
    other failure to open or write it is only reported through ``warn``.
    """

    def __init__(self, path: str, warn: Callable[[str], None]) -> None:
        from serrinj.host import privilege

        self.path = path
        self.warn = warn
        self.f: Optional[IO[str]] = None
        try:
            self.f = privilege.open_file(path, "w", "JUnit report", encoding="utf-8")
        except OSError as err:
            warn(f"cannot write the JUnit report {path}: {err.strerror}")

    def write(self, result: CampaignResult) -> None:
        if self.f is None:
            return
        try:
            with self.f:
                self.f.write(result.junit_xml())
        except OSError as err:
            self.warn(f"cannot write the JUnit report {self.path}: {err.strerror}")
        self.f = None


def _read_pid_file(path: str) -> int:
    from serrinj.host import privilege

    try:
        with privilege.open_file(path, "r", "pid file", encoding="utf-8") as f:
            text = f.read().strip()
    except FileNotFoundError:
        raise TargetNotFound(f"pid file {path} does not exist", hint="is the VM running?") from None
    except OSError as err:
        raise TargetNotFound(f"cannot read pid file {path}: {err.strerror}") from None
    if not text.isdigit() or int(text) <= 0:
        raise TargetNotFound(f"pid file {path} does not hold a process id ({text[:20]!r})")
    return int(text)


def _mtime(path: str) -> Optional[float]:
    from serrinj.host import privilege

    st = privilege.stat(path, "pause file")
    return None if st is None else st.st_mtime_ns / 1e9


def _size(path: str) -> int:
    from serrinj.host import privilege

    st = privilege.stat(path, "guest log")
    return 0 if st is None else st.st_size


class _LogReader:
    """Follows a growing text file from a byte offset, yielding whole new lines."""

    def __init__(self, path: str, offset: int) -> None:
        self.path = path
        self.offset = offset
        self.partial = b""
        self.count = 0
        self.exists = False
        self.lineno: Optional[int] = None  # the line number of the next line

    def lines(self, *, final: bool = False) -> List[Tuple[int, str]]:
        from serrinj.host import privilege

        try:
            # with the caller's rights: a refusal (PermissionDenied) ends the step
            f = privilege.open_file(self.path, "rb", "guest log")
        except OSError:
            return []  # a missing file is not an error here
        self.exists = True
        with f:
            size = os.fstat(f.fileno()).st_size
            if size < self.offset:  # truncated or rotated: start over
                self.offset, self.partial, self.lineno = 0, b"", None
            if self.lineno is None:
                self.lineno = _count_lines(f, self.offset) + 1
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        chunks = (self.partial + data).split(b"\n")
        self.partial = chunks.pop()
        if final and self.partial:
            chunks.append(self.partial)
            self.partial = b""
        out = []
        for raw in chunks:
            out.append((self.lineno, raw.decode("utf-8", errors="replace").rstrip("\r")))
            self.lineno += 1
        self.count += len(out)
        return out


def _count_lines(f: IO[bytes], end: int) -> int:
    f.seek(0)
    n = 0
    left = end
    while left > 0:
        block = f.read(min(left, 1 << 20))
        if not block:
            break
        n += block.count(b"\n")
        left -= len(block)
    return n
