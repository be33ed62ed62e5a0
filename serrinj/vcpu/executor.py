"""The seam between "what ioctl to issue" and "which process issues it".

KVM only accepts a vCPU ioctl from a thread of the process that created the
VM (BRIEF section 1). An :class:`Executor` hides where the call runs:

- :class:`LocalExecutor`  this process owns the VM (the built-in test VM, tests);
- ``serrinj.remote.RemoteExecutor``  the call runs inside another process's
  thread through ptrace.

Buffers are passed as bytes, or as a *builder*: a function that receives the
address the buffer will live at (in whichever process runs the call) and
returns its bytes. Builders are needed by structs that point into themselves,
such as ``struct kvm_one_reg``.

Errors are raised as ``OSError`` with the kernel's errno; the layer above
turns them into serrinj errors.
"""

from __future__ import annotations

import os
from typing import Callable, Protocol, Union

from serrinj import _native

BufferSpec = Union[bytes, Callable[[int], bytes]]


class Executor(Protocol):
    """Issues ioctls on file descriptors of the process that owns a VM."""

    def ioctl_int(self, fd: int, request: int, arg: int = 0) -> int:
        """``ioctl(fd, request, arg)`` with an integer argument."""
        ...

    def ioctl_buf(self, fd: int, request: int, data: BufferSpec) -> bytes:
        """``ioctl(fd, request, &buf)``; returns ``buf`` after the call."""
        ...

    def read_memory(self, addr: int, size: int) -> bytes:
        """Read the owning process's memory (e.g. a vCPU's ``kvm_run`` page)."""
        ...


def materialize(data: BufferSpec, addr: int) -> bytes:
    """The bytes of ``data`` as placed at ``addr``."""
    return data(addr) if callable(data) else data


def buffer_size(data: BufferSpec) -> int:
    """The size of ``data`` (a builder is called with a dummy address to measure it)."""
    return len(materialize(data, 0))


class LocalExecutor:
    """Runs ioctls in this process; for VMs this process created."""

    def ioctl_int(self, fd: int, request: int, arg: int = 0) -> int:
        return _native.ioctl_int(fd, request, arg)

    def ioctl_buf(self, fd: int, request: int, data: BufferSpec) -> bytes:
        size = buffer_size(data)
        buf = bytearray(size)
        addr = _native.address_of(buf)
        buf[:] = materialize(data, addr)
        _native.ioctl_buf(fd, request, buf)
        return bytes(buf)

    def read_memory(self, addr: int, size: int) -> bytes:
        return _native.process_vm_read(os.getpid(), addr, size)
