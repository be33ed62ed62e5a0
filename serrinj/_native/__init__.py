"""Typed wrappers around the libc calls serrinj needs.

This package is the only code that touches cffi. Every wrapper takes and
returns plain Python values, and raises ``OSError`` (with ``errno`` set) when
the call fails. Policy (what an EPERM *means*) lives in the layers above.
"""

from __future__ import annotations

import os
import platform
import struct
from typing import Optional, Tuple, Union

from serrinj._native._ffi import ffi, libc

__all__ = [
    "MAP_ANONYMOUS",
    "MAP_PRIVATE",
    "MAP_SHARED",
    "PROT_EXEC",
    "PROT_READ",
    "PROT_WRITE",
    "Memory",
    "address_of",
    "ioctl_buf",
    "ioctl_int",
    "kcmp_file",
    "mmap",
    "nanosleep",
    "pidfd_getfd",
    "pidfd_open",
    "ppoll",
    "prctl_set_name",
    "process_vm_read",
    "process_vm_write",
    "ptrace",
    "ptrace_buf",
    "ptrace_iovec",
    "seccomp_install_filter",
    "securebits",
    "set_thread_fs_creds",
    "tgkill",
    "waitpid",
]

# Syscall numbers that libc does not wrap (or wraps only in newer glibc).
# pidfd_open/pidfd_getfd use the unified numbering shared by every arch.
_SYSCALLS = {
    "x86_64": {"ptrace": 101, "kcmp": 312, "tgkill": 234, "pidfd_open": 434, "pidfd_getfd": 438},
    "aarch64": {"ptrace": 117, "kcmp": 272, "tgkill": 131, "pidfd_open": 434, "pidfd_getfd": 438},
}
# The raw ppoll and relative nanosleep, which the test VM blocks in (glibc's
# poll() and sleep functions use poll and clock_nanosleep instead).
_SYSCALLS["x86_64"].update(ppoll=271, nanosleep=35)
_SYSCALLS["aarch64"].update(ppoll=73, nanosleep=101)
# The raw credential calls: the kernel keeps credentials per thread, and only
# glibc's wrappers of setgroups (and setuid & co.) broadcast a change to every
# thread of the process; these raw calls change the calling thread alone.
_SYSCALLS["x86_64"].update(setgroups=116, getgroups=115, setfsuid=122, setfsgid=123)
_SYSCALLS["aarch64"].update(setgroups=159, getgroups=158, setfsuid=151, setfsgid=152)
try:
    _NR = _SYSCALLS[platform.machine()]
except KeyError:  # pragma: no cover - only x86_64 and aarch64 hosts are supported
    _NR = _SYSCALLS["x86_64"]

PROT_READ = 0x1
PROT_WRITE = 0x2
PROT_EXEC = 0x4
MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_ANONYMOUS = 0x20
_MAP_FAILED = (1 << 64) - 1

_KCMP_FILE = 0
_PR_SET_NAME = 15
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_PR_GET_SECUREBITS = 27
_SECCOMP_MODE_FILTER = 2


def _raise(what: str) -> None:
    err = ffi.errno
    raise OSError(err, f"{what}: {os.strerror(err)}")


# The C types of the calls made while a VMM thread is held, resolved once: a type
# given as a string is looked up again on every call.
_LONG = ffi.typeof("long")
_ULONG = ffi.typeof("unsigned long")
_VOID_P = ffi.typeof("void *")
_UINTPTR = ffi.typeof("uintptr_t")
_IOVEC_P = ffi.typeof("struct iovec *")
_INT_P = ffi.typeof("int *")


def _long(value: int) -> object:
    return ffi.cast(_LONG, value)


def ioctl_int(fd: int, request: int, arg: int = 0) -> int:
    """``ioctl(fd, request, arg)`` with an integer argument; returns the result."""
    ret = libc.ioctl(fd, ffi.cast(_ULONG, request), _long(arg))
    if ret < 0:
        _raise(f"ioctl({fd}, {request:#x})")
    return int(ret)


