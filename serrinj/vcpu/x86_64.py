"""An x86_64 vCPU: its events, MSRs and special registers, and the NMI and machine
check KVM can inject."""

from __future__ import annotations

from typing import Dict, Tuple

from serrinj.kvm import x86_64 as kvm_x86
from serrinj.vcpu.base import Vcpu


class X86Vcpu(Vcpu):
    """An x86_64 vCPU."""

    def get_events(self) -> kvm_x86.VcpuEvents:
        return kvm_x86.VcpuEvents.unpack(self._get_events_raw())

    def inject_nmi(self) -> None:
        """Queue an NMI (KVM_NMI adds to KVM's queue; it cannot drop a pending one)."""
        self._int(kvm_x86.KVM_NMI)

    def get_msrs(self, indices: Tuple[int, ...]) -> Dict[int, int]:
        """MSR values (KVM_GET_MSRS); MSRs KVM does not know are left out."""
        try:
            raw = self.executor.ioctl_buf(self.fd, kvm_x86.KVM_GET_MSRS, kvm_x86.pack_msrs(indices))
            count = len(indices)
        except OSError as err:
            raise self._fail(kvm_x86.KVM_GET_MSRS, err) from err
        return kvm_x86.unpack_msrs(raw, count)

    def get_sregs(self) -> bytes:
        return self._buf(kvm_x86.KVM_GET_SREGS, bytes(kvm_x86.SIZEOF_KVM_SREGS))

    def inject_mce(self, mce: kvm_x86.Mce) -> None:
        self._buf(kvm_x86.KVM_X86_SET_MCE, mce.pack())
