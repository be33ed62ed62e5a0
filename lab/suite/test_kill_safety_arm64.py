"""serrinj SIGKILLed at every phase of an SError injection on arm64: the VMM lives on.

The aarch64 half of tests/test_kill_safety.py. Before it borrows a register,
serrinj writes an arm64 ``rt_sigframe`` (siginfo, ucontext whose
``__reserved`` holds the thread's ``fpsimd_context`` and a null record) below
the stack pointer, and runs the ioctl through libc's ``svc #0; ret`` with x30
on the vDSO's ``__kernel_rt_sigreturn``: a thread whose tracer died restores
itself. serrinj is held at each phase by ``tests.helpers.paused_serrinj`` and
killed there; the test VM (vCPU 1 unmasked, so it takes an SError at once)
must run on, its guest clean, with 0 SErrors (killed before the injecting
ioctl) or 1 (at ``restoring``, after it). With the VMM frozen, a second
tracer lets the released thread run to the exit of its ``rt_sigreturn`` and
reads its registers, FP/SIMD state, SVE state and signal mask there.

The FP state is forced, not left to chance: with the VMM frozen and the vCPU
thread stopped at a syscall boundary (in KVM_RUN), a short-lived tracer sets
its NT_ARM_SVE regset to FPSIMD only (``fpsimd``), to live SVE state at its
vector length (``sve``: the record fits in ``__reserved``), or to live SVE
state at the CPU's largest vector length (``sve-max-vl``: 2048 bits on
``-cpu max``, the record goes behind an ``extra_context``). The live states
carry a fresh pattern in the Z bits above 127, P0-P15 and FFR, which the
thread's own syscalls would zero: only the frame's ``sve_context`` (or, with
serrinj alive, its restore) brings them back. At a syscall boundary those
bits are dead to the thread's code, so the pattern cannot disturb the VMM.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
from typing import List

import pytest

from lab.guest.testvm import heartbeat, on, serrors, start, trouble, unmask
from serrinj import _native
from serrinj.remote import RemoteThread, ptrace
from serrinj.remote import sigframe as sf
from serrinj.remote.arch import Aarch64, Registers
from tests.helpers import postkill

PHASES = ["seized", "frame-written", "borrowed", "syscall-entered", "syscall-done", "restoring"]


def _paused(phase: str, marker: str, *args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.paused_serrinj", "--pause-at", phase,
         "--marker", marker, "--", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not os.path.exists(marker):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "serrinj never reached the pause point"
        time.sleep(0.02)
    return proc


def _kill(proc: subprocess.Popen[str], marker: str) -> None:
    proc.kill()  # the serrinj this test started
    proc.communicate(timeout=30)  # reaps it and closes its pipes
    os.unlink(marker)


def _all_stopped(pid: int) -> None:
    deadline = time.monotonic() + 20
    while True:
        states: List[str] = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                raw = f.read()
            states.append(raw[raw.rindex(")") + 2])
        if all(s in "tT" for s in states):
            return
        assert time.monotonic() < deadline, states
        time.sleep(0.01)


FP_MODES = ["fpsimd", "sve", "sve-max-vl"]
SVC_0 = (0xD4000001).to_bytes(4, "little")


def _event_stop(tid: int) -> None:
    ptrace.interrupt(tid)
    while True:
        stop = ptrace.wait_stop(tid, 10)
        assert stop is not None and stop.kind is not ptrace.StopKind.EXITED, stop
        if stop.kind is ptrace.StopKind.EVENT_STOP:
            return
        ptrace.cont(tid, 0)


def _sve_image(head: sf.SveHeader, fpsimd: bytes, vl: int, live: bool) -> bytes:
    """An NT_ARM_SVE image to write: the FPSIMD view, or live SVE state at ``vl`` whose
    bits 127:0 of Z0-Z31 are the thread's V registers and the rest a fresh pattern."""
    keep = head.flags & ~sf.SVE_PT_REGS_SVE  # VL_INHERIT as the thread has it
    if not live:
        body = fpsimd[: sf.A64_USER_FPSIMD_SIZE]
        return struct.pack("<IIHHHH", 16 + len(body), 0, vl, 0, keep, 0) + body
    vq = vl // 16
    seed = os.urandom(4)
    noise = (seed * (1 + 16 * vq))[: 16 * vq]
    zregs = b"".join(fpsimd[16 * n : 16 * n + 16] + noise[16:] for n in range(32))
    pregs = (noise[::-1] * 2)[: 16 * 2 * vq]
    ffr = b"\xff" * vq + bytes(vq)  # monotonic, as FFR must be
    block = zregs + pregs + ffr
    pad = bytes(-(16 + len(block)) % 16)
    # FPSR, FPCR; PTRACE_SETREGSET takes whole 16-byte units of this regset
    tail = fpsimd[512:520] + bytes(8)
    total = 16 + len(block) + len(pad) + 8
    return (
        struct.pack("<IIHHHH", total, 0, vl, 0, keep | sf.SVE_PT_REGS_SVE, 0) + block + pad + tail
    )