def ioctl_buf(fd: int, request: int, buf: bytearray) -> int:
    """``ioctl(fd, request, &buf)``; ``buf`` is updated in place with what the kernel wrote."""
    cbuf = ffi.from_buffer(buf)
    ret = libc.ioctl(fd, ffi.cast(_ULONG, request), ffi.cast(_VOID_P, cbuf))
    if ret < 0:
        _raise(f"ioctl({fd}, {request:#x})")
    return int(ret)


_PTRACE_NR = _long(_NR["ptrace"])


def ptrace(request: int, tid: int, addr: int = 0, data: int = 0) -> int:
    """The raw ptrace syscall (not glibc's PEEK-rewriting wrapper)."""
    ret = libc.syscall(_PTRACE_NR, _long(request), _long(tid), _long(addr), _long(data))
    if ret < 0:
        _raise(f"ptrace({request:#x}, {tid})")
    return int(ret)


def ptrace_buf(request: int, tid: int, addr: int, buf: bytearray) -> int:
    """ptrace with ``data`` pointing at ``buf`` (kept alive for the call)."""
    cbuf = ffi.from_buffer(buf)
    return ptrace(request, tid, addr, int(ffi.cast(_UINTPTR, cbuf)))


def ptrace_iovec(request: int, tid: int, note: int, buf: bytearray) -> int:
    """PTRACE_GETREGSET/SETREGSET: ``data`` is a ``struct iovec`` over ``buf``.

    Returns the length the kernel left in ``iov_len`` (bytes transferred).
    """
    cbuf = ffi.from_buffer(buf)
    iov = ffi.new(_IOVEC_P)
    iov.iov_base = ffi.cast(_VOID_P, cbuf)
    iov.iov_len = len(buf)
    ptrace(request, tid, note, int(ffi.cast(_UINTPTR, iov)))
    return int(iov.iov_len)


def waitpid(pid: int, options: int) -> Tuple[int, int]:
    """``waitpid``; returns ``(pid, status)``. EINTR is retried."""
    status = ffi.new(_INT_P)
    while True:
        ret = libc.waitpid(pid, status, options)
        if ret >= 0:
            return int(ret), int(status[0])
        if ffi.errno != 4:  # EINTR
            _raise(f"waitpid({pid})")


def _vm_io(pid: int, addr: int, buf: bytearray, write: bool) -> int:
    cbuf = ffi.from_buffer(buf)
    local = ffi.new(_IOVEC_P)
    local.iov_base = ffi.cast(_VOID_P, cbuf)
    local.iov_len = len(buf)
    remote = ffi.new(_IOVEC_P)
    remote.iov_base = ffi.cast(_VOID_P, addr)
    remote.iov_len = len(buf)
    fn = libc.process_vm_writev if write else libc.process_vm_readv
    ret = fn(pid, local, 1, remote, 1, 0)
    if ret < 0:
        _raise(f"process_vm_{'writev' if write else 'readv'}({pid}, {addr:#x}, {len(buf)})")
    return int(ret)


def process_vm_read(pid: int, addr: int, size: int) -> bytes:
    """Read ``size`` bytes at ``addr`` of process ``pid``. A short read raises EFAULT."""
    buf = bytearray(size)
    got = _vm_io(pid, addr, buf, write=False)
    if got != size:
        raise OSError(14, f"process_vm_readv({pid}, {addr:#x}): short read {got}/{size}")
    return bytes(buf)


def process_vm_write(pid: int, addr: int, data: bytes) -> None:
    """Write ``data`` at ``addr`` of process ``pid``. A short write raises EFAULT."""
    buf = bytearray(data)
    put = _vm_io(pid, addr, buf, write=True)
    if put != len(data):
        raise OSError(14, f"process_vm_writev({pid}, {addr:#x}): short write {put}/{len(data)}")


def pidfd_open(pid: int) -> int:
    """A pidfd that pins ``pid`` (detects pid reuse)."""
    ret = libc.syscall(_long(_NR["pidfd_open"]), _long(pid), _long(0))
    if ret < 0:
        _raise(f"pidfd_open({pid})")
    return int(ret)


