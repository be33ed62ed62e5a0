"""The remote-syscall engine against real processes (no KVM needed).

Each target loops in one kind of syscall and reports a heartbeat; it exits
with "BAD <errno>" if it ever sees a kernel-internal restart code, which is
what a wrong restart fixup would leak to the VMM.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Iterator

import pytest

from serrinj import _native
from serrinj.errors import Conflict, TargetGone, TargetNotFound
from serrinj.remote import RemoteThread
from serrinj.remote.session import EngineError
from serrinj.vcpu.remote import RemoteExecutor
from tests.conftest import missing
from tests.helpers.procs import Workload, task_states, wait_stopped

pytestmark = pytest.mark.root

KINDS = ["nanosleep", "futex", "futex-forever", "read", "poll", "spin"]


@pytest.fixture
def workload(request: pytest.FixtureRequest) -> Iterator[Workload]:
    w = Workload(request.param)
    try:
        yield w
    finally:
        w.stop()


@pytest.mark.parametrize("workload", KINDS, indirect=True)
def test_remote_getpid_in_every_syscall_state(workload: Workload) -> None:
    workload.beats(1)
    for _ in range(50):
        with RemoteThread(workload.pid, workload.tid) as t:
            assert t.syscall(t.arch.nr["getpid"]) == workload.pid
            assert t.syscall(t.arch.nr["gettid"]) == workload.tid
        assert t.verified is True
    before = workload.beats(1)[0]
    after = workload.beats(2)[-1]
    assert workload.proc.poll() is None
    assert workload.bad_lines() == []
    if workload.kind != "futex-forever":
        assert after > before, "the target stopped making progress"


class _Hung(Exception):
    pass


def _on_alarm(signo: int, frame: object) -> None:
    raise _Hung("the step did not end")


@pytest.mark.parametrize("workload", ["nanosleep", "futex", "poll", "futex-forever"], indirect=True)
def test_a_step_that_meets_no_kvm_run_ends_at_its_timeout(workload: Workload) -> None:
    """A thread that keeps making syscalls, none of them KVM_RUN (what a probe meets in
    a VMM's helper threads): the step ends at its timeout, at a stop the thread is
    released from unharmed. Under PTRACE_SYSCALL the PTRACE_INTERRUPT that ends the
    step is reported as a syscall stop; waiting for an event stop while stepping on
    never ended (SIGALRM breaks such a hang here)."""
    workload.beats(1)
    old = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        for timeout, wake_within in ((0.2, 0.0), (0.2, 0.3)):
            t0 = time.monotonic()
            signal.alarm(30)
            with RemoteThread(workload.pid, workload.tid) as t:
                assert t.step_to_kvm_run_entry(timeout, wake_within) is None
                assert t.syscall(t.arch.nr["getpid"]) == workload.pid
            signal.alarm(0)
            assert t.verified is True
            assert time.monotonic() - t0 >= max(timeout, wake_within)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    before = workload.beats(1)[0]
    after = workload.beats(2)[-1]
    assert workload.proc.poll() is None
    assert workload.bad_lines() == []
    if workload.kind != "futex-forever":
        assert after > before, "the target stopped making progress"


@pytest.mark.parametrize("workload", ["futex"], indirect=True)
def test_thousand_back_to_back_operations(workload: Workload) -> None:
    for _ in range(1000):
        with RemoteThread(workload.pid, workload.tid) as t:
            t.syscall(t.arch.nr["getpid"])
        assert t.verified
    beats = workload.beats(3)
    assert beats[-1] > beats[0]
    assert workload.bad_lines() == []


@pytest.mark.parametrize("workload", ["futex", "nanosleep", "read"], indirect=True)
def test_registers_and_memory_identical_seen_from_outside(workload: Workload) -> None:
    """Freeze the target (SIGSTOP), snapshot registers and the stack below sp from a
    separate observer, run an operation that borrows scratch memory, snapshot again."""
    os.kill(workload.pid, signal.SIGSTOP)
    try:
        wait_stopped(workload.pid)
        with RemoteThread(workload.pid, workload.tid) as observer:
            before = observer.saved
            assert before is not None
            sp = before[observer.arch.sp_reg]
            stack_before = _native.process_vm_read(workload.pid, sp - 8192, 8192)
        with RemoteThread(workload.pid, workload.tid) as t:
            ex = RemoteExecutor(t)
            scratch_probe = t.scratch(256)
            # below the resume frame (an XSAVE area and a signal frame) on x86_64
            assert sp - 8192 <= scratch_probe < sp - t.arch.red_zone
            # An ioctl that fails (a pipe has no terminal): the buffer round trip
            # still writes the scratch area, which must be restored afterwards.
            with pytest.raises(OSError):
                ex.ioctl_buf(0, 0x5401, b"\xa5" * 60)  # TCGETS on stdin (not a tty)
        with RemoteThread(workload.pid, workload.tid) as observer:
            after = observer.saved
            stack_after = _native.process_vm_read(workload.pid, sp - 8192, 8192)
        assert after == before, before.diff(after) if after else None
        assert stack_after == stack_before
    finally:
        os.kill(workload.pid, signal.SIGCONT)
    workload.beats(2)
    assert workload.bad_lines() == []


@pytest.mark.parametrize("workload", ["futex"], indirect=True)
def test_second_tracer_is_a_clear_conflict(workload: Workload) -> None:
    with RemoteThread(workload.pid, workload.tid):
        with pytest.raises(Conflict) as err, RemoteThread(workload.pid, workload.tid):
            pass
        assert f"traced by process {os.getpid()}" in err.value.message
    workload.beats(1)


@pytest.mark.parametrize("workload", ["futex"], indirect=True)
def test_target_killed_mid_session_is_target_gone(workload: Workload) -> None:
    with pytest.raises(TargetGone), RemoteThread(workload.pid, workload.tid) as t:
        t.syscall(t.arch.nr["getpid"])
        os.kill(workload.pid, signal.SIGKILL)
        time.sleep(0.05)
        t.syscall(t.arch.nr["getpid"])
    workload.proc.wait(timeout=5)


def test_missing_process_is_target_gone() -> None:
    with pytest.raises(TargetNotFound):
        RemoteThread(2**22 + 12345, 2**22 + 12345).attach()


@pytest.mark.parametrize("workload", ["futex"], indirect=True)
def test_pid_reuse_is_caught_by_starttime(workload: Workload) -> None:
    with pytest.raises(TargetGone, match="reused"):
        RemoteThread(workload.pid, workload.tid, expected_starttime=1).attach()
    workload.beats(1)


@pytest.mark.parametrize("workload", ["spin"], indirect=True)
def test_signals_arriving_during_an_operation_are_not_lost(workload: Workload) -> None:
    """SIGURG (ignored by default) and SIGCONT sent while registers are borrowed are
    re-sent after the restore; the target keeps running normally."""
    with RemoteThread(workload.pid, workload.tid) as t:
        os.kill(workload.pid, signal.SIGCONT)
        t.syscall(t.arch.nr["getpid"])
        _native.tgkill(workload.pid, workload.tid, signal.SIGURG)
        t.syscall(t.arch.nr["getpid"])
    assert t.verified
    beats = workload.beats(3)
    assert beats[-1] > beats[0]


_PF_KTHREAD = 0x00200000  # include/linux/sched.h


def _a_kernel_thread() -> tuple[int, str]:
    """(pid, comm) of a kernel thread this test may see, told by PF_KTHREAD in its
    /proc/PID/stat flags: pid 2 is kthreadd only in the host's pid namespace (in a
    container it is an ordinary process)."""
    for name in sorted(os.listdir("/proc"), key=lambda n: (len(n), n)):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        comm = raw[raw.index("(") + 1 : raw.rindex(")")]
        if int(raw.rsplit(")", 1)[1].split()[6]) & _PF_KTHREAD:
            return int(name), comm
    missing("no kernel thread is visible in /proc (a pid namespace of its own?); run on the host")


def test_engine_refuses_a_thread_without_user_code() -> None:
    """Kernel threads and workers cannot run a syscall for us."""
    pid, comm = _a_kernel_thread()
    with pytest.raises(EngineError) as err:
        RemoteThread(pid, pid).attach()
    assert type(err.value) is EngineError
    assert str(err.value) == (
        f"task {pid} of process {pid} ({comm}) is a kernel worker without user code;"
        " it cannot run a syscall for serrinj"
    )


@pytest.mark.parametrize("workload", ["spin"], indirect=True)
def test_wait_stopped_waits_for_the_group_stop(workload: Workload) -> None:
    """The helper the SIGSTOP tests use: it fails on a running process, and returns once
    every thread shows the stop."""
    with pytest.raises(AssertionError, match="not every thread"):
        wait_stopped(workload.pid, timeout=0.2)
    os.kill(workload.pid, signal.SIGSTOP)
    try:
        wait_stopped(workload.pid)
        assert set(task_states(workload.pid).values()) == {"T"}
    finally:
        os.kill(workload.pid, signal.SIGCONT)
