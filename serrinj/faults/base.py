"""The interface every fault kind implements, and what an injection reports.

A fault kind is one module of this package: a frozen dataclass that *is* the
request (``SError(esr=0x1811)``), built from user input by
:meth:`Fault.from_fields`, the one parser the command line, campaign files and
the Python API share. The class says which VM arch it is for, which vCPU ioctls
it needs, how to check it against this host before the VMM is touched, how to
send it, whether it is still pending, and why it might not be delivered.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Tuple

from serrinj.errors import Unsupported
from serrinj.host.kvmcaps import HostCaps
from serrinj.kvm.arch import Arch
from serrinj.remote.session import RemoteThread
from serrinj.target import attach as target


@dataclass(frozen=True)
class Job:
    """One call of :meth:`Fault.run`: where to inject, with what this host can do, whether to
    wait for the guest to take it (seconds), and whether to stop after the checks."""

    tgt: target.Target
    caps: HostCaps
    wait: Optional[float]
    dry_run: bool
    #: read the vCPU before and after the send for the report even where the fault's
    #: checks do not need it (``False``: the thread is held for the checks and the send)
    readback: bool = True


@dataclass(frozen=True)
class Delivery:
    """The outcome of ``--wait``."""

    delivered: bool
    latency_s: Optional[float]
    polls: int
    reason: str = ""

    def as_dict(self) -> Dict[str, object]:
        return {
            "delivered": self.delivered,
            "latency_s": self.latency_s,
            "polls": self.polls,
            "reason": self.reason or None,
        }


@dataclass(frozen=True)
class Injection:
    """What was injected where, and what the vCPU looked like before and after."""

    kind: str
    vm_pid: int
    vm_name: Optional[str]
    vcpu_id: int
    tid: int
    thread_state: str
    request: Dict[str, object]
    before: Dict[str, object]
    after: Dict[str, object]
    prediction: Dict[str, object] = field(default_factory=dict)
    delivery: Optional[Delivery] = None
    registers_restored: bool = True
    #: whether the thread could have put itself back had serrinj been killed
    #: (docs/SAFETY.md); ``None`` when no thread was held
    kill_safe: Optional[bool] = None
    kill_safe_reason: str = ""
    timings_us: Dict[str, float] = field(default_factory=dict)
    #: validated and planned, but nothing was sent (``--dry-run``)
    dry_run: bool = False
    #: ``before`` and ``after`` were both read (``False`` with ``--no-readback``: what
    #: the fault's checks did not need was not read, and shows as ``{}``)
    readback: bool = True

    @property
    def delivered(self) -> Optional[bool]:
        """Whether the guest took the fault (``None`` when delivery was not waited for)."""
        return None if self.delivery is None else self.delivery.delivered

    def as_dict(self) -> Dict[str, object]:
        return {
            "kind": self.kind,
            "vm": {"pid": self.vm_pid, "name": self.vm_name},
            "vcpu_id": self.vcpu_id,
            "tid": self.tid,
            "thread_state": self.thread_state,
            "request": self.request,
            "before": self.before,
            "after": self.after,
            "prediction": self.prediction,
            "delivery": self.delivery.as_dict() if self.delivery else None,
            "registers_restored": self.registers_restored,
            "kill_safe": self.kill_safe,
            "kill_safe_reason": self.kill_safe_reason,
            "timings_us": self.timings_us,
            "dry_run": self.dry_run,
            "readback": self.readback,
        }


def timings(rt: RemoteThread) -> Dict[str, float]:
    """The engine's timings of one held thread, in microseconds."""
    return {k[: -len("_ns")]: v / 1000 for k, v in rt.timings.items()}


class Fault(abc.ABC):
    """One fault kind, and one request of it (the subclasses are frozen dataclasses)."""

    #: the name commands, campaign files and audit records use: ``serror``, ``mce``, ...
    kind: ClassVar[str]
    #: the VM architecture the fault is for
    arch: ClassVar[Arch]
    #: the vCPU ioctls sent to the VMM's thread (checked against its seccomp filter first)
    requests: ClassVar[Tuple[int, ...]]
    #: the fields :meth:`from_fields` reads (campaign keys; the command line says --like-this)
    fields: ClassVar[Tuple[str, ...]]
    #: the fault in a sentence: "an SError"
    title: ClassVar[str]

    @classmethod
    @abc.abstractmethod
    def from_fields(cls, data: Mapping[str, Any]) -> Fault:
        """The request from user input; raises :class:`~serrinj.faults.fields.FieldErrors`."""

    def validate(self, wait: Optional[float] = None) -> None:
        """Refuse a request (with ``wait``: confirm delivery) that cannot be carried out
        as asked; the first check, before the host is probed."""
        return None

    def check(self, caps: HostCaps) -> None:
        """Refuse, before the VMM is touched, what this host cannot do."""
        return None

    def audit(self) -> Dict[str, object]:
        """The request as the audit log records it."""
        return {}

    def request(self) -> Dict[str, object]:
        """The request as an :class:`Injection` shows it."""
        return {}

    def severity(self) -> str:
        """``fatal`` when a Linux guest dies of it, else ``survivable`` (for the policy)."""
        return "survivable"

    def raises_exception(self) -> bool:
        """Whether the guest takes an exception (else the fault is only logged, never pending)."""
        return True

    def label(self) -> str:
        """The request in a few words, for progress lines: ``esr 0x1811``."""
        return ""

    def run(
        self,
        tgt: target.Target,
        caps: HostCaps,
        wait: Optional[float],
        dry_run: bool,
        out: List[Injection],
        readback: bool = True,
    ) -> List[Injection]:
        """Inject into each vCPU of ``tgt``, appending each result to ``out`` as it completes
        (``readback``: see :attr:`Job.readback`)."""
        return self.inject_each(Job(tgt, caps, wait, dry_run, readback), out)

    @abc.abstractmethod
    def inject_each(self, job: Job, out: List[Injection]) -> List[Injection]:
        """:meth:`run` for one kind: inject as ``job`` says, appending to ``out``."""


def require_arch(vm_arch: str, kind: str, wanted: Arch) -> None:
    """Refuse a ``kind`` fault (for ``wanted`` VMs) on a VM of ``vm_arch``, naming the
    faults that VM can take."""
    if vm_arch == wanted:
        return
    if wanted == Arch.AARCH64:
        raise Unsupported(
            f"{kind} injection is for arm64 VMs; this VM is {vm_arch}",
            hint="on x86_64 use `serrinj mce` (machine checks) or `serrinj nmi`",
        )
    raise Unsupported(
        f"{kind} injection is for x86_64 VMs; this VM is {vm_arch}",
        hint="on arm64 use `serrinj inject` (SError) or `serrinj inject --ext-dabt`",
    )