def pidfd_getfd(pidfd: int, targetfd: int) -> int:
    """Duplicate the target's fd ``targetfd`` into this process."""
    ret = libc.syscall(_long(_NR["pidfd_getfd"]), _long(pidfd), _long(targetfd), _long(0))
    if ret < 0:
        _raise(f"pidfd_getfd({pidfd}, {targetfd})")
    return int(ret)


def kcmp_file(pid1: int, fd1: int, pid2: int, fd2: int) -> int:
    """``kcmp(KCMP_FILE)``: 0 when both fds refer to the same open file."""
    ret = libc.syscall(
        _long(_NR["kcmp"]), _long(pid1), _long(pid2), _long(_KCMP_FILE), _long(fd1), _long(fd2)
    )
    if ret < 0:
        _raise(f"kcmp({pid1}:{fd1}, {pid2}:{fd2})")
    return int(ret)


def tgkill(tgid: int, tid: int, sig: int) -> None:
    """Send ``sig`` to thread ``tid`` of thread group ``tgid``."""
    ret = libc.syscall(_long(_NR["tgkill"]), _long(tgid), _long(tid), _long(sig))
    if ret < 0:
        _raise(f"tgkill({tgid}, {tid}, {sig})")


def _timespec(seconds: float) -> bytearray:
    whole = int(seconds)
    return bytearray(struct.pack("<qq", whole, int((seconds - whole) * 1e9)))


def ppoll(fd: int, events: int, timeout: Optional[float]) -> int:
    """The raw ``ppoll`` syscall on one fd (no signal mask); returns its ``revents``
    (0 on timeout). ``timeout=None`` waits for ever."""
    pfd = bytearray(struct.pack("<ihh", fd, events, 0))
    ts = _timespec(timeout) if timeout is not None else None
    ret = libc.syscall(
        _long(_NR["ppoll"]),
        _long(address_of(pfd)),
        _long(1),
        _long(address_of(ts) if ts is not None else 0),
        _long(0),
        _long(8),
    )
    if ret < 0:
        _raise(f"ppoll({fd})")
    return int(struct.unpack_from("<h", pfd, 6)[0]) if ret else 0


def nanosleep(seconds: float) -> None:
    """The raw relative ``nanosleep`` syscall (EINTR and the like raise OSError)."""
    ts = _timespec(seconds)
    ret = libc.syscall(_long(_NR["nanosleep"]), _long(address_of(ts)), _long(0))
    if ret < 0:
        _raise("nanosleep")


def prctl_set_name(name: str) -> None:
    """Name the calling thread (what /proc/PID/task/TID/comm shows, 15 bytes max)."""
    raw = name.encode()[:15]
    cname = ffi.new("char[]", raw)
    if libc.prctl(_long(_PR_SET_NAME), ffi.cast("char *", cname), _long(0), _long(0), _long(0)) < 0:
        _raise("prctl(PR_SET_NAME)")


