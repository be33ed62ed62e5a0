"""Running a checked campaign against its VM, step by step, under the VM's lock."""

from __future__ import annotations

import contextlib
import errno
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from serrinj.campaign import model
from serrinj.campaign.logwatch import _LogReader
from serrinj.campaign.results import CampaignResult, Execution, Progress, _error_dict, _now
from serrinj.campaign.schema import _arch_problems
from serrinj.errors import (
    Conflict,
    ExpectationFailed,
    FileError,
    InvalidInput,
    KvmRejected,
    NotDelivered,
    SerrinjError,
    TargetGone,
    TargetNotFound,
)

# ====================================================================== running
_LOG_POLL_S = 0.05
_VCPU_POLL_S = 0.05

EventCallback = Callable[[Progress], None]


@dataclass(frozen=True)
class _Plan:
    step: model.Step
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
    campaign: model.Campaign,
    *,
    target_override: Optional[model.TargetOverride] = None,
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
    runner = _Runner(campaign, target_override or model.TargetOverride(), dry_run, on_event)
    return runner.run()


class _Runner:
    def __init__(
        self,
        campaign: model.Campaign,
        override: model.TargetOverride,
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

    def log_file(self, step: model.ExpectStep) -> Optional[str]:
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
            if isinstance(step, model.InjectStep) and model.FAULT_ARCH[step.fault] == vm.arch:
                sel = step.vcpus
                if sel == "all":
                    vcpus_of[step.number] = ids
                elif sel is None:
                    if len(ids) != 1:
                        problems.append(
                            model.Problem(
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
                            model.Problem(
                                self.c.source,
                                step.key_line("vcpus"),
                                f"{key}.vcpus",
                                f"VM {vm.label} has no vCPU {_ids(missing)}; its vCPU ids"
                                f" are {_ids(ids)}",
                            )
                        )
                    vcpus_of[step.number] = sel
                problems.extend(self._cap_problems(step, caps, key))
            if (
                isinstance(step, model.ExpectStep)
                and step.expect == "log"
                and not self.log_file(step)
            ):
                problems.append(
                    model.Problem(
                        self.c.source,
                        step.line,
                        key,
                        "which file? give file = ... in the step, log = ... in [target],"
                        " or a log file on the command line",
                    )
                )
        if problems:
            raise model.CampaignError(sorted(problems, key=lambda p: p.line))
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
            if isinstance(step, model.ExpectStep) and step.expect == "log":
                path = self.log_file(step)
                assert path is not None
                # missing (it may appear later) or unreadable for another reason: not here
                with contextlib.suppress(FileError):
                    privilege.open_file(path, "rb", "guest log").close()
            elif isinstance(step, model.PauseStep) and step.until_file is not None:
                privilege.stat(step.until_file, "pause file")

    def _cap_problems(self, step: model.InjectStep, caps: Any, key: str) -> List[model.Problem]:
        try:
            step.request.check(caps)
        except SerrinjError as err:
            return [
                model.Problem(
                    self.c.source, step.key_line("inject"), f"{key}.inject", model._with_hint(err)
                )
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
            if isinstance(step, model.InjectStep):
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
                self.emit(_step_progress("step-started", ex, total))
                ex = self._execute(ex, step, item, first_of_step)
            except KeyboardInterrupt as err:
                ex = replace(ex, outcome="error", message="interrupted", error=_error_dict(err))
            if isinstance(step, model.InjectStep):
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
        done = _step_progress("step-finished", ex, total)
        self.emit(replace(done, outcome=ex.outcome, duration_s=ex.duration_s, message=ex.message))

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

    def _execute(self, ex: Execution, step: model.Step, item: _Plan, first: bool) -> Execution:
        t0 = time.monotonic()
        injections: List[Mapping[str, object]] = []
        detail: Dict[str, object] = {}
        try:
            if isinstance(step, model.InjectStep) and first:
                self.inject_marks = self._marks()
                self.inject_results[step.number] = []
                self.vm = self._refresh_vm()
            if isinstance(step, model.InjectStep):
                message = self._inject(step, item.vcpu, injections)
            elif self.dry_run:
                raise _StepSkipped("dry run: not run")
            elif isinstance(step, model.WaitStep):
                time.sleep(step.seconds)
                message = f"waited {step.seconds:g} s"
            elif isinstance(step, model.PauseStep):
                message = self._pause(step, detail)
            else:
                assert isinstance(step, model.ExpectStep)
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
            outcome, message, error = "failed", model._with_hint(err), _error_dict(err)
        except SerrinjError as err:
            outcome, message, error = "error", model._with_hint(err), _error_dict(err)
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
        self, step: model.InjectStep, vcpu: Optional[int], out: List[Mapping[str, object]]
    ) -> str:
        from serrinj.ops import inject
        from serrinj.target import attach as target

        assert vcpu is not None
        tgt = target.Target(self.vm, (vcpu,))
        dry = self.dry_run or step.dry_run
        res = inject.inject(tgt, step.request, step.wait, dry_run=dry, readback=step.readback)
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

    def _pause(self, step: model.PauseStep, detail: Dict[str, object]) -> str:
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
            if isinstance(step, model.ExpectStep) and step.expect == "log":
                path = self.log_file(step)
                if path is not None and path not in out:
                    out[path] = _size(path)
        return out

    def _expect_log(self, step: model.ExpectStep, detail: Dict[str, object]) -> str:
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

    def _expect_vcpus(self, step: model.ExpectStep, detail: Dict[str, object]) -> str:
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
            if isinstance(s, model.InjectStep) and s.number == step.inject_step
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


def _read_pid_file(path: str) -> int:
    from serrinj.host import privilege

    try:
        with privilege.open_file(path, "r", "pid file", encoding="utf-8") as f:
            text = f.read().strip()
    except FileError as err:
        if err.errno == errno.ENOENT:
            raise TargetNotFound(
                f"pid file {path} does not exist", hint="is the VM running?"
            ) from None
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


def _step_progress(event: str, ex: Execution, total: int) -> Progress:
    """A step's progress event, naming the execution ``ex``."""
    return Progress(
        event,
        ex.index,
        total,
        step=ex.step,
        name=ex.name,
        kind=ex.kind,
        vcpu=ex.vcpu,
        repetition=ex.repetition,
    )
