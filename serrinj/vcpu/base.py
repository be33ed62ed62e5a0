"""A vCPU serrinj can talk to: typed KVM vCPU ioctls over an :class:`Executor`.

This is the boundary where an ``OSError`` from KVM becomes a
:class:`~serrinj.errors.KvmRejected` (or a more specific serrinj error) that
says which vCPU, which ioctl and what the errno means there.
"""

from __future__ import annotations

import errno
import struct
from typing import TYPE_CHECKING, Union

from serrinj.errors import KvmRejected, TargetNotFound
from serrinj.kvm import api
from serrinj.kvm import x86_64 as kvm_x86
from serrinj.vcpu.executor import BufferSpec, Executor

if TYPE_CHECKING:
    from serrinj.kvm import arm64 as kvm_arm64

#: the vCPU events of either arch (the arm64 tables load with the arm64 vCPU class)
Events = Union["kvm_arm64.VcpuEvents", kvm_x86.VcpuEvents]

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
    """One vCPU, reached through ``executor`` (local or remote): what every arch has.

    :class:`~serrinj.vcpu.arm64.Arm64Vcpu` and :class:`~serrinj.vcpu.x86_64.X86Vcpu`
    add their arch's ioctls; :func:`serrinj.vcpu.open_vcpu` makes the right one.
    """

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
        """The vCPU's pending events (KVM_GET_VCPU_EVENTS), in this arch's struct."""
        raise NotImplementedError

    def _get_events_raw(self) -> bytes:
        return self._buf(api.KVM_GET_VCPU_EVENTS, bytes(api.SIZEOF_KVM_VCPU_EVENTS))

    def set_events(self, events: Events) -> None:
        self._buf(api.KVM_SET_VCPU_EVENTS, events.pack())

    def mp_state(self) -> int:
        raw = self._buf(api.KVM_GET_MP_STATE, bytes(api.SIZEOF_KVM_MP_STATE))
        return int(struct.unpack("<I", raw)[0])
