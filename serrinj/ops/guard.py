"""The wrapper every state-changing use case runs in: the per-VM lock and the audit trail.

An attempt is audited whatever happens: ``ok``, ``dry-run``, ``refused``
(stopped by validation or a safety check; nothing was sent),
``not-delivered`` (sent, but still pending at the end of ``--wait``),
``failed`` (KVM or the engine failed, or the target exited meanwhile) or
``interrupted``.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, TypeVar

from serrinj import audit
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
from serrinj.ops import lock
from serrinj.ops.target import Target

F = TypeVar("F", bound=Callable[..., Sequence[Any]])

#: seconds to wait for another serrinj run on the same VM (``--lock-wait``)
LOCK_WAIT = float(os.environ.get("SERRINJ_LOCK_WAIT", "10"))

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


def guarded(action: str, describe: Callable[..., Mapping[str, object]]) -> Callable[[F], F]:
    """Run ``fn(tgt, ...)`` under the VM lock and audit every attempt and outcome.

    ``describe(*args, **kwargs)`` (the arguments after ``tgt``) summarises the
    request for the audit record.
    """

    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(tgt: Target, *args: Any, **kwargs: Any) -> Sequence[Any]:
            request = dict(describe(*args, **kwargs))
            try:
                with lock.vm_lock(tgt.vm.pid, tgt.vm.starttime, tgt.vm.label, wait=LOCK_WAIT):
                    results = fn(tgt, *args, **kwargs)
            except (SerrinjError, KeyboardInterrupt) as err:
                audit.record(
                    action=action,
                    outcome=classify(err),
                    vm=vm_dict(tgt),
                    vcpu_id=tgt.vcpu_ids[0] if len(tgt.vcpu_ids) == 1 else None,
                    request={**request, "vcpus": list(tgt.vcpu_ids)},
                    error=error_dict(err),
                )
                raise
            for res in results:
                as_dict = getattr(res, "as_dict", None)
                data = as_dict() if callable(as_dict) else {}
                audit.record(
                    action=action,
                    outcome="dry-run" if data.get("dry_run") else "ok",
                    vm=vm_dict(tgt),
                    vcpu_id=data.get("vcpu_id"),
                    request=request,
                    detail={
                        k: data[k]
                        for k in ("delivery", "registers_restored", "thread_state", "notes")
                        if k in data
                    },
                )
            return results

        return wrapper  # type: ignore[return-value]

    return deco
