"""ptrace requests, wait-status decoding and stop waiting (include/uapi/linux/ptrace.h).

Thin and policy-free: OSErrors pass through; the session layer decides what
they mean.
"""

from __future__ import annotations

import enum
import os
import signal
import time
from typing import NamedTuple, Optional

from serrinj import _native

PTRACE_CONT = 7
PTRACE_DETACH = 17
PTRACE_SYSCALL = 24
PTRACE_GETREGSET = 0x4204
PTRACE_SETREGSET = 0x4205
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208
PTRACE_GETSIGMASK = 0x420A
PTRACE_SECCOMP_GET_FILTER = 0x420C

PTRACE_O_TRACESYSGOOD = 0x1
PTRACE_EVENT_STOP = 128

NT_PRSTATUS = 1
NT_X86_XSTATE = 0x202
NT_ARM_SYSTEM_CALL = 0x404

__WALL = 0x40000000
WNOHANG = 1
#: how long :func:`wait_stop` polls for a stop before it starts to sleep
BUSY_POLL_S = 0.002

_SYSCALL_TRAP = signal.SIGTRAP | 0x80
_GROUP_STOP_SIGNALS = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})


class StopKind(enum.Enum):
    EVENT_STOP = "event-stop"  # PTRACE_INTERRUPT or a group stop (SEIZE semantics)
    SYSCALL = "syscall"  # syscall-entry or -exit stop (TRACESYSGOOD)
    SIGNAL = "signal"  # signal-delivery stop
    OTHER_EVENT = "other-event"
    EXITED = "exited"  # the thread is gone


class Stop(NamedTuple):
    """A decoded ``waitpid`` status."""

    kind: StopKind
    signo: int = 0
    status: int = 0

    @property
    def group_stop(self) -> bool:
        """An event stop that is the thread taking part in a group stop (SIGSTOP & co)."""
        return self.kind is StopKind.EVENT_STOP and self.signo in _GROUP_STOP_SIGNALS


def decode(status: int) -> Stop:
    if status & 0xFF != 0x7F:  # not WIFSTOPPED: WIFEXITED or WIFSIGNALED
        return Stop(StopKind.EXITED, status & 0x7F, status)
    signo = (status >> 8) & 0xFF
    event = status >> 16
    if event == PTRACE_EVENT_STOP:
        return Stop(StopKind.EVENT_STOP, signo, status)
    if event:
        return Stop(StopKind.OTHER_EVENT, signo, status)
    if signo == _SYSCALL_TRAP:
        return Stop(StopKind.SYSCALL, signo, status)
    return Stop(StopKind.SIGNAL, signo, status)


def seize(tid: int) -> None:
    _native.ptrace(PTRACE_SEIZE, tid, 0, PTRACE_O_TRACESYSGOOD)


def interrupt(tid: int) -> None:
    _native.ptrace(PTRACE_INTERRUPT, tid)


def resume_syscall(tid: int, sig: int = 0) -> None:
    _native.ptrace(PTRACE_SYSCALL, tid, 0, sig)


def cont(tid: int, sig: int = 0) -> None:
    _native.ptrace(PTRACE_CONT, tid, 0, sig)


def detach(tid: int, sig: int = 0) -> None:
    _native.ptrace(PTRACE_DETACH, tid, 0, sig)


def get_regset(tid: int, note: int, size: int) -> bytes:
    buf = bytearray(size)
    got = _native.ptrace_iovec(PTRACE_GETREGSET, tid, note, buf)
    return bytes(buf[:got])


def set_regset(tid: int, note: int, data: bytes) -> None:
    _native.ptrace_iovec(PTRACE_SETREGSET, tid, note, bytearray(data))


def seccomp_filter(tid: int, index: int) -> bytes:
    """The classic-BPF program of the thread's ``index``-th filter (0 = newest)."""
    count = _native.ptrace(PTRACE_SECCOMP_GET_FILTER, tid, index, 0)
    buf = bytearray(8 * count)
    _native.ptrace_buf(PTRACE_SECCOMP_GET_FILTER, tid, index, buf)
    return bytes(buf)


def wait_stop(tid: int, timeout: Optional[float]) -> Optional[Stop]:
    """Wait for the next stop of traced thread ``tid``; ``None`` on timeout.

    Polls with WNOHANG so that a thread that never stops (uninterruptible
    sleep) cannot hang serrinj. A prompt stop (the usual case, tens of
    microseconds) is polled for without sleeping for the first
    :data:`BUSY_POLL_S`, yielding the CPU between polls: every microsecond of
    added latency here is a microsecond the vCPU stays out of its guest, and
    even the shortest sleep overshoots by the timer slack (50 us). Only then
    does it back off with sleeps.
    """
    now = time.monotonic()
    deadline = None if timeout is None else now + timeout
    busy_until = now + BUSY_POLL_S
    delay = 0.0
    while True:
        pid, status = _native.waitpid(tid, __WALL | WNOHANG)
        if pid == tid:
            return decode(status)
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            return None
        if now < busy_until:
            # lets the tracee run first when it shares this CPU
            os.sched_yield()
            continue
        delay = min(0.002, delay * 2 if delay else 0.00002)
        time.sleep(delay)
