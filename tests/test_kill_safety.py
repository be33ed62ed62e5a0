"""serrinj killed outright (SIGKILL) at every phase of an injection: the VMM lives on.

SIGKILL cannot be caught. The engine shapes every state it puts a thread in
so that the thread can leave it on its own (docs/SAFETY.md, "When serrinj is
killed"): a resume frame below the stack pointer, the ioctl run through a
``syscall; ret`` sequence of the VMM that returns into its ``rt_sigreturn``.
The proofs, from outside serrinj:

- the VMM keeps running and its guest's self-check stays at 0 failures;
- with the VMM frozen (SIGSTOP), a second tracer lets the released thread run
  to the exit of its ``rt_sigreturn`` and reads its registers, FP/SIMD state
  and blocked signals there: identical to those read before serrinj ran, but
  for the kernel's documented rules (``orig_rax`` = -1 after a sigreturn, the
  syscall-restart rewind);
- the NMI is delivered once or not at all (the guest's own counter).

serrinj is held at each phase by the test-only launcher
``tests.helpers.paused_serrinj``; ``skip`` selects which of the injection's
remote syscalls (1: reading the events, 2: the injecting one, 3: reading back).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterator, List

import pytest

from serrinj.remote import sigframe
from serrinj.remote.arch import Registers, to_signed
from serrinj.testvm.process import TestVmProcess
from tests.helpers import postkill
from tests.helpers.paused import Paused
from tests.helpers.procs import wait_stopped
from tests.test_fault_matrix import assert_healthy

X86 = os.uname().machine == "x86_64"
pytestmark = [
    pytest.mark.kvm,
    pytest.mark.root,
    pytest.mark.skipif(not X86, reason="x86_64 NMIs; arm64: lab/suite/test_kill_safety_arm64.py"),
]
ROOT = Path(__file__).resolve().parent.parent
#: (phase, how many times the phase passes first): every phase of the first
#: remote syscall, and those of the injecting one
STRIKES = [
    ("seized", 0),
    ("frame-written", 0),
    ("borrowed", 0),
    ("syscall-entered", 0),
    ("syscall-done", 0),
    ("borrowed", 1),
    ("syscall-entered", 1),
    ("syscall-done", 1),
    ("restoring", 0),
]
#: x86_64 syscalls a --block-in vCPU thread blocks in (219: restart_syscall)
BLOCKED_IN = {"ppoll": {271}, "nanosleep": {35, 219}}
STRIKE_IDS = [f"{p}-{n + 1}" for p, n in STRIKES]


def _nmi_expected(phase: str, skip: int) -> set[int]:
    """How many NMIs the guest may count after a kill at that point."""
    if phase == "restoring":
        return {1}
    if phase in ("seized", "frame-written") or skip == 0:
        return {0}
    return {1}  # the injecting ioctl runs (or ran) to its end


def _kill_at(tmp: Path, paused_runs: List[Paused], phase: str, skip: int, *args: object) -> Paused:
    run = Paused(tmp, phase, *args, skip=skip)
    paused_runs.append(run)
    run.sigkill_when_paused()
    return run


def expected_after_sigreturn(before: Registers) -> Registers:
    """``before`` as the thread resumes it from serrinj's frame: the restart rewind
    applied, and ``orig_rax`` = -1 (rt_sigreturn: "not in a syscall")."""
    return sigframe.x86_resume_registers(before).replace(orig_rax=-1)


@pytest.mark.parametrize(("phase", "skip"), STRIKES, ids=STRIKE_IDS)
def test_sigkill_at_each_phase_leaves_the_test_vm_running(
    start_vm: Callable[..., TestVmProcess],
    paused_runs: List[Paused],
    tmp_path: Path,
    phase: str,
    skip: int,
) -> None:
    vm = start_vm(vcpus=2, mode="spin")
    mark = vm.mark()
    _kill_at(tmp_path, paused_runs, phase, skip, "nmi", "--pid", vm.pid, "--vcpu", 1)
    postkill.wait_untraced(vm.pid, vm.vcpu(1).tid)
    time.sleep(0.2)
    counters = assert_healthy(vm)
    nmis = [e for e in vm.events_seen[mark:] if e.get("event") == "nmi"]
    assert counters[1]["nmi_count"] in _nmi_expected(phase, skip), (counters, nmis)
    assert counters[0]["nmi_count"] == 0
    print(f"kill -9 at {phase} #{skip + 1}: VMM alive, guest NMIs {counters[1]['nmi_count']}")


@pytest.mark.parametrize(("phase", "skip"), STRIKES, ids=STRIKE_IDS)
@pytest.mark.parametrize("block_in", ["kvm-run", "ppoll", "nanosleep"])
def test_sigkill_at_each_phase_the_thread_resumes_its_exact_context(
    start_vm: Callable[..., TestVmProcess],
    paused_runs: List[Paused],
    tmp_path: Path,
    phase: str,
    skip: int,
    block_in: str,
) -> None:
    """Registers, FP/SIMD state and signal mask read from outside, frozen VMM."""
    if block_in == "kvm-run":
        vm = start_vm(vcpus=2, mode="spin")
    else:  # between runs the vCPU thread blocks in ppoll (-514) or nanosleep (-516)
        vm = start_vm(vcpus=2, mode="futex", extra=["--block-in", block_in, "--yield-ms", "20"])
    tid = vm.vcpu(1).tid
    for _ in range(200):  # freeze it inside the syscall it blocks in
        os.kill(vm.pid, signal.SIGSTOP)
        wait_stopped(vm.pid)
        own = _own_registers(vm.pid, tid)
        if block_in == "kvm-run" or to_signed(own["orig_rax"]) in BLOCKED_IN[block_in]:
            break
        os.kill(vm.pid, signal.SIGCONT)
        time.sleep(0.003)
    else:
        raise AssertionError(f"vCPU thread never seen stopped in {block_in}")
    try:
        before = postkill.settle(vm.pid, tid, own=own)
        _kill_at(tmp_path, paused_runs, phase, skip, "nmi", "--pid", vm.pid, "--vcpu", 1)
        after = postkill.settle(vm.pid, tid, own=before.regs)
    finally:
        os.kill(vm.pid, signal.SIGCONT)
    if after.syscalls:  # it ran on serrinj's registers, then rt_sigreturn
        want = expected_after_sigreturn(before.regs)
        assert after.syscalls[-1] == postkill.NR_RT_SIGRETURN["x86_64"], after.syscalls
    else:
        assert phase in ("seized", "frame-written"), "borrowed registers never came back"
        want = before.regs
    assert after.regs == want, want.diff(after.regs)
    assert after.fpstate == before.fpstate, _fp_diff(before.fpstate, after.fpstate)
    assert after.sigmask == before.sigmask
    print(
        f"kill -9 at {phase} #{skip + 1} ({block_in}; stopped in syscall"
        f" {to_signed(before.regs['orig_rax'])} with rax {to_signed(before.regs['rax'])}):"
        f" ran {after.syscalls}, registers,"
        f" {len(after.fpstate)} bytes of XSAVE state and the signal mask as before"
    )
    time.sleep(0.2)
    assert_healthy(vm)


def _own_registers(pid: int, tid: int) -> Registers:
    from tests.test_fault_matrix import observe

    return observe(pid, tid)


def _fp_diff(a: bytes, b: bytes) -> str:
    diffs = [i for i in range(min(len(a), len(b))) if a[i] != b[i]]
    return f"{len(diffs)} bytes differ, first at {diffs[:8]} (lengths {len(a)}, {len(b)})"


# ====================================================================== real QEMU
@pytest.fixture(scope="module")
def firmware(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.helpers.qemu import build_firmware

    return build_firmware(tmp_path_factory.mktemp("fw") / "stub.bin")


@pytest.fixture
def qemu(tmp_path: Path, firmware: Path) -> Iterator[Any]:
    from tests.helpers.qemu import Qemu

    q = Qemu(tmp_path, firmware, f"srj-ks-{os.getpid()}-{tmp_path.name[-6:]}")
    try:
        q.wait_line("ready cpu=0")
        q.wait_line("ready cpu=1")
        yield q
    finally:
        q.stop()


@pytest.mark.qemu
@pytest.mark.parametrize(("phase", "skip"), STRIKES, ids=STRIKE_IDS)
def test_sigkill_at_each_phase_leaves_qemu_running(
    qemu: Any, paused_runs: List[Paused], tmp_path: Path, phase: str, skip: int
) -> None:
    mark = qemu.mark()
    tid = qemu.cpu_threads()[1]
    _kill_at(tmp_path, paused_runs, phase, skip, "nmi", "--name", qemu.name, "--vcpu", 1)
    postkill.wait_untraced(qemu.pid, tid)
    time.sleep(0.3)
    assert qemu.proc.poll() is None, "QEMU died"
    assert qemu.status() == "running"
    assert qemu.ping().startswith("pong cpu=0")
    lines = qemu.lines_since(mark)
    assert not [x for x in lines if x.startswith("exception")], lines
    nmis = [x for x in lines if x.startswith("nmi cpu=1")]
    assert len(nmis) in _nmi_expected(phase, skip), lines
    print(f"kill -9 at {phase} #{skip + 1}: QEMU running, guest: {' | '.join(lines) or '-'}")


# ====================================================================== Ctrl-Z
def _state(pid: int, tid: int | None = None) -> str:
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path) as f:
        raw = f.read()
    return raw[raw.rindex(")") + 2]


def _tracer(pid: int, tid: int) -> int:
    with open(f"/proc/{pid}/task/{tid}/status") as f:
        return int(next(x for x in f if x.startswith("TracerPid:")).split()[1])


def _wait_stopped(proc: Any, marker: Path | None = None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while _state(proc.pid) != "T":
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "serrinj never stopped"
        if marker is not None and marker.exists():
            marker.unlink()  # let every later pause go
        time.sleep(0.002)


PHASES = ["seized", "frame-written", "borrowed", "syscall-entered", "syscall-done", "restoring"]


@pytest.mark.parametrize("phase", PHASES)
def test_sigtstp_at_each_phase_releases_the_thread_before_serrinj_stops(
    start_vm: Callable[..., TestVmProcess], paused_runs: List[Paused], tmp_path: Path, phase: str
) -> None:
    """Ctrl-Z while serrinj holds the vCPU thread: the injection completes, the thread is
    restored and released, and only then does serrinj stop, saying so; while it is
    stopped the vCPU runs its guest; `fg` (SIGCONT) lets the command end normally."""
    from tests.test_fault_matrix import heartbeat

    vm = start_vm(vcpus=2, mode="spin")
    tid = vm.vcpu(1).tid
    # A process group of its own with its parent in another group of the same session
    # (as a shell's job): the kernel discards SIGTSTP in an orphaned process group.
    run = Paused(tmp_path, phase, "nmi", "--pid", vm.pid, "--vcpu", 1, process_group=0)
    paused_runs.append(run)
    run.wait_paused()
    run.proc.send_signal(signal.SIGTSTP)
    time.sleep(0.05)
    assert _state(run.proc.pid) != "T", "serrinj stopped while it held the thread"
    run.marker.unlink()
    _wait_stopped(run.proc, run.marker)
    assert _tracer(vm.pid, tid) == 0
    assert _state(vm.pid, tid) not in "tT"
    first = heartbeat(vm, 1)
    time.sleep(0.05)
    second = heartbeat(vm, 1)
    assert second["iterations"] > first["iterations"], "the vCPU did not run"
    os.kill(run.proc.pid, signal.SIGCONT)
    r = run.release()
    assert r.rc == 0, r
    assert "stopped (SIGTSTP), holding no VMM thread" in r.stderr, r
    counters = assert_healthy(vm)
    assert counters[1]["nmi_count"] == 1
    print(f"SIGTSTP at {phase}: thread released, vCPU ran while serrinj was stopped")


def test_sigtstp_mid_campaign_and_fg_continues_it(
    start_vm: Callable[..., TestVmProcess], tmp_path: Path
) -> None:
    import subprocess
    import sys

    vm = start_vm(vcpus=2, mode="spin")
    campaign = tmp_path / "c.toml"
    campaign.write_text(
        '[campaign]\nname = "tstp"\n[target]\narch = "x86_64"\n[[steps]]\nname = "nmis"\n'
        'inject = "nmi"\nvcpus = "all"\nrepeat = 40\ninterval = 0\n'
    )
    log = tmp_path / "err"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "serrinj", "run", str(campaign), "--pid", str(vm.pid)],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            process_group=0,  # a job's own group, never an orphaned one
        )
    try:
        deadline = time.monotonic() + 30
        while log.read_text().count("PASSED") < 5:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.005)
        proc.send_signal(signal.SIGTSTP)
        _wait_stopped(proc)
        done = log.read_text().count("PASSED")
        assert all(_tracer(vm.pid, v.tid) == 0 for v in vm.vcpus)
        time.sleep(0.3)
        assert log.read_text().count("PASSED") == done  # really stopped
        os.kill(proc.pid, signal.SIGCONT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, (out, log.read_text())
    assert "80 passed" in out, out
    assert "stopped (SIGTSTP)" in log.read_text()
    counters = assert_healthy(vm)
    print(f"SIGTSTP after {done} of 80 NMIs, fg: the campaign ran on, {counters[1]['nmi_count']}")


# ====================================================================== the fallback
def test_a_shadow_stack_thread_falls_back_with_a_warning_in_output_and_audit(
    start_vm: Callable[..., TestVmProcess],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A thread with an x86 user shadow stack would reject the forged frame and the
    `ret`: serrinj takes the old path and says so (output, audit record, status)."""
    import json

    from serrinj.cli import run
    from serrinj.remote import session

    vm = start_vm(vcpus=2, mode="spin")
    audit_log = tmp_path / "audit.jsonl"
    monkeypatch.setenv("SERRINJ_AUDIT_LOG", str(audit_log))
    monkeypatch.setattr(session, "thread_features", lambda sec: "shstk wrss")
    assert run(["nmi", "--pid", str(vm.pid), "--vcpu", "1"]) == 0
    out = capsys.readouterr().out
    assert "kill-safe" in out and "shadow stack" in out, out
    (rec,) = [json.loads(x) for x in audit_log.read_text().splitlines()]
    assert rec["outcome"] == "ok"
    assert rec["detail"]["kill_safe"] is False
    assert "shadow stack" in rec["detail"]["kill_safe_reason"]
    assert run(["status", "--pid", str(vm.pid)]) == 0
    assert "kill-safe: no (the thread runs with an x86 user shadow stack" in capsys.readouterr().out
    monkeypatch.undo()
    counters = assert_healthy(vm)
    assert counters[1]["nmi_count"] == 1


