"""An :class:`~serrinj.vcpu.executor.Executor` that runs ioctls inside another process."""

from __future__ import annotations

import errno
from typing import Optional

from serrinj.kvm.ioctl import _IOC_DIR, _IOC_READ
from serrinj.remote.session import RemoteThread
from serrinj.vcpu.executor import BufferSpec, buffer_size, materialize

_MAX_ERRNO = 4095


class RemoteExecutor:
    """Issues ioctls as syscalls of a seized thread of the VM's owner.

    The thread must stay attached for the executor's lifetime (the caller
    owns the :class:`RemoteThread` context).
    """

    def __init__(self, thread: RemoteThread) -> None:
        self.thread = thread

    def _ioctl(self, fd: int, request: int, arg: int) -> int:
        t = self.thread
        ret = t.syscall(t.arch.nr["ioctl"], fd, request, arg)
        if -_MAX_ERRNO <= ret < 0:
            raise OSError(
                -ret, f"remote ioctl({fd}, {request:#x}): {errno.errorcode.get(-ret, -ret)}"
            )
        return ret

    def ioctl_int(self, fd: int, request: int, arg: int = 0) -> int:
        return self._ioctl(fd, request, arg)

    def ioctl_buf(self, fd: int, request: int, data: BufferSpec) -> bytes:
        size = buffer_size(data)
        addr = self.thread.scratch(size)
        if _IOC_DIR(request) != _IOC_READ:
            # the kernel reads the argument; an _IOR call (KVM_GET_VCPU_EVENTS,
            # KVM_GET_SREGS) only writes its whole struct, so the held thread is
            # spared one write into its memory
            self.thread.write_memory(addr, materialize(data, addr))
        self._ioctl(fd, request, addr)
        return self.thread.read_memory(addr, size)

    def read_memory(self, addr: int, size: int) -> bytes:
        return self.thread.read_memory(addr, size)

    @property
    def owner_pid(self) -> Optional[int]:
        return self.thread.pid
