"""The wrapper every state-changing use case runs in: the per-VM lock and the audit trail.

An attempt is audited whatever happens: ``ok``, ``dry-run``, ``refused``
(stopped by validation or a safety check; nothing was sent),
``not-delivered`` (sent, but still pending at the end of ``--wait``),
``failed`` (KVM or the engine failed, or the target exited meanwhile) or
``interrupted``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from types import MappingProxyType
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, TypeVar, Union

from serrinj.errors import (
    Conflict,
    Interrupted,
    InvalidInput,
    NotDelivered,
    PermissionDenied,
    SerrinjError,
    TargetGone,
    TargetNotFound,
    Unsupported,
)
from serrinj.host import privilege
from serrinj.ops import audit, lock
from serrinj.target.attach import Target

F = TypeVar("F", bound=Callable[..., Sequence[Any]])


def _lock_wait_from_env(default: float = 10.0) -> float:
    """SERRINJ_LOCK_WAIT, or ``default`` when it is unset or not a usable number
    (the command line reports a bad value itself: --lock-wait reads the same variable)."""
    try:
        value = float(os.environ.get("SERRINJ_LOCK_WAIT", default))
    except ValueError:
        return default
    return value if value >= 0 else default  # also false for NaN


#: seconds to wait for another serrinj run on the same VM (``--lock-wait``)
LOCK_WAIT = _lock_wait_from_env()

_REFUSALS = (InvalidInput, Unsupported, Conflict, PermissionDenied, TargetNotFound)


def classify(err: BaseException) -> str:
    if isinstance(err, (KeyboardInterrupt, Interrupted)):
        return "interrupted"
    if isinstance(err, NotDelivered):
        return "not-delivered"
    if isinstance(err, TargetGone):
        # The target vanished under serrinj, maybe after a SET: never call that
        # a refusal, which promises that nothing was sent.
        return "failed"
    if isinstance(err, _REFUSALS):
        return "refused"
    return "failed"


def error_dict(err: BaseException) -> Dict[str, object]:
    if isinstance(err, SerrinjError):
        return {"kind": err.kind, "message": err.message, "exit_code": int(err.exit_code)}
    return {"kind": type(err).__name__, "message": str(err)}


def vm_dict(tgt: Target) -> Dict[str, object]:
    vm = tgt.vm
    return {"pid": vm.pid, "name": vm.name, "vmm": vm.vmm, "arch": vm.arch}


_AUDITED = "serrinj_audited"


_results: contextvars.ContextVar[Optional[List[Any]]] = contextvars.ContextVar(
    "serrinj_guarded_results", default=None
)


def results() -> List[Any]:
    """The list a guarded use case appends each vCPU's result to as it completes.

    If a later vCPU fails, the results already in it are audited as done and the
    failure is recorded against the first selected vCPU without a result.
    Outside a guarded call it is just a new list.
    """
    current = _results.get()
    return current if current is not None else []


def _vcpu_of(result: Any) -> Any:
    vid = getattr(result, "vcpu_id", None)
    as_dict = getattr(result, "as_dict", None)
    if vid is None and callable(as_dict):
        vid = as_dict().get("vcpu_id")
    return vid


def mark_audited(err: BaseException) -> None:
    """Note that ``err``'s attempt is in the audit trail (the CLI records the rest)."""
    with contextlib.suppress(AttributeError, TypeError):
        setattr(err, _AUDITED, True)


def was_audited(err: BaseException) -> bool:
    return bool(getattr(err, _AUDITED, False))


def record_refusal(
    action: str, request: Mapping[str, object], err: BaseException, tgt: Optional[Target] = None
) -> None:
    """Audit an attempt refused before a target was even resolved (bad arguments)."""
    audit.record(
        action=action,
        outcome=classify(err),
        vm=vm_dict(tgt) if tgt else None,
        request=request,
        error=error_dict(err),
    )
    mark_audited(err)


def guarded(
    action: Union[str, Callable[..., str]], describe: Callable[..., Mapping[str, object]]
) -> Callable[[F], F]:
    """Run ``fn(tgt, ...)`` under the VM lock and audit every attempt and outcome.

    ``describe(*args, **kwargs)`` (the arguments after ``tgt``) summarises the
    request for the audit record; ``action`` names it, or is called like ``describe``
    to name it.
    """

    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(tgt: Target, *args: Any, **kwargs: Any) -> Sequence[Any]:
            request = dict(describe(*args, **kwargs))
            name = action(*args, **kwargs) if callable(action) else action

            def record_done(results: Sequence[Any]) -> None:
                for res in results:
                    as_dict = getattr(res, "as_dict", None)
                    data = as_dict() if callable(as_dict) else {}
                    audit.record(
                        action=name,
                        outcome="dry-run" if data.get("dry_run") else "ok",
                        vm=vm_dict(tgt),
                        vcpu_id=data.get("vcpu_id"),
                        request=request,
                        detail={
                            k: data[k]
                            for k in (
                                "delivery",
                                "registers_restored",
                                "kill_safe",
                                "kill_safe_reason",
                                "thread_state",
                                "notes",
                            )
                            if k in data
                        },
                    )

            # the policy for callers who are not root (sudo): audited and raised here,
            # before the lock and before anything is read or sent; root reads no policy,
            # so its module (and its TOML reader) is imported only for those callers
            if privilege.current().elevated:
                from serrinj.ops import policy

                policy.enforce_guarded(name, tgt.vm, args, request)
            done: List[Any] = []
            token = _results.set(done)
            try:
                with lock.vm_lock(tgt.vm.pid, tgt.vm.starttime, tgt.vm.label, wait=LOCK_WAIT):
                    out = fn(tgt, *args, **kwargs)
            except BaseException as err:
                # internal errors too: every attempt is audited
                record_done(done)
                finished = {_vcpu_of(r) for r in done}
                pending = [v for v in tgt.vcpu_ids if v not in finished]
                audit.record(
                    action=name,
                    outcome=classify(err),
                    vm=vm_dict(tgt),
                    vcpu_id=pending[0] if len(pending) == 1 or done else None,
                    request={**request, "vcpus": list(tgt.vcpu_ids)},
                    error=error_dict(err),
                )
                mark_audited(err)
                raise
            finally:
                _results.reset(token)
            record_done(out)
            return out

        return wrapper  # type: ignore[return-value]

    return deco


#: injecting commands -> their audit action; the use cases audit every attempt that
#: reaches them, and the command line the ones refused before (bad arguments, no VM
#: found, no permission)
_AUDITED_COMMANDS: Mapping[str, str] = MappingProxyType(
    {
        "inject": "inject-serror",
        "mce": "inject-mce",
        "nmi": "inject-nmi",
        "events load": "events-load",
        "run": "campaign-run",
    }
)


def command_action(command: str, argv: Sequence[str]) -> Optional[str]:
    """The audit action of a command line refused before its use case ran, or ``None``
    when it would inject nothing (``run --check-only``, or not an injecting command)."""
    action = _AUDITED_COMMANDS.get(command)
    if action == "inject-serror" and flag_in(argv, "--ext-dabt"):
        return "inject-ext-dabt"
    if action == "campaign-run" and flag_in(argv, "--check-only"):
        return None  # checking a file injects nothing
    return action


def flag_in(argv: Sequence[str], flag: str) -> bool:
    """Whether ``flag`` is among the options of ``argv`` (before any ``--``)."""
    for a in argv:
        if a == "--":
            return False
        if a == flag:
            return True
    return False
