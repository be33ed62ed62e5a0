"""Cheap populations for the scale figures: sleeping processes and tiny real KVM VMs.

One *crowd* is a bare ``python -I -S`` parent that forks ``n`` children and
prints their pids, one a line, then ``ready``. Each child either sleeps
(``sleep``) or is a minimal one-thread VMM (``kvm``): it creates a real KVM
VM with an in-kernel irqchip and one vCPU, puts ``hlt; jmp $-1`` at
guest-physical 0, and blocks in ``KVM_RUN`` forever (a halted vCPU with no
interrupt source never leaves the kernel). To serrinj that is a VM like any
other: a ``kvm-vm`` fd, a ``kvm-vcpu:0`` fd and a thread in
``ioctl(fd, KVM_RUN)``.

Forked from one small parent, a child costs little memory (its pages are
shared until written), so 2,000 of them fit anywhere. Every child asks the
kernel to kill it when the crowd's parent dies (``PR_SET_PDEATHSIG``), and
:meth:`Crowd.stop` ends the children and the parent by their pids, so
nothing outlives the benchmark, even on failure.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from typing import List, Optional, Sequence

__all__ = ["Crowd", "in_kvm_run"]

#: argv[1] = "sleep" | "kvm", argv[2] = n
CROWD_SCRIPT = r"""
import ctypes, fcntl, mmap, os, signal, struct, sys
kind, n = sys.argv[1], int(sys.argv[2])
libc = ctypes.CDLL(None, use_errno=True)
parent = os.getpid()
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the children

def kvm_child():
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    vm = fcntl.ioctl(kvm, 0xAE01, 0)                     # KVM_CREATE_VM
    fcntl.ioctl(vm, 0xAE60, 0)                           # KVM_CREATE_IRQCHIP
    ram = mmap.mmap(-1, 0x1000)
    ram[0:3] = b"\xf4\xeb\xfd"                           # hlt; jmp $-1
    addr = ctypes.addressof(ctypes.c_char.from_buffer(ram))
    region = struct.pack("<IIQQQ", 0, 0, 0, 0x1000, addr)
    fcntl.ioctl(vm, 0x4020AE46, region)                  # KVM_SET_USER_MEMORY_REGION
    vcpu = fcntl.ioctl(vm, 0xAE41, 0)                    # KVM_CREATE_VCPU 0
    sregs = bytearray(312)
    fcntl.ioctl(vcpu, 0x8138AE83, sregs)                 # KVM_GET_SREGS
    struct.pack_into("<Q", sregs, 0, 0)                  # cs.base = 0
    struct.pack_into("<H", sregs, 12, 0)                 # cs.selector = 0
    fcntl.ioctl(vcpu, 0x4138AE84, bytes(sregs))          # KVM_SET_SREGS
    regs = bytearray(144)
    struct.pack_into("<Q", regs, 16 * 8, 0)              # rip
    struct.pack_into("<Q", regs, 17 * 8, 2)              # rflags
    fcntl.ioctl(vcpu, 0x4090AE82, bytes(regs))           # KVM_SET_REGS
    size = fcntl.ioctl(kvm, 0xAE04, 0)                   # KVM_GET_VCPU_MMAP_SIZE
    run = mmap.mmap(vcpu, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    while True:
        fcntl.ioctl(vcpu, 0xAE80, 0)                     # KVM_RUN: halts in the kernel

out = []
for _ in range(n):
    pid = os.fork()
    if pid == 0:
        try:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)       # PR_SET_PDEATHSIG
            if os.getppid() != parent:
                os._exit(0)
            if kind == "kvm":
                kvm_child()
            while True:
                signal.pause()
        finally:
            os._exit(1)
    out.append(str(pid))
sys.stdout.write("\n".join(out) + "\nready\n")
sys.stdout.flush()
sys.stdin.read()  # until the bench closes stdin (or dies)
for pid in out:
    try:
        os.kill(int(pid), signal.SIGKILL)
    except OSError:
        pass
"""


def in_kvm_run(pid: int) -> bool:
    """Whether ``pid``'s (only) thread is blocked in ``ioctl(fd, KVM_RUN)``."""
    try:
        with open(f"/proc/{pid}/syscall", encoding="ascii") as f:
            fields = f.read().split()
    except OSError:
        return False
    return len(fields) > 2 and fields[0] == "16" and int(fields[2], 16) == 0xAE80


class Crowd:
    """``n`` children of one kind, started at once and ended by pid."""

    def __init__(self, kind: str, n: int, timeout: float = 60.0) -> None:
        if kind not in ("sleep", "kvm"):
            raise ValueError(f"crowd kind {kind!r}")
        self.kind = kind
        self.pids: List[int] = []
        self._proc: Optional[subprocess.Popen[str]] = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", CROWD_SCRIPT, kind, str(n)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert self._proc.stdout is not None
            for line in self._proc.stdout:
                line = line.strip()
                if line == "ready":
                    break
                self.pids.append(int(line))
            if len(self.pids) != n:
                raise RuntimeError(f"crowd of {n} {kind}: {len(self.pids)} started")
            if kind == "kvm":
                self._wait_in_kvm_run(timeout)
        except BaseException:
            self.stop()
            raise

    @property
    def parent_pid(self) -> Optional[int]:
        return self._proc.pid if self._proc else None

    def _wait_in_kvm_run(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        waiting = list(self.pids)
        while waiting:
            waiting = [p for p in waiting if not in_kvm_run(p)]
            if waiting and time.monotonic() > deadline:
                raise RuntimeError(f"{len(waiting)} crowd VMs never entered KVM_RUN")
            if waiting:
                time.sleep(0.01)

    def stop(self) -> None:
        """Kill every child and the parent by pid, and reap the parent."""
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        for stream in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError):
                if stream is not None:
                    stream.close()

    def gone(self, timeout: float = 10.0) -> bool:
        """Whether every child has disappeared from /proc (after :meth:`stop`)."""
        deadline = time.monotonic() + timeout
        while any(os.path.exists(f"/proc/{p}") for p in self.pids):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True


def total(crowds: Sequence[Crowd]) -> int:
    return sum(len(c.pids) for c in crowds)
