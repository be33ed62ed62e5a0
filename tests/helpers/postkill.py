"""Read a thread's context from outside after the tracer holding it was SIGKILLed.

A test freezes the VMM (SIGSTOP), kills serrinj at a phase, and then calls
:func:`settle` from a second, short-lived tracer: it seizes the (group-stopped)
thread and, when the thread is still on the registers serrinj borrowed, lets
it run under PTRACE_SYSCALL until the exit stop of its ``rt_sigreturn``, the
first instant it is back on its own context. There it reads the general
registers (NT_PRSTATUS), the FP/SIMD state (NT_X86_XSTATE; NT_PRFPREG and
NT_ARM_SVE on aarch64) and the blocked signals (PTRACE_GETSIGMASK), then
detaches. Built on serrinj's ptrace
primitives only (never on the engine under test).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import List

from serrinj import _native
from serrinj.remote import ptrace
from serrinj.remote.arch import Registers, host_arch

NR_RT_SIGRETURN = {"x86_64": 15, "aarch64": 139}
NT_ARM_SVE = 0x405


@dataclass(frozen=True)
class Context:
    regs: Registers
    fpstate: bytes
    sigmask: int
    #: the syscalls the thread made before it was back on its own context
    syscalls: List[int]
    #: aarch64: the NT_ARM_SVE regset (header and registers; b"" without SVE)
    sve: bytes = b""


def fp_note() -> int:
    return ptrace.NT_X86_XSTATE if host_arch().name == "x86_64" else 2  # NT_PRFPREG


def read_context(tid: int, syscalls: List[int]) -> Context:
    arch = host_arch()
    regs = Registers.unpack(arch, ptrace.get_regset(tid, ptrace.NT_PRSTATUS, arch.regs_size))
    fp = ptrace.get_regset(tid, fp_note(), 16384)
    mask = bytearray(8)
    _native.ptrace_buf(ptrace.PTRACE_GETSIGMASK, tid, 8, mask)
    sve = b""
    if arch.name == "aarch64":
        with contextlib.suppress(OSError):  # no SVE on this CPU or kernel
            sve = ptrace.get_regset(tid, NT_ARM_SVE, 16384)
    return Context(regs, fp, int.from_bytes(mask, "little"), syscalls, sve)


def _wait(tid: int, timeout: float) -> ptrace.Stop:
    stop = ptrace.wait_stop(tid, timeout)
    assert stop is not None, f"thread {tid} did not stop within {timeout} s"
    assert stop.kind is not ptrace.StopKind.EXITED, f"thread {tid} exited: {stop}"
    return stop


def wait_untraced(pid: int, tid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            if "TracerPid:\t0\n" in f.read():
                return
        assert time.monotonic() < deadline, f"thread {tid} is still traced"
        time.sleep(0.005)


def settle(pid: int, tid: int, own: Registers, timeout: float = 10.0) -> Context:
    """The thread's context once it is back on its own (see the module docstring).

    ``own``: its registers before serrinj ran. A thread whose stack pointer is
    already ``own``'s is read where it stands.
    """
    arch = host_arch()
    wait_untraced(pid, tid)
    ptrace.seize(tid)
    try:
        ptrace.interrupt(tid)
        while _wait(tid, timeout).kind is not ptrace.StopKind.EVENT_STOP:
            ptrace.cont(tid, 0)
        regs = Registers.unpack(arch, ptrace.get_regset(tid, ptrace.NT_PRSTATUS, arch.regs_size))
        if regs[arch.sp_reg] == own[arch.sp_reg]:
            return read_context(tid, [])
        sigreturn = NR_RT_SIGRETURN[arch.name]
        seen: List[int] = []
        entered = False
        deadline = time.monotonic() + timeout
        while True:
            assert time.monotonic() < deadline, f"no rt_sigreturn after {seen}"
            ptrace.resume_syscall(tid, 0)
            stop = _wait(tid, timeout)
            if stop.kind is ptrace.StopKind.SIGNAL:
                raise AssertionError(f"thread {tid} got signal {stop.signo} after {seen}")
            if stop.kind is not ptrace.StopKind.SYSCALL:
                continue
            if entered:
                return read_context(tid, seen)
            raw = ptrace.get_regset(tid, ptrace.NT_PRSTATUS, arch.regs_size)
            nr, _ = arch.entry_call(Registers.unpack(arch, raw))
            if nr == sigreturn:
                entered = True
                seen.append(nr)
            elif not seen or seen[-1] != nr:
                seen.append(nr)
    finally:
        ptrace.detach(tid, 0)
