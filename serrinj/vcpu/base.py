"""A vCPU serrinj can talk to: typed KVM vCPU ioctls over an :class:`Executor`.

This is the boundary where an ``OSError`` from KVM becomes a
:class:`~serrinj.errors.KvmRejected` (or a more specific serrinj error) that
says which vCPU, which ioctl and what the errno means there.
"""

from __future__ import annotations

import errno
import struct
from typing import Dict, Optional, Tuple, Union

from serrinj.errors import InvalidInput, KvmRejected, TargetNotFound, Unsupported
from serrinj.kvm import api
from serrinj.kvm import arm64 as kvm_arm64
from serrinj.kvm import x86_64 as kvm_x86
from serrinj.vcpu.executor import BufferSpec, Executor

Events = Union[kvm_arm64.VcpuEvents, kvm_x86.VcpuEvents]

_IOCTL_NAMES = {
    api.KVM_GET_VCPU_EVENTS: "KVM_GET_VCPU_EVENTS",
    api.KVM_SET_VCPU_EVENTS: "KVM_SET_VCPU_EVENTS",
    api.KVM_GET_ONE_REG: "KVM_GET_ONE_REG",
    api.KVM_SET_ONE_REG: "KVM_SET_ONE_REG",
    api.KVM_GET_MP_STATE: "KVM_GET_MP_STATE",
    kvm_x86.KVM_NMI: "KVM_NMI",
    kvm_x86.KVM_X86_SET_MCE: "KVM_X86_SET_MCE",
    kvm_x86.KVM_GET_MSRS: "KVM_GET_MSRS",
    kvm_x86.KVM_GET_SREGS: "KVM_GET_SREGS",
}

_ERRNO_MEANING = {
    (api.KVM_SET_VCPU_EVENTS, errno.EINVAL): (
        "KVM refused the events: on arm64 an ESR outside ISS[24:0], an ESR on a host"
        " without RAS, or non-zero padding"
    ),
    (api.KVM_GET_VCPU_EVENTS, errno.ENOEXEC): "the vCPU is not initialised yet",
    (api.KVM_SET_VCPU_EVENTS, errno.ENOEXEC): "the vCPU is not initialised yet",
    (kvm_x86.KVM_X86_SET_MCE, errno.EINVAL): (
        "KVM refused the machine check: the bank is out of range or MCi_STATUS lacks VAL"
    ),
}


