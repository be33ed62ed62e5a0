"""The one per-vCPU injection loop, shared by every fault that is sent and read back.

For each selected vCPU: hold its thread, read the vCPU (:meth:`VcpuFault.read`),
let the fault refuse or predict (:meth:`VcpuFault.admit`), send it, read the vCPU
again, note where the thread was, release it; then, with ``wait``, poll until the
fault is no longer pending (the guest took it) or the timeout passes, which is then
explained from the vCPU's state. A refused request sends nothing.
"""

from __future__ import annotations

import abc
import functools
import signal
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, ClassVar, Dict, Generic, List, Optional, TypeVar, cast

from serrinj.errors import NotDelivered
from serrinj.faults.base import Delivery, Fault, Injection, Job, timings
from serrinj.host.kvmcaps import HostCaps
from serrinj.remote.session import RemoteThread
from serrinj.target import attach as target
from serrinj.target.attach import thread_state
from serrinj.vcpu.base import Vcpu

#: the vCPU class of the fault's arch
V = TypeVar("V", bound=Vcpu)

_POLL_START = 0.0005
_POLL_MAX = 0.02


@dataclass(frozen=True)
class Reading:
    """The vCPU read once: the raw structs (``raw``) and what a report shows (``shown``).

    ``show`` makes ``shown`` from ``raw`` alone, on first use: the loop reads the vCPU
    while its thread is held, and decoding waits until the thread runs again.
    """

    raw: Any
    show: Callable[[], Dict[str, object]]

    @functools.cached_property
    def shown(self) -> Dict[str, object]:
        return self.show()


def not_read() -> Reading:
    """What a report shows of a reading that was not made (``readback=False``): ``{}``."""
    return Reading(None, dict)


