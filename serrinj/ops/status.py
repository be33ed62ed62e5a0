"""``serrinj status``: host capabilities and, per vCPU, its thread and decoded events."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, NamedTuple, Optional, Sequence, cast

from serrinj.codec.events import decode_events
from serrinj.host import kvmcaps as host
from serrinj.kvm import api
from serrinj.kvm.arch import Arch
from serrinj.remote.session import RemoteThread
from serrinj.target import attach as target
from serrinj.target import discover
from serrinj.target.attach import thread_state
from serrinj.vcpu.base import Vcpu

if TYPE_CHECKING:
    from serrinj.kvm import x86_64 as kvm_x86
    from serrinj.vcpu.arm64 import Arm64Vcpu

STATUS_REQUESTS_ARM64 = (api.KVM_GET_VCPU_EVENTS, api.KVM_GET_ONE_REG, api.KVM_GET_MP_STATE)
STATUS_REQUESTS_X86 = (api.KVM_GET_VCPU_EVENTS, api.KVM_GET_MP_STATE)


@dataclass(frozen=True)
class VcpuStatus:
    """One vCPU as seen at one instant."""

    vcpu_id: int
    fd: int
    tid: int
    thread_name: str
    mapped_by: str
    #: in-guest | halted | userspace | stopped
    state: str
    mp_state: Optional[str]
    events: Dict[str, object]
    seccomp_mode: int
    registers_restored: bool
    pstate: Optional[int] = None
    detail: Dict[str, object] = field(default_factory=dict)
    #: every fd of the VMM on this vCPU; the sources that agreed; the evidence that lost
    fds: Sequence[int] = ()
    sources: Sequence[str] = ()
    disagreements: Sequence[discover.Evidence] = ()

    def as_dict(self) -> Dict[str, object]:
        out: Dict[str, object] = {
            "vcpu_id": self.vcpu_id,
            "fd": self.fd,
            "fds": list(self.fds or (self.fd,)),
            "thread": {
                "tid": self.tid,
                "name": self.thread_name,
                "mapped_by": self.mapped_by,
                "sources": list(self.sources),
                "disagreements": [e.as_dict() for e in self.disagreements],
            },
            "state": self.state,
            "mp_state": self.mp_state,
            "events": self.events,
            "seccomp_mode": self.seccomp_mode,
            "registers_restored": self.registers_restored,
        }
        if self.pstate is not None:
            out["pstate"] = self.pstate
        out.update(self.detail)
        return out


class StatusReport(NamedTuple):
    """What ``status`` read: the host's capabilities, the VM, and each selected vCPU."""

    host: host.HostCaps
    vm: discover.Vm
    vcpus: Sequence[VcpuStatus]
    #: which policy applies to the caller (serrinj.ops.policy.describe)
    policy: Optional[Dict[str, object]] = None

    def as_dict(self) -> Dict[str, object]:
        out: Dict[str, object] = {
            "host": self.host.as_dict(),
            "vm": vm_dict(self.vm),
            "vcpus": [v.as_dict() for v in self.vcpus],
        }
        if self.policy is not None:
            out["policy"] = self.policy
        return out


def vm_dict(vm: discover.Vm) -> Dict[str, object]:
    return {
        "pid": vm.pid,
        "name": vm.name,
        "comm": vm.comm,
        "vmm": vm.vmm,
        "arch": vm.arch,
        "uid": vm.uid,
        "vm_fds": list(vm.vm_fds),
        "vcpus": [
            {
                "vcpu_id": v.vcpu_id,
                "fd": v.fd,
                "fds": list(v.fds),
                "tid": v.thread.tid if v.thread else None,
                "thread_name": v.thread.name if v.thread else None,
                "thread_state": v.thread.state if v.thread else None,
                "mapped_by": v.mapped_by or None,
                "sources": list(v.sources),
                "disagreements": [e.as_dict() for e in v.disagreements],
                "seccomp_mode": v.thread.seccomp_mode if v.thread else None,
            }
            for v in vm.vcpus
        ],
    }