class Vcpu:
    """One vCPU, reached through ``executor`` (local or remote)."""

    def __init__(self, executor: Executor, fd: int, vcpu_id: int, arch: str) -> None:
        self.executor = executor
        self.fd = fd
        self.vcpu_id = vcpu_id
        self.arch = arch

    # ------------------------------------------------------------------ plumbing
    def _fail(self, request: int, err: OSError) -> Exception:
        name = _IOCTL_NAMES.get(request, f"ioctl {request:#x}")
        if err.errno == errno.EBADF:
            return TargetNotFound(f"vCPU {self.vcpu_id}: fd {self.fd} is not open any more")
        if err.errno == errno.EIO:
            return KvmRejected(
                f"{name} on vCPU {self.vcpu_id} returned EIO: this process did not create"
                " the VM, or the VM is dead",
                err.errno,
                hint="KVM accepts vCPU ioctls only from the VM's creator; serrinj runs them"
                " inside the VMM (pass the VMM's --pid)",
            )
        meaning = _ERRNO_MEANING.get((request, err.errno or 0), "")
        code = errno.errorcode.get(err.errno or 0, str(err.errno))
        text = f"{name} on vCPU {self.vcpu_id} failed: {code}"
        return KvmRejected(f"{text} ({meaning})" if meaning else text, err.errno or 0)

    def _buf(self, request: int, data: BufferSpec) -> bytes:
        try:
            return self.executor.ioctl_buf(self.fd, request, data)
        except OSError as err:
            raise self._fail(request, err) from err

    def _int(self, request: int, arg: int = 0) -> int:
        try:
            return self.executor.ioctl_int(self.fd, request, arg)
        except OSError as err:
            raise self._fail(request, err) from err

    # ------------------------------------------------------------------ events
    def get_events(self) -> Events:
        raw = self._buf(api.KVM_GET_VCPU_EVENTS, bytes(api.SIZEOF_KVM_VCPU_EVENTS))
        if self.arch == "aarch64":
            return kvm_arm64.VcpuEvents.unpack(raw)
        return kvm_x86.VcpuEvents.unpack(raw)

    def set_events(self, events: Events) -> None:
        if (
            isinstance(events, kvm_arm64.VcpuEvents)
            and events.ext_dabt_pending
            and events.serror_pending
        ):
            # Since Linux 6.17 SET injects the abort before it validates the SError
            # fields: a refused ESR would return EINVAL with the abort delivered anyway.
            raise InvalidInput(
                f"vCPU {self.vcpu_id}: an external data abort and an SError are never sent"
                " in one KVM_SET_VCPU_EVENTS call; nothing was sent",
                hint="inject them one after the other",
            )
        self._buf(api.KVM_SET_VCPU_EVENTS, events.pack())

    def mp_state(self) -> int:
        raw = self._buf(api.KVM_GET_MP_STATE, bytes(api.SIZEOF_KVM_MP_STATE))
        return int(struct.unpack("<I", raw)[0])

    # ------------------------------------------------------------------ arm64
    def get_one_reg(self, reg_id: int) -> int:
        """A 64-bit register through KVM_GET_ONE_REG (the value lands right after the struct)."""
        self._require("aarch64", "KVM_GET_ONE_REG core registers")

        def build(addr: int) -> bytes:
            return api.one_reg(reg_id, addr + api.SIZEOF_KVM_ONE_REG) + bytes(8)

        raw = self._buf(api.KVM_GET_ONE_REG, build)
        return int(struct.unpack_from("<Q", raw, api.SIZEOF_KVM_ONE_REG)[0])

    def set_one_reg(self, reg_id: int, value: int) -> None:
        """Write a 64-bit register (KVM_SET_ONE_REG); serrinj does this only to the
        throwaway vCPU of its own probe (:mod:`serrinj.vcpu.probe`), never to a VM's."""
        self._require("aarch64", "KVM_SET_ONE_REG")

        def build(addr: int) -> bytes:
            return api.one_reg(reg_id, addr + api.SIZEOF_KVM_ONE_REG) + struct.pack("<Q", value)

        self._buf(api.KVM_SET_ONE_REG, build)

    def pstate(self) -> int:
        return self.get_one_reg(kvm_arm64.REG_PSTATE)

    def exception_state(self) -> Dict[str, int]:
        """The EL1 registers that tell which exception the guest took last and where it
        is: ESR_EL1, ELR_EL1, SPSR_EL1, FAR_EL1, VBAR_EL1, PC and PSTATE."""
        regs = (
            ("esr_el1", kvm_arm64.REG_ESR_EL1),
            ("elr_el1", kvm_arm64.REG_ELR_EL1),
            ("spsr_el1", kvm_arm64.REG_SPSR_EL1),
            ("far_el1", kvm_arm64.REG_FAR_EL1),
            ("vbar_el1", kvm_arm64.REG_VBAR_EL1),
            ("pc", kvm_arm64.REG_PC),
            ("pstate", kvm_arm64.REG_PSTATE),
        )
        return {name: self.get_one_reg(reg) for name, reg in regs}

    def inject_serror(self, esr: Optional[int]) -> None:
        """Make a virtual SError pending, with ``esr`` (ISS) or a syndrome KVM chooses."""
        self._require("aarch64", "SError injection")
        self.set_events(kvm_arm64.VcpuEvents.serror(esr))

    def inject_ext_dabt(self) -> None:
        self._require("aarch64", "external data abort injection")
        self.set_events(kvm_arm64.VcpuEvents.ext_dabt())

    # ------------------------------------------------------------------ x86_64
    def inject_nmi(self) -> None:
        """Queue an NMI (KVM_NMI adds to KVM's queue; it cannot drop a pending one)."""
        self._require("x86_64", "NMI injection")
        self._int(kvm_x86.KVM_NMI)

    def get_msrs(self, indices: Tuple[int, ...]) -> Dict[int, int]:
        """MSR values (KVM_GET_MSRS); MSRs KVM does not know are left out."""
        self._require("x86_64", "KVM_GET_MSRS")
        try:
            raw = self.executor.ioctl_buf(self.fd, kvm_x86.KVM_GET_MSRS, kvm_x86.pack_msrs(indices))
            count = len(indices)
        except OSError as err:
            raise self._fail(kvm_x86.KVM_GET_MSRS, err) from err
        return kvm_x86.unpack_msrs(raw, count)

    def get_sregs(self) -> bytes:
        self._require("x86_64", "KVM_GET_SREGS")
        return self._buf(kvm_x86.KVM_GET_SREGS, bytes(kvm_x86.SIZEOF_KVM_SREGS))

    def inject_mce(self, mce: kvm_x86.Mce) -> None:
        self._require("x86_64", "machine-check injection")
        self._buf(kvm_x86.KVM_X86_SET_MCE, mce.pack())

    def _require(self, arch: str, what: str) -> None:
        if self.arch != arch:
            raise Unsupported(f"{what} needs an {arch} vCPU; vCPU {self.vcpu_id} is {self.arch}")
