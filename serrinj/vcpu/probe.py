"""What this host's KVM does with an SError at KVM_SET_VCPU_EVENTS, found by trying it.

Kernels differ (BRIEF section 2). Up to Linux 6.16 an injected SError stays
pending (HCR_EL2.VSE) until the vCPU next runs the guest with PSTATE.A clear.
Since 6.17 KVM *commits* an SError the vCPU has unmasked into the vCPU's
registers inside KVM_SET_VCPU_EVENTS (PC at the SError vector, ESR_EL1 with
EC 0x2F), even while the VM is paused, and GET then reads nothing pending; a
masked one still waits in VSESR_EL2.

serrinj never decides this from a version number (distributions backport, and
the rework may be reverted or extended). It asks the kernel: a throwaway VM of
its own, in its own process, with one vCPU at EL1h with SErrors unmasked, gets
an SError through SET; if GET then reads nothing pending and the PC moved to the
SError vector, this kernel commits at SET. The VM is never run and is closed at
once. The answer holds until the host reboots, so it is cached per boot
(``/proc/sys/kernel/random/boot_id``) in serrinj's run directory.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from typing import Dict, Optional

from serrinj import _native
from serrinj.host import kvmcaps as host
from serrinj.host import privilege
from serrinj.kvm import api
from serrinj.kvm import arm64 as kvm_arm64
from serrinj.kvm.arch import Arch
from serrinj.vcpu.arm64 import Arm64Vcpu
from serrinj.vcpu.executor import LocalExecutor

BOOT_ID = "/proc/sys/kernel/random/boot_id"
CACHE_NAME = "kvm-serror-probe.json"
#: where the probe's vCPU is put: an arbitrary PC and vector base (the VM has no memory
#: and never runs, so only the register values matter)
PROBE_VBAR = 0x10000
PROBE_PC = 0x1000
#: EL1h, D, I and F masked, A (SError) clear
PROBE_PSTATE = kvm_arm64.PSTATE_RESET_EL1H & ~kvm_arm64.PSTATE_A
#: the SError entry for "current EL with SP_ELx" (the vCPU is at EL1h)
PROBE_VECTOR = PROBE_VBAR + 0x380


@dataclass(frozen=True)
class SErrorBehaviour:
    """Whether KVM_SET_VCPU_EVENTS commits an unmasked SError (``None``: unknown)."""

    commits_at_set: Optional[bool]
    #: what the probe saw, in words
    observed: str
    boot_id: str = ""
    cached: bool = False

    def as_dict(self) -> Dict[str, object]:
        return {
            "commits_at_set": self.commits_at_set,
            "observed": self.observed,
            "boot_id": self.boot_id or None,
            "cached": self.cached,
        }


_memo: Dict[str, SErrorBehaviour] = {}


def boot_id() -> str:
    try:
        with open(BOOT_ID, encoding="ascii") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _cache_path() -> str:
    return os.path.join(privilege.runtime_dir(), CACHE_NAME)


def _read_cache(bid: str) -> Optional[SErrorBehaviour]:
    path = _cache_path()
    try:
        st = os.stat(path)
        if st.st_uid != os.geteuid():  # only trust what this user wrote
            return None
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    if not bid or data.get("boot_id") != bid or not isinstance(data.get("commits_at_set"), bool):
        return None
    return SErrorBehaviour(data["commits_at_set"], str(data.get("observed", "")), bid, True)


def _write_cache(found: SErrorBehaviour) -> None:
    if not found.boot_id or found.commits_at_set is None:
        return
    path = _cache_path()
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(
                {
                    "boot_id": found.boot_id,
                    "commits_at_set": found.commits_at_set,
                    "observed": found.observed,
                },
                fh,
            )
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def serror_behaviour(use_cache: bool = True) -> SErrorBehaviour:
    """This host's answer (arm64 only), from the cache of this boot or a fresh probe."""
    bid = boot_id()
    if use_cache:
        if bid in _memo:
            return _memo[bid]
        cached = _read_cache(bid)
        if cached is not None:
            _memo[bid] = cached
            return cached
    found = probe_serror(bid)
    if found.commits_at_set is not None:
        _memo[bid] = found
        _write_cache(found)
    return found


def probe_serror(bid: str = "") -> SErrorBehaviour:
    """Create a throwaway one-vCPU VM, SET an SError with PSTATE.A clear, and look."""
    if host.machine() != Arch.AARCH64:
        return SErrorBehaviour(None, "not an arm64 host", bid)
    fds = []
    try:
        kvm = host.open_kvm()
        fds.append(kvm)
        vm_fd = _native.ioctl_int(kvm, api.KVM_CREATE_VM, 0)
        fds.append(vm_fd)
        ex = LocalExecutor()
        raw = ex.ioctl_buf(
            vm_fd, kvm_arm64.KVM_ARM_PREFERRED_TARGET, bytes(kvm_arm64.VcpuInit.SIZE)
        )
        init = kvm_arm64.VcpuInit.unpack(raw)
        vcpu_fd = _native.ioctl_int(vm_fd, api.KVM_CREATE_VCPU, 0)
        fds.append(vcpu_fd)
        ex.ioctl_buf(vcpu_fd, kvm_arm64.KVM_ARM_VCPU_INIT, init.pack())
        vc = Arm64Vcpu(ex, vcpu_fd, 0, Arch.AARCH64)
        vc.set_one_reg(kvm_arm64.REG_VBAR_EL1, PROBE_VBAR)
        vc.set_one_reg(kvm_arm64.REG_PC, PROBE_PC)
        vc.set_one_reg(kvm_arm64.REG_PSTATE, PROBE_PSTATE)
        vc.inject_serror(None)
        ev = vc.get_events()
        pc = vc.get_one_reg(kvm_arm64.REG_PC)
        ec = (vc.get_one_reg(kvm_arm64.REG_ESR_EL1) >> 26) & 0x3F
    except Exception as err:  # the probe is advisory: any failure means "unknown"
        return SErrorBehaviour(None, f"the probe failed: {err}", bid)
    finally:
        for fd in reversed(fds):
            os.close(fd)
    if not ev.serror_pending and pc == PROBE_VECTOR and ec == 0x2F:
        return SErrorBehaviour(
            True,
            "an unmasked SError was taken inside KVM_SET_VCPU_EVENTS (GET read nothing"
            f" pending, PC moved to the SError vector, ESR_EL1.EC {ec:#x})",
            bid,
        )
    if ev.serror_pending and pc == PROBE_PC:
        return SErrorBehaviour(
            False,
            "an unmasked SError stayed pending after KVM_SET_VCPU_EVENTS (GET read it"
            " pending, PC unchanged): the guest takes it when the vCPU next runs",
            bid,
        )
    return SErrorBehaviour(
        None,
        f"unexpected: pending={ev.serror_pending} pc={pc:#x} ESR_EL1.EC={ec:#x}",
        bid,
    )