def reconcile_state(arch: str, state: str, mp: Optional[str]) -> str:
    """Make ``state`` agree with the MP state read at the same stop.

    The thread's /proc sample is taken before the seize, so a halted x86 vCPU that a
    timer woke in between looks "halted" there while KVM_GET_MP_STATE, read at the stop,
    says "runnable". On x86_64 the MP state is the authority for a thread inside KVM_RUN.
    On arm64 KVM reports a WFI-blocked vCPU as runnable, so the thread sample decides.
    """
    if arch != Arch.X86_64 or mp is None or state not in ("halted", "in-guest"):
        return state
    return "in-guest" if mp == "runnable" else "halted"


def read_vcpu(vm: discover.Vm, vcpu: Vcpu, rt: RemoteThread) -> VcpuStatus:
    v = vm.vcpu(vcpu.vcpu_id)
    assert v.thread is not None
    events = vcpu.get_events()
    pstate = cast("Arm64Vcpu", vcpu).pstate() if vm.arch == Arch.AARCH64 else None
    try:
        mp = api.MP_STATE_NAMES.get(vcpu.mp_state())
    except Exception:
        mp = None
    detail: Dict[str, object] = {}
    if vm.arch == Arch.AARCH64:
        from serrinj.codec.events import last_exception

        detail["last_exception"] = last_exception(cast("Arm64Vcpu", vcpu).exception_state())
    if pstate is not None:
        from serrinj.kvm import arm64 as kvm_arm64

        detail["pstate_decoded"] = {
            "A": bool(pstate & kvm_arm64.PSTATE_A),
            "I": bool(pstate & kvm_arm64.PSTATE_I),
            "F": bool(pstate & kvm_arm64.PSTATE_F),
            "D": bool(pstate & kvm_arm64.PSTATE_D),
            "mode": kvm_arm64.PSTATE_MODE_NAMES.get(pstate & kvm_arm64.PSTATE_MODE_MASK, "?"),
        }
    state = reconcile_state(vm.arch, thread_state(v.thread, rt, v.fds), mp)
    return VcpuStatus(
        vcpu_id=v.vcpu_id,
        fd=vcpu.fd,
        tid=v.thread.tid,
        thread_name=v.thread.name,
        mapped_by=v.mapped_by,
        state=state,
        mp_state=mp,
        events=decode_events(vm.arch, events, pstate),
        seccomp_mode=v.thread.seccomp_mode,
        registers_restored=True,
        pstate=pstate,
        detail=detail,
        fds=v.fds,
        sources=v.sources,
        disagreements=v.disagreements,
    )


def status(
    pid: Optional[int] = None,
    name: Optional[str] = None,
    vcpu: target.VcpuSpec = None,
) -> StatusReport:
    """Host caps plus a snapshot of every selected vCPU."""
    caps = host.probe()
    return _read(caps, target.resolve(pid, name, vcpu))


def status_of(tgt: target.Target) -> StatusReport:
    """:func:`status` of a VM already found, for the vCPUs ``tgt`` selects."""
    return _read(host.probe(), tgt)


def _read(caps: host.HostCaps, tgt: target.Target) -> StatusReport:
    from serrinj.ops import policy

    policy.enforce("status", tgt.vm)
    vm = target.ensure_mapped(tgt.vm, tgt.vcpu_ids)
    requests = STATUS_REQUESTS_ARM64 if vm.arch == Arch.AARCH64 else STATUS_REQUESTS_X86
    out: List[VcpuStatus] = []
    for vid in tgt.vcpu_ids:
        with target.attach(vm, vid, requests) as (vc, rt):
            snap = read_vcpu(vm, vc, rt)
        out.append(_restored(snap, rt))
    return StatusReport(caps, vm, out, policy.describe(vm))


def _restored(snap: VcpuStatus, rt: RemoteThread) -> VcpuStatus:
    from dataclasses import replace

    safety: Dict[str, object] = {"kill_safe": bool(rt.kill_safe)}
    if rt.kill_safe_reason:
        safety["kill_safe_reason"] = rt.kill_safe_reason
    return replace(snap, registers_restored=bool(rt.verified), detail={**snap.detail, **safety})


def x86_summary(events: kvm_x86.VcpuEvents) -> Dict[str, object]:
    return events.as_dict()