class VcpuFault(Fault, Generic[V]):
    """A fault sent to each selected vCPU in turn and read back; ``V`` is the vCPU class
    of its arch (:class:`~serrinj.vcpu.arm64.Arm64Vcpu` for an arm64 fault)."""

    #: whether :meth:`admit` looks at the reading before the send (else that reading
    #: only feeds the report, and ``readback=False`` skips it)
    admit_reads: ClassVar[bool] = True
    #: whether :meth:`landed` or :meth:`settled` look at the reading after the send
    #: (else ``readback=False`` skips it)
    outcome_reads: ClassVar[bool] = True

    def plan(self, caps: HostCaps) -> Any:
        """What every vCPU of one injection shares (handed to :meth:`admit`)."""
        return None

    @abc.abstractmethod
    def read(self, vc: V) -> Reading:
        """The vCPU state a report shows before and after."""

    def admit(self, vcpu_id: int, vc: V, before: Reading, plan: Any) -> Dict[str, object]:
        """The prediction for this vCPU; raises :class:`~serrinj.errors.Conflict` when the
        fault must not be sent to it as it is."""
        return {}

    @abc.abstractmethod
    def send(self, vc: V) -> None:
        """Send the fault (the vCPU's thread is held)."""

    def landed(self, vc: V, after: Reading) -> Optional[Dict[str, object]]:
        """Right after the send: what the vCPU's registers say the guest already took,
        or ``None``."""
        return None

    def settled(
        self, after: Reading, prediction: Dict[str, object], sent_after: float
    ) -> Optional[Delivery]:
        """The delivery when no poll is needed (the fault was taken at once, or raises
        nothing), or ``None``; asked only when the caller waits (``sent_after``: seconds
        from the start to the send)."""
        return None

    def taken_at_once(self, taken: Optional[Dict[str, object]], state: str) -> Optional[str]:
        """Why the fault counts as delivered at injection even without ``wait``, or ``None``."""
        return None

    @abc.abstractmethod
    def pending(self, vc: V) -> bool:
        """Whether the vCPU still has the fault pending (not taken by the guest yet)."""

    def explain(self, vc: V, rt: RemoteThread) -> str:
        """Why the vCPU has not taken the fault, from where its thread was at the last poll.

        The same facts as ``status`` shows (:func:`~serrinj.target.attach.thread_state`),
        on both architectures: a group stop (the VMM is stopped), a thread outside
        KVM_RUN, or a thread inside KVM_RUN whose guest did not run into the fault
        (halted, or not scheduled).
        """
        where = thread_state(None, rt, (vc.fd,))
        if where == "stopped":
            assert rt.first_stop is not None
            name = signal.Signals(rt.first_stop.signo).name
            return f"the VMM process is stopped ({name}); continue it with SIGCONT"
        if where == "userspace":
            return "the vCPU thread is not running the guest (VM paused or the VMM is busy)"
        return "the vCPU has not entered the guest since (halted, or not scheduled)"

    def inject_each(self, job: Job, out: List[Injection]) -> List[Injection]:
        wait, dry_run = job.wait, job.dry_run
        vm = target.ensure_mapped(job.tgt.vm, job.tgt.vcpu_ids)
        tgt = job.tgt._replace(vm=vm)
        plan = self.plan(job.caps)
        # without readback, the thread is held only for what the checks need
        read_before = job.readback or dry_run or self.admit_reads
        read_after = not dry_run and (job.readback or self.outcome_reads)
        for vid in tgt.vcpu_ids:
            t0 = time.monotonic()
            with target.attach(vm, vid, self.requests) as (any_vc, rt):
                # the VM's arch is the fault's (checked first), so attach made a V
                vc = cast(V, any_vc)
                before = self.read(vc) if read_before else not_read()
                prediction = self.admit(vid, vc, before, plan)
                if not dry_run:
                    self.send(vc)
                t_set = time.monotonic()
                after = self.read(vc) if read_after else before if dry_run else not_read()
                taken = self.landed(vc, after) if read_after else None
            # from what the stop recorded: the thread already runs again
            state = thread_state(vm.vcpu(vid).thread, rt, vm.vcpu(vid).fds)
            shown_after = dict(after.shown)
            if taken is not None:
                shown_after["last_exception"] = taken
            inj = Injection(
                kind=self.kind,
                vm_pid=vm.pid,
                vm_name=vm.name,
                vcpu_id=vid,
                tid=rt.tid,
                thread_state=state,
                request=self.request(),
                before=before.shown,
                after=shown_after,
                prediction=prediction,
                registers_restored=bool(rt.verified),
                kill_safe=rt.kill_safe,
                kill_safe_reason=rt.kill_safe_reason,
                timings_us=timings(rt),
                dry_run=dry_run,
                readback=read_before and (read_after or dry_run),
            )
            at_once = self.taken_at_once(taken, state)
            if at_once is not None:
                inj = replace(inj, delivery=Delivery(True, t_set - t0, 0, at_once))
            elif wait is not None and not dry_run:
                delivery = self.settled(after, prediction, t_set - t0)
                inj = replace(inj, delivery=delivery or self.poll(tgt, vid, wait, t0))
            out.append(_finish(inj, wait))
        return out

    def poll(self, tgt: target.Target, vcpu_id: int, timeout: float, t0: float) -> Delivery:
        """Re-read the vCPU until the fault is no longer pending or ``timeout`` passes."""
        delay = _POLL_START
        polls = 0
        while True:
            with target.attach(tgt.vm, vcpu_id, self.requests) as (any_vc, rt):
                vc = cast(V, any_vc)
                polls += 1
                still = self.pending(vc)
                now = time.monotonic()
                if not still:
                    return Delivery(True, now - t0, polls)
                if now - t0 >= timeout:
                    return Delivery(False, None, polls, self.explain(vc, rt))
            time.sleep(delay)
            delay = min(delay * 2, _POLL_MAX)


def _finish(inj: Injection, wait: Optional[float]) -> Injection:
    if wait is not None and inj.delivery is not None and not inj.delivery.delivered:
        raise NotDelivered(
            f"the {inj.kind} was still pending on vCPU {inj.vcpu_id} after {wait:g} s:"
            f" {inj.delivery.reason}",
            hint="the fault stays pending; the guest takes it when it can",
        )
    return inj