def _at_syscall_boundary(pid: int, tid: int) -> bool:
    """Whether the stopped thread has run nothing since its last syscall: its pc is
    right after an ``svc #0`` (returned) or on it (rewound to run again). The
    signal path forgets the syscall number before the stop, so that is the sign."""
    arch = Aarch64()
    pc = Registers.unpack(arch, ptrace.get_regset(tid, ptrace.NT_PRSTATUS, arch.regs_size))["pc"]
    code = _native.process_vm_read(pid, pc - 4, 8)
    return SVC_0 in (code[:4], code[4:])


def _has_sve() -> bool:
    with open("/proc/cpuinfo") as f:
        return any(line.startswith("Features") and "sve" in line.split() for line in f)


#: the boot whose CPU has no RAS (cortex-a57) has no SVE either
NO_SVE = "the CPU has no SVE (the cortex-a57 boot): FPSIMD is all its FP state"


def _need_sve(fp: str) -> None:
    if fp != "fpsimd" and not _has_sve():
        pytest.skip(NO_SVE)


def _force_fp(pid: int, tid: int, mode: str) -> bool:
    """Put the (group-stopped) thread's FP state in ``mode`` from a short-lived tracer.
    False when the thread is not stopped at a syscall boundary (thaw and retry)."""
    postkill.wait_untraced(pid, tid)
    ptrace.seize(tid)
    try:
        _event_stop(tid)
        if not _at_syscall_boundary(pid, tid):
            return False
        if not _has_sve():
            assert mode == "fpsimd", mode
            return True  # FPSIMD is all the FP state there is
        head = sf.SveHeader.unpack(ptrace.get_regset(tid, sf.NT_ARM_SVE, 16))
        fpsimd = ptrace.get_regset(tid, 2, sf.A64_USER_FPSIMD_SIZE)  # NT_PRFPREG
        vl = head.max_vl if mode == "sve-max-vl" else head.vl
        image = _sve_image(head, fpsimd, vl, live=mode != "fpsimd")
        ptrace.set_regset(tid, sf.NT_ARM_SVE, image)
        got = ptrace.get_regset(tid, sf.NT_ARM_SVE, sf.SVE_PT_MAX_SIZE)
        # the read is the regset's full size (zero past the registers): compare the image's part
        same = got[8:10] == image[8:10] and got[12:14] == image[12:14]
        assert same and got[16 : len(image)] == image[16:], f"{mode}: not taken"
        return True
    finally:
        ptrace.detach(tid, 0)


def _freeze_with_fp(vm_pid: int, tid: int, mode: str) -> None:
    """SIGSTOP the VMM with the thread at a syscall boundary and its FP state in ``mode``."""
    for _ in range(50):
        os.kill(vm_pid, signal.SIGSTOP)
        _all_stopped(vm_pid)
        if _force_fp(vm_pid, tid, mode):
            return
        os.kill(vm_pid, signal.SIGCONT)
        time.sleep(0.05)
    raise AssertionError("the vCPU thread never stopped at a syscall boundary")


def _fp_state(pid: int, tid: int) -> str:
    """What the engine finds in the (running) thread's FP state at one stop."""
    with RemoteThread(pid, tid) as t:
        problem = t._arch_problem()
        sve = t._saved_sve
    if problem:
        return f"falls back: {problem}"
    if sve:
        return f"live SVE at VL {sf.SveHeader.unpack(sve).vl * 8} bits, in the frame"
    return "FPSIMD only"


def _describe(ctx: postkill.Context) -> str:
    if not ctx.sve:
        return "no SVE"
    head = sf.SveHeader.unpack(ctx.sve)
    return f"SVE {'live' if head.live else 'off'} at VL {head.vl * 8} bits ({len(ctx.sve)} bytes)"


