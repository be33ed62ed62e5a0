"""arm64 external data abort, aimed at the vCPU's next MMIO exit.

KVM uses the fault address of the last exit, so the abort is only meaningful
directly after a KVM_EXIT_MMIO (api.rst calls anything else a programming error).
serrinj therefore lets the vCPU thread run under syscall tracing until its KVM_RUN
returns with an MMIO exit, and injects there, before the VMM completes the access.
KVM_GET_VCPU_EVENTS never shows the abort pending, so it cannot be read back: this
fault has its own sequence instead of the per-vCPU loop.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Tuple, cast

from serrinj.errors import InvalidInput, NotDelivered, Unsupported
from serrinj.faults.base import Fault, Injection, Job, timings
from serrinj.faults.fields import Fields
from serrinj.host import procfs
from serrinj.host.kvmcaps import HostCaps
from serrinj.kvm import api
from serrinj.kvm.arch import Arch
from serrinj.target import attach as target
from serrinj.vcpu.arm64 import Arm64Vcpu

#: how long to wait for the vCPU's next MMIO exit by default
DEFAULT_MMIO_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ExtDabt(Fault):
    """``mmio_timeout``: how long to wait for the vCPU's next MMIO exit; ``mmio_addr``:
    only an exit at this guest-physical address."""

    kind: ClassVar[str] = "ext-dabt"
    arch: ClassVar[Arch] = Arch.AARCH64
    requests: ClassVar[Tuple[int, ...]] = (api.KVM_SET_VCPU_EVENTS,)
    fields: ClassVar[Tuple[str, ...]] = ("mmio_addr", "mmio_timeout")
    title: ClassVar[str] = "an external data abort"

    mmio_timeout: float = DEFAULT_MMIO_TIMEOUT_S
    mmio_addr: Optional[int] = None

    @classmethod
    def from_fields(cls, data: Mapping[str, Any]) -> ExtDabt:
        f = Fields(cls.kind, data)
        timeout = f.seconds("mmio_timeout")
        addr = f.number("mmio_addr")
        f.done()
        return cls(DEFAULT_MMIO_TIMEOUT_S if timeout is None else timeout, addr)

    def check(self, caps: HostCaps) -> None:
        if not caps.ext_dabt:
            raise Unsupported(
                "this host cannot inject external data aborts: KVM_CAP_ARM_INJECT_EXT_DABT is 0"
            )

    def validate(self, wait: Optional[float] = None) -> None:
        """Refuse a request that cannot be carried out as asked.

        ``wait`` (delivery confirmation) is refused: KVM_GET_VCPU_EVENTS never
        shows a pending external data abort (BRIEF section 2), so nothing could
        tell whether the guest took it. The wait the injection does have, for the
        MMIO exit the abort is aimed at, is bounded by ``mmio_timeout``.
        """
        if wait is not None:
            raise InvalidInput(
                "--wait does not apply to --ext-dabt: KVM never reports an external data abort"
                " as pending, so its delivery cannot be confirmed; nothing was sent",
                hint="leave out --wait; --mmio-timeout bounds the wait for the MMIO exit, and"
                " the guest takes the abort when its vCPU next enters the guest",
            )
        if not self.mmio_timeout > 0:
            raise InvalidInput("--mmio-timeout must be positive")

    def audit(self) -> Dict[str, object]:
        return {"mmio_addr": self.mmio_addr, "mmio_timeout": self.mmio_timeout}

    def request(self) -> Dict[str, object]:
        return self.audit()

    def severity(self) -> str:
        return "fatal"

    def inject_each(self, job: Job, out: List[Injection]) -> List[Injection]:
        """``dry_run`` stops after the checks: the thread is not traced at all."""
        tgt, dry_run = job.tgt, job.dry_run
        if len(tgt.vcpu_ids) != 1:
            raise InvalidInput("--ext-dabt acts on one vCPU; choose it with --vcpu")
        vm = target.ensure_mapped(tgt.vm, tgt.vcpu_ids)
        vid = tgt.vcpu_ids[0]
        v = vm.vcpu(vid)
        run_addr = _kvm_run_address(vm.pid, vid)
        if dry_run:
            assert v.thread is not None
            out.append(self._injection(vm, vid, v.thread.tid, "not-attached", {}, dry_run=True))
            return out
        with target.attach(vm, vid, self.requests) as (vc, rt):
            seen: Dict[str, object] = {}

            def is_mmio(fd: int) -> bool:
                if fd not in v.fds:
                    return False
                run = rt.read_memory(run_addr, 64)
                if api.exit_reason_of(run) != api.KVM_EXIT_MMIO:
                    return False
                mmio = api.ExitMmio.unpack_from(run)
                if self.mmio_addr is not None and mmio.phys_addr != self.mmio_addr:
                    return False
                seen.update(phys_addr=mmio.phys_addr, is_write=mmio.is_write, len=mmio.length)
                return True

            fd = rt.step_to_kvm_run_exit(is_mmio, self.mmio_timeout)
            if fd is None:
                raise NotDelivered(
                    f"vCPU {vid} made no MMIO exit within {self.mmio_timeout:g} s;"
                    " nothing was sent",
                    hint="an external data abort needs a guest access to an emulated (MMIO)"
                    " address right before it; KVM uses that access's fault address",
                )
            cast(Arm64Vcpu, vc).inject_ext_dabt()  # an arm64 VM: the arch was checked
        inj = self._injection(vm, vid, rt.tid, "mmio-exit", {"mmio_exit": seen})
        out.append(
            replace(
                inj,
                registers_restored=bool(rt.verified),
                kill_safe=rt.kill_safe,
                kill_safe_reason=rt.kill_safe_reason,
                timings_us=timings(rt),
            )
        )
        return out

    def _injection(
        self,
        vm: Any,
        vid: int,
        tid: int,
        state: str,
        before: Dict[str, object],
        dry_run: bool = False,
    ) -> Injection:
        return Injection(
            kind=self.kind,
            vm_pid=vm.pid,
            vm_name=vm.name,
            vcpu_id=vid,
            tid=tid,
            thread_state=state,
            request=self.request(),
            before=before,
            after={},
            dry_run=dry_run,
        )


def _kvm_run_address(pid: int, vcpu_id: int) -> int:
    for m in procfs.maps(pid):
        if m.path == f"anon_inode:kvm-vcpu:{vcpu_id}" and m.offset == 0:
            return m.start
    raise Unsupported(f"the VMM has not mapped vCPU {vcpu_id}'s kvm_run page")