def test_a_vmm_without_the_gadgets_falls_back_and_is_restored(
    start_vm: Callable[..., TestVmProcess],
) -> None:
    from serrinj.remote import RemoteThread
    from serrinj.remote.arch import X86_64

    class NoGadgets(X86_64):
        syscall_ret_seqs = (b"\x0f\x05\xde\xad\xbe\xef\xc3",)

    vm = start_vm(vcpus=2, mode="spin")
    with RemoteThread(vm.pid, vm.vcpu(1).tid, arch=NoGadgets()) as t:
        assert t.syscall(t.arch.nr["getpid"]) == vm.pid
        assert t.kill_safe is False
        assert "`syscall; ret`" in t.kill_safe_reason
    assert t.verified
    with RemoteThread(vm.pid, vm.vcpu(1).tid) as t:
        assert t.syscall(t.arch.nr["getpid"]) == vm.pid
        assert t.kill_safe is True and t.kill_safe_reason == ""
    assert_healthy(vm)


def test_a_frame_refused_after_the_stop_runs_the_syscall_at_the_same_gadget(
    start_vm: Callable[..., TestVmProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Kill safety decided before the stop can still be refused at it (here: the FP
    state); the old path then runs at the `syscall; ret` found before the stop,
    whose first instruction is a syscall, instead of searching while the thread
    is held. The thread is restored all the same."""
    from serrinj.remote import RemoteThread
    from serrinj.remote.arch import host_arch

    vm = start_vm(vcpus=2, mode="spin")
    frames = sigframe.FRAMES[host_arch().name]
    monkeypatch.setattr(type(frames), "fp_problem", lambda self, fp: "refused by the test")
    with RemoteThread(vm.pid, vm.vcpu(1).tid) as t:
        ret_gadget = t._ret_gadget
        assert ret_gadget is not None
        assert t.syscall(t.arch.nr["getpid"]) == vm.pid
        assert t.kill_safe is False and t.kill_safe_reason == "refused by the test"
        assert t.gadget == ret_gadget
    assert t.verified
    monkeypatch.undo()
    assert_healthy(vm)
