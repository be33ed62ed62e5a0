"""serrinj's pytest plugin: RAS tests written in Python.

pytest loads it through the ``pytest11`` entry point of an installed serrinj
(``-p no:serrinj.pytest_plugin`` turns it off; without an installed wheel,
``-p serrinj.pytest_plugin`` turns it on). serrinj itself never imports it, so
pytest is no dependency of serrinj.

Fixtures:

``serrinj_vm``
    A :class:`serrinj.Vm` handle on the VM under test, picked with
    ``--serrinj-pid PID`` / ``--serrinj-name NAME`` or the environment
    variables ``SERRINJ_PID`` / ``SERRINJ_NAME``; the test is skipped, with
    the reason, when none is given.
``serrinj_console``
    A :class:`Console` that tails the guest's console log
    (``--serrinj-console FILE`` or ``SERRINJ_CONSOLE``): ``expect(regex,
    timeout)`` waits for a new line that matches, ``expect_not(regex,
    within)`` makes sure none does.
``serrinj_test_vm``
    serrinj's built-in test VM for the host's architecture (a minimal VMM in
    a child process whose guest reports what it observes), started for the
    test and ended after it: a :class:`TestVm`. ``@pytest.mark.serrinj_test_vm(
    vcpus=2, mode="halt")`` sets its options.

Markers:

``@pytest.mark.serrinj_needs("ras", ...)``
    Skip the test, printing why, when the host lacks a capability
    (:data:`serrinj.CAPABILITIES`: ``kvm``, ``x86_64``, ``arm64``, ``nmi``,
    ``mce``, ``serror``, ``ras``, ``ext-dabt``, ``root``).

Reports: every injection a test makes through serrinj is recorded as a
JUnit property (``serrinj.injection.N``: the kind, vCPU and syndrome), and
when a test that uses a serrinj fixture fails, its report gets the audit
records of the test's injections, the vCPUs' status read at that moment,
and the end of the console log, as sections ("serrinj audit", ...).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from typing import TYPE_CHECKING, Any, Dict, Generator, Iterator, List, Optional, Pattern, Union

import pytest

if TYPE_CHECKING:
    from serrinj.api import Injection, Vm
    from serrinj.testvm.process import TestVmProcess

__all__ = ["Console", "TestVm"]

_NEEDS = "serrinj_needs"
_TEST_VM = "serrinj_test_vm"
_STATE = pytest.StashKey["_TestState"]()


# ====================================================================== options, markers
def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("serrinj", "serrinj: RAS fault injection into KVM VMs")
    group.addoption(
        "--serrinj-pid",
        type=int,
        metavar="PID",
        help="The VMM of the VM under test (the serrinj_vm fixture); or SERRINJ_PID.",
    )
    group.addoption(
        "--serrinj-name",
        metavar="NAME",
        help="The VM under test by name (QEMU -name guest=NAME, libvirt); or SERRINJ_NAME.",
    )
    group.addoption(
        "--serrinj-console",
        metavar="FILE",
        help="The guest's console log the serrinj_console fixture reads; or SERRINJ_CONSOLE.",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{_NEEDS}(*capabilities): skip (with the reason) unless this host can do each"
        " (kvm, x86_64, arm64, nmi, mce, serror, ras, ext-dabt, root)",
    )
    config.addinivalue_line(
        "markers",
        f"{_TEST_VM}(vcpus=2, mode='halt', extra_args=()): options of the serrinj_test_vm fixture",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    from serrinj.api import capability_missing

    for marker in item.iter_markers(_NEEDS):
        for name in marker.args:
            why = capability_missing(str(name))
            if why is not None:
                pytest.skip(f"{_NEEDS}({name!r}): {why}")


# ====================================================================== per-test record
class _TestState:
    """What the serrinj fixtures of one test saw: its injections, VMs and console."""

    def __init__(self) -> None:
        self.injections: List[Injection] = []
        self.vms: List[Vm] = []
        self.consoles: List[Console] = []
        self.audit_path = ""
        self.audit_offset = 0


def _state(request: pytest.FixtureRequest) -> _TestState:
    node: pytest.Item = request.node
    state = node.stash.get(_STATE, None)
    if state is None:
        from serrinj.ops import audit

        state = _TestState()
        state.audit_path = audit.path()
        state.audit_offset = _size(state.audit_path)
        node.stash[_STATE] = state
    return state


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


@pytest.fixture
def _serrinj_recorder(
    request: pytest.FixtureRequest, record_testsuite_property: Any
) -> Generator[_TestState, None, None]:
    """Record every injection the test makes; they become JUnit properties at the end.

    With ``junit_family = xunit1`` (or ``legacy``) each is a property of the
    test case (``record_property``). pytest's default family, xunit2, like the
    Jenkins schema, has no test-case properties, so there they are properties
    of the test suite, named after the test.
    """
    from serrinj import api

    state = _state(request)
    if request.config.getini("junit_family") in ("xunit1", "legacy"):
        record_property = request.getfixturevalue("record_property")
        prefix = ""
    else:
        record_property = record_testsuite_property
        prefix = f"{request.node.nodeid} "
    with api._observe(state.injections.append):
        yield state
    for n, inj in enumerate(state.injections, start=1):
        record_property(f"{prefix}serrinj.injection.{n}", describe_injection(inj))


def describe_injection(inj: Injection) -> str:
    """One line for a JUnit property: the kind, where, the syndrome, and the delivery."""
    req = inj.request
    where = f"vm pid {inj.vm_pid} vcpu {inj.vcpu_id}"
    if inj.kind == "serror":
        esr = req.get("esr")
        what = f"serror esr={esr:#x}" if isinstance(esr, int) else "serror esr=none (KVM's own)"
    elif inj.kind == "mce":
        what = (
            f"mce bank={req.get('bank')} status={_hex(req.get('status'))}"
            f" addr={_hex(req.get('addr'))} misc={_hex(req.get('misc'))}"
            f" mcg_status={_hex(req.get('mcg_status'))}"
        )
    else:
        what = inj.kind
    if inj.dry_run:
        outcome = "dry run, nothing sent"
    elif inj.delivery is None:
        outcome = "sent"
    elif inj.delivery.delivered:
        latency = inj.delivery.latency_s
        outcome = "delivered" + (f" after {latency * 1000:.1f} ms" if latency is not None else "")
    else:
        outcome = "not delivered"
    return f"{what} {where}: {outcome}"


def _hex(value: object) -> str:
    return f"{value:#x}" if isinstance(value, int) else str(value)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[Any, Any, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    state = item.stash.get(_STATE, None)
    if state is None or not report.failed or report.when == "teardown":
        return
    for title, text in _failure_sections(state):
        report.sections.append((title, text))


def _failure_sections(state: _TestState) -> Iterator[tuple[str, str]]:
    records = _audit_since(state.audit_path, state.audit_offset)
    if records:
        yield "serrinj audit", "\n".join(json.dumps(r, sort_keys=True) for r in records)
    elif state.injections:
        yield "serrinj audit", f"(no audit records readable in {state.audit_path})"
    for vm in state.vms:
        yield f"serrinj vCPU status: {vm.label}", _status_text(vm)
    for console in state.consoles:
        yield f"serrinj console: {console.path}", console.tail(40) or "(nothing written)"


def _audit_since(path: str, offset: int) -> List[Dict[str, Any]]:
    """The audit records this process appended to ``path`` after ``offset``."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return []
    out = []
    for line in data.decode("utf-8", "replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("serrinj_pid") == os.getpid():
            out.append(rec)
    return out


def _status_text(vm: Vm) -> str:
    from serrinj.errors import SerrinjError

    try:
        report = vm.status()
    except SerrinjError as err:
        return f"cannot read it: {err.message} ({err.kind}, exit code {int(err.exit_code)})"
    lines = []
    for v in report.vcpus:
        lines.append(
            f"vCPU {v.vcpu_id}: thread {v.tid} {v.state} mp_state={v.mp_state}"
            f" events={json.dumps(v.events, sort_keys=True, default=str)}"
        )
    return "\n".join(lines) or "(no vCPUs)"


# ====================================================================== serrinj_vm
def _option(config: pytest.Config, option: str, env: str) -> Optional[str]:
    value = config.getoption(option)
    if value is None:
        value = os.environ.get(env) or None
    return None if value is None else str(value)


@pytest.fixture
def serrinj_vm(request: pytest.FixtureRequest, _serrinj_recorder: _TestState) -> Vm:
    """The VM under test (``--serrinj-pid``/``--serrinj-name``, or SERRINJ_PID/SERRINJ_NAME)."""
    import serrinj

    pid_text = _option(request.config, "serrinj_pid", "SERRINJ_PID")
    name = _option(request.config, "serrinj_name", "SERRINJ_NAME")
    if pid_text is None and name is None:
        pytest.skip(
            "no VM under test: give --serrinj-pid PID or --serrinj-name NAME"
            " (or set SERRINJ_PID / SERRINJ_NAME)"
        )
    try:
        pid = None if pid_text is None else int(pid_text, 0)
    except ValueError:
        raise pytest.UsageError(f"SERRINJ_PID={pid_text!r} is not a process id") from None
    try:
        vm = serrinj.find(pid=pid, name=name)
    except serrinj.SerrinjError as err:
        hint = f" (hint: {err.hint})" if err.hint else ""
        pytest.fail(f"serrinj_vm: {err.message}{hint}", pytrace=False)
    _serrinj_recorder.vms.append(vm)
    return vm


# ====================================================================== serrinj_console
class Console:
    """Tails a guest's console log file: what the guest prints after the test began.

    Every method looks only at lines written after the console was opened (or
    after the last :meth:`mark`). :meth:`expect` moves past the line it
    matched, so successive calls find successive lines.
    """

    def __init__(self, path: str, poll_s: float = 0.05) -> None:
        self.path = path
        self.poll_s = poll_s
        self._start = _size(path)
        self._pos = self._start
        self._lines: List[str] = []  # complete lines from _start
        self._read_to = self._start
        self._partial = b""
        self._cursor = 0  # index in _lines where expect() continues

    def _refresh(self) -> None:
        size = _size(self.path)
        if size < self._read_to:  # the file was truncated or replaced: start over
            self._start = self._read_to = 0
            self._lines, self._partial, self._cursor = [], b"", 0
        if size == self._read_to:
            return
        with open(self.path, "rb") as f:
            f.seek(self._read_to)
            data = f.read(size - self._read_to)
        self._read_to += len(data)
        chunks = (self._partial + data).split(b"\n")
        self._partial = chunks.pop()
        self._lines.extend(c.decode("utf-8", "replace").rstrip("\r") for c in chunks)

    def lines(self) -> List[str]:
        """Every complete line written since the console was opened."""
        self._refresh()
        return list(self._lines)

    def mark(self) -> None:
        """Forget what was written so far: later calls look only at newer lines."""
        self._refresh()
        self._cursor = len(self._lines)

    def tail(self, n: int = 20) -> str:
        """The last ``n`` lines (the line being written included), as text."""
        self._refresh()
        rest = [self._partial.decode("utf-8", "replace")] if self._partial else []
        return "\n".join((self._lines + rest)[-n:])

    def expect(self, regex: Union[str, Pattern[str]], timeout: float = 10.0) -> re.Match[str]:
        """Wait up to ``timeout`` seconds for a new line matching ``regex`` (``re.search``).

        Returns the match; fails the test, with the end of the log, if no line matched.
        """
        pattern = re.compile(regex) if isinstance(regex, str) else regex
        deadline = time.monotonic() + timeout
        while True:
            self._refresh()
            while self._cursor < len(self._lines):
                line = self._lines[self._cursor]
                self._cursor += 1
                m = pattern.search(line)
                if m is not None:
                    return m
            if time.monotonic() >= deadline:
                pytest.fail(
                    f"no line of {self.path} matched /{pattern.pattern}/ within {timeout:g} s;"
                    f" its last lines:\n{self.tail(15)}",
                    pytrace=False,
                )
            time.sleep(self.poll_s)

    def expect_not(self, regex: Union[str, Pattern[str]], within: float = 2.0) -> None:
        """Make sure no new line matches ``regex`` for ``within`` seconds (e.g. no panic).

        Fails the test at the first matching line. The lines it read stay
        available to a later :meth:`expect`.
        """
        pattern = re.compile(regex) if isinstance(regex, str) else regex
        deadline = time.monotonic() + within
        index = self._cursor
        while True:
            self._refresh()
            for line in self._lines[index:]:
                if pattern.search(line):
                    pytest.fail(
                        f"{self.path}: a line matched /{pattern.pattern}/ (within {within:g} s):"
                        f" {line}",
                        pytrace=False,
                    )
            index = len(self._lines)
            if time.monotonic() >= deadline:
                return
            time.sleep(self.poll_s)


@pytest.fixture
def serrinj_console(request: pytest.FixtureRequest, _serrinj_recorder: _TestState) -> Console:
    """The guest's console log (``--serrinj-console FILE`` or SERRINJ_CONSOLE), from now on."""
    path = _option(request.config, "serrinj_console", "SERRINJ_CONSOLE")
    if path is None:
        pytest.skip("no console log: give --serrinj-console FILE (or set SERRINJ_CONSOLE)")
    if not os.path.exists(path):
        pytest.fail(f"the console log {path} does not exist", pytrace=False)
    console = Console(path)
    _serrinj_recorder.consoles.append(console)
    return console


# ====================================================================== serrinj_test_vm
class TestVm:
    """serrinj's built-in test VM, running for one test.

    ``vm`` is the :class:`serrinj.Vm` handle to inject with; ``process`` the
    child process, whose guest reports what it observed as JSON events
    (``{"event": "nmi", "vcpu": 1, ...}``): :meth:`wait_event` waits for one.
    """

    __test__ = False  # not a test class, despite the name

    def __init__(self, process: TestVmProcess, vm: Vm) -> None:
        self.process = process
        self.vm = vm

    @property
    def pid(self) -> int:
        return self.process.pid

    def mark(self) -> int:
        """The number of guest events so far, for ``wait_event(..., since=mark)``."""
        return self.process.mark()

    def wait_event(
        self,
        event: str,
        *,
        vcpu: Optional[int] = None,
        timeout: float = 10.0,
        since: int = 0,
    ) -> Dict[str, Any]:
        """The first guest event named ``event`` (on ``vcpu``) at index >= ``since``."""
        from serrinj.testvm.process import TestVmError

        try:
            return self.process.wait_event(
                lambda e: e.get("event") == event and (vcpu is None or e.get("vcpu") == vcpu),
                timeout,
                since,
            )
        except TestVmError as err:
            pytest.fail(f"the test VM's guest reported no {event!r} event: {err}", pytrace=False)

    def events(self, event: Optional[str] = None) -> List[Dict[str, Any]]:
        """Every guest event so far (only those named ``event`` when given)."""
        return [e for e in self.process.events_seen if event is None or e.get("event") == event]


@pytest.fixture
def serrinj_test_vm(
    request: pytest.FixtureRequest, _serrinj_recorder: _TestState
) -> Generator[TestVm, None, None]:
    """The built-in test VM for this host's architecture, ended (by its pid) after the test."""
    import serrinj
    from serrinj.host.kvmcaps import machine
    from serrinj.testvm.process import TestVmError, TestVmProcess

    why = serrinj.capability_missing("kvm")
    if why is not None:
        pytest.skip(f"serrinj_test_vm: {why}")
    marker = request.node.get_closest_marker(_TEST_VM)
    opts: Dict[str, Any] = dict(marker.kwargs) if marker is not None else {}
    arch = {"x86_64": "x86_64", "aarch64": "arm64"}.get(machine())
    if arch is None:
        pytest.skip(f"serrinj_test_vm: the test VM runs on x86_64 and arm64, not {machine()}")
    try:
        process = TestVmProcess.start(
            arch=arch,
            vcpus=int(opts.get("vcpus", 2)),
            mode=str(opts.get("mode", "halt")),
            extra_args=tuple(opts.get("extra_args", ())),
        )
    except TestVmError as err:
        pytest.fail(f"the test VM did not start: {err}", pytrace=False)
    with contextlib.ExitStack() as stack:
        stack.callback(process.stop)
        vm = serrinj.find(pid=process.pid)
        _serrinj_recorder.vms.append(vm)
        yield TestVm(process, vm)