def seccomp_install_filter(program: bytes) -> None:
    """Install a classic-BPF seccomp filter on the calling thread only.

    ``program`` is a packed array of ``struct sock_filter`` (8 bytes each).
    Sets no_new_privs first, as an unprivileged caller needs.
    """
    if len(program) % 8:
        raise ValueError("a BPF program is a whole number of 8-byte instructions")
    if libc.prctl(_long(_PR_SET_NO_NEW_PRIVS), _long(1), _long(0), _long(0), _long(0)) < 0:
        _raise("prctl(PR_SET_NO_NEW_PRIVS)")
    insns = ffi.new("struct sock_filter[]", len(program) // 8)
    ffi.memmove(insns, program, len(program))
    prog = ffi.new("struct sock_fprog *")
    prog.len = len(program) // 8
    prog.filter = insns
    ret = libc.prctl(
        _long(_PR_SET_SECCOMP),
        _long(_SECCOMP_MODE_FILTER),
        ffi.cast("struct sock_fprog *", prog),
        _long(0),
        _long(0),
    )
    if ret < 0:
        _raise("prctl(PR_SET_SECCOMP)")


def securebits() -> int:
    """The calling thread's securebits (``prctl(PR_GET_SECUREBITS)``)."""
    ret = libc.prctl(_long(_PR_GET_SECUREBITS), _long(0), _long(0), _long(0), _long(0))
    if ret < 0:
        _raise("prctl(PR_GET_SECUREBITS)")
    return int(ret)


def _thread_groups() -> Tuple[int, ...]:
    count = libc.syscall(_long(_NR["getgroups"]), _long(0), _long(0))
    if count < 0:
        _raise("getgroups")
    buf = ffi.new("unsigned int[]", max(int(count), 1))
    got = libc.syscall(_long(_NR["getgroups"]), _long(int(count)), ffi.cast("unsigned int *", buf))
    if got < 0:
        _raise("getgroups")
    return tuple(int(buf[i]) for i in range(int(got)))


def _set_thread_groups(groups: Tuple[int, ...]) -> None:
    buf = ffi.new("unsigned int[]", list(groups) or [0])
    ret = libc.syscall(_long(_NR["setgroups"]), _long(len(groups)), ffi.cast("unsigned int *", buf))
    if ret < 0:
        _raise("setgroups")


def _set_fs_id(name: str, value: int) -> None:
    # setfsuid/setfsgid return the previous id whatever happens; asking again with
    # -1 (never a valid id: nothing changes) reads the id now in force.
    libc.syscall(_long(_NR[name]), _long(value))
    now = int(libc.syscall(_long(_NR[name]), _long(-1)))
    if now != value:
        raise OSError(1, f"{name}({value}): the id is still {now}")


def set_thread_fs_creds(
    fsuid: int, fsgid: int, groups: Tuple[int, ...]
) -> Tuple[int, int, Tuple[int, ...]]:
    """Give the calling thread, and it alone, the file-system credentials
    ``fsuid``/``fsgid`` and the supplementary ``groups``; returns the previous ones.

    The kernel checks file access with these. Moving the fsuid off 0 also drops
    the file capabilities (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER...)
    from the thread's effective set, and moving it back to 0 restores them; the
    other capabilities (CAP_SYS_PTRACE) and the real and effective ids are kept.
    """
    old_groups = _thread_groups()
    old_fsuid = int(libc.syscall(_long(_NR["setfsuid"]), _long(-1)))
    old_fsgid = int(libc.syscall(_long(_NR["setfsgid"]), _long(-1)))
    if fsuid == 0:
        # going back to root: the uid first (it brings back CAP_DAC_*), then the rest
        _set_fs_id("setfsuid", fsuid)
        _set_fs_id("setfsgid", fsgid)
        _set_thread_groups(groups)
    else:
        _set_thread_groups(groups)
        _set_fs_id("setfsgid", fsgid)
        _set_fs_id("setfsuid", fsuid)
    return old_fsuid, old_fsgid, old_groups


class Memory:
    """An mmap'd region with a stable address and a writable buffer view.

    Used by the built-in test VM for guest RAM and for the vCPU's
    ``kvm_run`` page. ``fd=-1`` maps anonymous memory.
    """

    def __init__(
        self,
        size: int,
        fd: int = -1,
        prot: int = PROT_READ | PROT_WRITE,
        flags: Optional[int] = None,
    ) -> None:
        if flags is None:
            flags = MAP_SHARED if fd >= 0 else MAP_PRIVATE | MAP_ANONYMOUS
        ptr = libc.mmap(ffi.NULL, size, prot, flags, fd, 0)
        if int(ffi.cast("uintptr_t", ptr)) == _MAP_FAILED:
            _raise(f"mmap({size}, fd={fd})")
        self._ptr = ptr
        self.size = size
        self.address = int(ffi.cast("uintptr_t", ptr))
        self.view = memoryview(ffi.buffer(ptr, size))

    def close(self) -> None:
        if self._ptr is not None:
            self.view.release()
            libc.munmap(self._ptr, self.size)
            self._ptr = None

    def __enter__(self) -> Memory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def mmap(size: int, fd: int = -1) -> Memory:
    """Map ``size`` bytes (anonymous, or shared from ``fd``)."""
    return Memory(size, fd)


def address_of(buf: Union[bytearray, memoryview]) -> int:
    """The address of a writable Python buffer (valid while ``buf`` is alive and not resized)."""
    return int(ffi.cast("uintptr_t", ffi.from_buffer(buf)))