@pytest.mark.parametrize("phase", PHASES)
def test_sigkill_at_each_phase_leaves_the_vmm_running(phase: str) -> None:
    vm = start("spin", vcpus=2)
    try:
        unmask(vm, 1)
        state = _fp_state(vm.pid, vm.vcpu(1).tid)
        mark = vm.mark()
        with tempfile.TemporaryDirectory(prefix="kill-") as tmp:
            marker = os.path.join(tmp, "pause")
            proc = _paused(phase, marker, "inject", "--pid", str(vm.pid), "--vcpu", "1")
            _kill(proc, marker)
        postkill.wait_untraced(vm.pid, vm.vcpu(1).tid, timeout=30)
        time.sleep(0.5)
        assert vm.alive(), vm.returncode
        for v in (0, 1):
            heartbeat(vm, v)
        got = serrors(vm, 1, mark)
        want = 1 if phase == "restoring" else 0
        if want:
            vm.wait_event(on("serror", 1), 20, since=mark)
            got = serrors(vm, 1, mark)
        assert len(got) == want, got
        assert trouble(vm) == []
        print(
            f"kill -9 at {phase}: VMM alive, guest clean, {len(got)} SError(s); the vCPU"
            f" thread, sampled just before: {state}"
        )
    finally:
        vm.stop()


@pytest.mark.parametrize("fp", FP_MODES)
@pytest.mark.parametrize("phase", ["borrowed", "syscall-entered", "syscall-done", "restoring"])
def test_sigkill_the_thread_resumes_its_exact_context(phase: str, fp: str) -> None:
    _need_sve(fp)
    vm = start("spin", vcpus=2)
    tid = vm.vcpu(1).tid
    try:
        try:
            _freeze_with_fp(vm.pid, tid, fp)
            before = postkill.settle(vm.pid, tid, own=_regs(vm.pid, tid))
            live = bool(before.sve) and sf.SveHeader.unpack(before.sve).live
            assert live is (fp != "fpsimd"), _describe(before)
            if fp == "sve-max-vl":  # the sve_context record goes behind an extra_context
                vl = sf.SveHeader.unpack(before.sve).vl
                assert sf.sve_context_size(vl // 16) > 3520, _describe(before)
            with tempfile.TemporaryDirectory(prefix="kill-") as tmp:
                marker = os.path.join(tmp, "pause")
                proc = _paused(phase, marker, "inject", "--pid", str(vm.pid), "--vcpu", "1")
                _kill(proc, marker)
            after = postkill.settle(vm.pid, tid, own=before.regs, timeout=30)
        finally:
            os.kill(vm.pid, signal.SIGCONT)
        assert after.syscalls and after.syscalls[-1] == postkill.NR_RT_SIGRETURN["aarch64"]
        # at the rt_sigreturn exit stop x7 reads as the stop's entry/exit flag
        assert Aarch64().same_after_restore(before.regs, after.regs, True), before.regs.diff(
            after.regs
        )
        assert after.fpstate == before.fpstate
        assert after.sve == before.sve, f"before: {_describe(before)}; after: {_describe(after)}"
        assert after.sigmask == before.sigmask
        print(
            f"kill -9 at {phase} ({fp}): ran {after.syscalls}; registers,"
            f" {len(after.fpstate)} bytes of FPSIMD state, {_describe(after)} and the signal"
            " mask as before"
        )
        time.sleep(0.3)
        for v in (0, 1):
            heartbeat(vm, v)
        assert trouble(vm) == []
    finally:
        vm.stop()


@pytest.mark.parametrize("fp", ["sve", "sve-max-vl"])
def test_serrinj_alive_puts_live_sve_state_back(fp: str) -> None:
    """The engine's own syscall zeroes the thread's SVE bits above FPSIMD (as any
    syscall does): with serrinj alive, its restore puts the NT_ARM_SVE regset back."""
    _need_sve(fp)
    vm = start("spin", vcpus=2)
    tid = vm.vcpu(1).tid
    try:
        try:
            _freeze_with_fp(vm.pid, tid, fp)
            own = _regs(vm.pid, tid)
            before = postkill.settle(vm.pid, tid, own=own)
            assert sf.SveHeader.unpack(before.sve).live, _describe(before)
            with RemoteThread(vm.pid, tid) as t:
                assert t.syscall(t.arch.nr["getpid"]) == vm.pid
                assert t.kill_safe is True, t.kill_safe_reason
                assert t._frame is not None and len(t._frame.data) >= sf.A64_RT_SIGFRAME_SIZE
            assert t.verified is True  # registers and SVE state read back as saved
            after = postkill.settle(vm.pid, tid, own=own)
        finally:
            os.kill(vm.pid, signal.SIGCONT)
        assert after.syscalls == []
        assert Aarch64().same_after_restore(before.regs, after.regs, False)
        assert after.fpstate == before.fpstate
        assert after.sve == before.sve, f"before: {_describe(before)}; after: {_describe(after)}"
        print(f"serrinj ran getpid in the thread ({fp}): {_describe(after)} as before")
        time.sleep(0.3)
        for v in (0, 1):
            heartbeat(vm, v)
        assert trouble(vm) == []
    finally:
        vm.stop()


def _regs(pid: int, tid: int) -> Registers:
    with RemoteThread(pid, tid) as t:
        assert t.saved is not None
        return t.saved
