"""Reading a campaign file: every key checked, every problem found, named by file, line and key."""

from __future__ import annotations

import errno
import math
import os
import re
from types import MappingProxyType
from typing import Any, Callable, Dict, List, Mapping, Optional, Pattern, Sequence, Tuple

from serrinj.campaign import model
from serrinj.codec import tomlsubset
from serrinj.codec.tomlsubset import Path
from serrinj.errors import FileError, InvalidInput
from serrinj.faults import KINDS, fields

# why a campaign file cannot be read, by errno (others keep the kernel's words)
_FILE_WHY = {
    errno.ENOENT: "does not exist",
    errno.EISDIR: "is a directory",
    errno.EACCES: "is not readable",
    errno.EPERM: "is not readable",
}

# ====================================================================== validation
_TOP_KEYS = ("campaign", "target", "steps")
_CAMPAIGN_KEYS = ("name", "description", "on_failure")
_TARGET_KEYS = ("pid", "name", "pid_file", "arch", "log")
_COMMON_KEYS = ("name", "repeat", "interval", "on_failure")
_INJECT_KEYS = ("inject", "vcpus", "wait", "dry_run", "readback")
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
        self.problems: List[model.Problem] = []

    def problem(self, path: Path, message: str, line: Optional[int] = None) -> None:
        where = self.doc.line(path) if line is None else line
        key = tomlsubset.format_path(path)
        self.problems.append(model.Problem(self.source, where, key, message))

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


def loads(text: str, source: str = "<campaign>", *, arch: Optional[str] = None) -> model.Campaign:
    """Parse and validate campaign text; ``arch`` also checks it against a VM arch."""
    doc = tomlsubset.loads(text, source)
    return _build(doc, source, arch)


def load(path: str, *, arch: Optional[str] = None) -> model.Campaign:
    """Read, parse and validate a campaign file (:class:`CampaignError` lists every problem).

    ``arch`` (``"x86_64"`` or ``"aarch64"``) also checks the steps against a
    VM of that arch, as :func:`run` does once it has found the VM.
    """
    from serrinj.host import privilege

    try:
        with privilege.open_file(path, "rb", "campaign file") as f:
            raw = f.read()
        doc = tomlsubset.loadb(raw, path)
    except FileError as err:
        why = _FILE_WHY.get(err.errno or 0)
        if why is None:
            raise
        raise InvalidInput(f"campaign file {path} {why}") from None
    return _build(doc, path, arch)


def check_arch(campaign: model.Campaign, arch: str) -> None:
    """Raise :class:`CampaignError` if a step cannot run on a VM of ``arch``."""
    arch = _norm_arch(arch)
    problems = _arch_problems(campaign, arch, f"this is an {arch} VM")
    if problems:
        raise model.CampaignError(problems)


def _norm_arch(arch: str) -> str:
    return model.ARCH_ALIASES.get(arch, arch)


def _arch_problems(campaign: model.Campaign, arch: str, what: str) -> List[model.Problem]:
    out = []
    for step in campaign.steps:
        if isinstance(step, model.InjectStep) and model.FAULT_ARCH[step.fault] != arch:
            out.append(
                model.Problem(
                    campaign.source,
                    step.key_line("inject"),
                    f"steps[{step.number}].inject",
                    f"{_fault_name(step.fault)} injection needs an"
                    f" {model.FAULT_ARCH[step.fault]} VM; {what}",
                )
            )
    return out


def _fault_name(fault: str) -> str:
    return KINDS[fault].title


def _build(doc: tomlsubset.Document, source: str, arch: Optional[str]) -> model.Campaign:
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
        on_failure = ck.string(("campaign",), camp, "on_failure", model.ON_FAILURE) or on_failure

    # ---- [target]
    tgt_data = data.get("target", {})
    spec = model.TargetSpec()
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
        arch_text = ck.string(p, tgt_data, "arch", tuple(model.ARCH_ALIASES))
        spec = model.TargetSpec(
            pid=ck.integer(p, tgt_data, "pid", lo=1),
            name=ck.string(p, tgt_data, "name"),
            pid_file=path_of(ck.string(p, tgt_data, "pid_file")),
            arch=_norm_arch(arch_text) if arch_text else None,
            log=path_of(ck.string(p, tgt_data, "log")),
        )

    # ---- [[steps]]
    steps: List[model.Step] = []
    raw_steps = data.get("steps")
    if raw_steps is None:
        ck.problem((), "the campaign has no [[steps]]", line=1)
    elif not isinstance(raw_steps, list) or not all(isinstance(s, dict) for s in raw_steps):
        ck.problem(("steps",), "must be an array of tables: write each step as [[steps]]")
    else:
        last_inject: Optional[model.InjectStep] = None
        for i, raw in enumerate(raw_steps):
            step = _step(ck, i, raw, last_inject, path_of)
            if "inject" in raw and not isinstance(step, model.InjectStep):
                # A broken inject step: its own problems are reported; expectations
                # after it must not also claim that there is no inject step.
                last_inject = _BROKEN_INJECT
            if step is None:
                continue
            steps.append(step)
            if isinstance(step, model.InjectStep):
                last_inject = step

    # ---- one arch for the whole campaign
    campaign_arch = spec.arch
    arch_source: Optional[model.InjectStep] = None
    for step in steps:
        if not isinstance(step, model.InjectStep):
            continue
        need = model.FAULT_ARCH[step.fault]
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
    campaign = model.Campaign(
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
        raise model.CampaignError(sorted(ck.problems, key=lambda pr: pr.line))
    return campaign


def _step(
    ck: _Checker,
    index: int,
    raw: Mapping[str, Any],
    last_inject: Optional[model.InjectStep],
    path_of: Callable[[Optional[str]], Optional[str]],
) -> Optional[model.Step]:
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
        repeat=ck.integer(path, raw, "repeat", lo=1, hi=model._MAX_REPEAT) or 1,
        interval=ck.seconds(path, raw, "interval", zero_ok=True) or 0.0,
        on_failure=ck.string(path, raw, "on_failure", model.ON_FAILURE),
        keys=MappingProxyType({k: ck.doc.line((*path, k)) for k in raw}),
    )
    step: Optional[model.Step]
    if kind == "inject":
        step = _inject_step(ck, path, raw, common)
    elif kind == "wait":
        _unknown_step_keys(ck, path, raw, (*_COMMON_KEYS, "wait"), "a wait step")
        seconds = ck.seconds(path, raw, "wait", zero_ok=True)
        step = None if seconds is None else model.WaitStep(**common, seconds=seconds)
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
) -> Optional[model.InjectStep]:
    fault = ck.string(path, raw, "inject", tuple(model.FAULT_ARCH))
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
        wait = model.DEFAULT_WAIT_S if raw["wait"] else None
    else:
        wait = ck.seconds(path, raw, "wait", zero_ok=False)
    dry_run = bool(ck.boolean(path, raw, "dry_run"))
    readback = "readback" not in raw or bool(ck.boolean(path, raw, "readback"))
    request: Any = None
    try:
        request = KINDS[fault].from_fields(raw)
    except fields.FieldErrors as err:
        for e in err.problems:
            text = e.render(cli=False)
            ck.problem(
                (*path, e.field) if e.field else path,
                text if e.missing else model._with_hint(e, text),
            )
        return None
    raises_mc = request.raises_exception()
    return model.InjectStep(
        **common,
        fault=fault,
        request=request,
        vcpus=vcpus,
        wait=wait,
        dry_run=dry_run,
        readback=readback,
        raises_mc=raises_mc,
    )


def _vcpus(ck: _Checker, path: Path, raw: Mapping[str, Any]) -> model.VcpuSel:
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


def _pause_step(
    ck: _Checker,
    path: Path,
    raw: Mapping[str, Any],
    common: Dict[str, Any],
    path_of: Callable[[Optional[str]], Optional[str]],
) -> Optional[model.PauseStep]:
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
    return model.PauseStep(
        **common,
        message=message,
        seconds=seconds,
        until_file=until,
        timeout=model.DEFAULT_PAUSE_TIMEOUT_S if timeout is None else timeout,
    )


#: stands for an inject step that had problems of its own
_BROKEN_INJECT = model.InjectStep(
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
    last_inject: Optional[model.InjectStep],
    path_of: Callable[[Optional[str]], Optional[str]],
) -> Optional[model.ExpectStep]:
    what = ck.string(path, raw, "expect", model.EXPECT_KINDS)
    if what is None:
        return None
    _unknown_step_keys(
        ck, path, raw, (*_COMMON_KEYS, *_EXPECT_KEYS[what]), f"an expect = {what!r} step"
    )
    timeout = ck.seconds(path, raw, "timeout", zero_ok=False)
    timeout = model.DEFAULT_TIMEOUTS[what] if timeout is None else timeout
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
        return model.ExpectStep(
            **common, expect=what, timeout=timeout, inject_step=last_inject.number
        )
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
    since = ck.string(path, raw, "since", model.SINCE_CHOICES) or "inject"
    file = path_of(ck.string(path, raw, "file"))
    if pattern is None:
        return None
    # Without file and [target] log, the log may still come from the command line:
    # run() checks that there is one.
    return model.ExpectStep(
        **common,
        expect="log",
        timeout=timeout,
        match=pattern,
        file=file,
        absent=absent,
        count=count or 1,
        since=since,
    )
