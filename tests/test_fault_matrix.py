"""The fault matrix through the real command line: every way an injection can be disturbed.

serrinj writes into the registers of a production VMM's thread, so each case
must end in a clear error or a clean success, the VMM must keep running
(unless the test killed it), and no register or memory byte may differ
afterwards. The proofs:

- registers are compared from *outside*: the VMM is frozen with SIGSTOP and a
  separate observer (the engine, used read-only) snapshots the vCPU thread
  before and after;
- the guest's own self-check (registers and a memory checksum, reported by
  ``heartbeat`` as ``check_failures``) stays at zero;
- "nothing was sent" is the guest's own counters (NMIs, machine checks) and
  the audit record's outcome.

The engine's phase observer, installed by the test-only launcher
``tests.helpers.paused_serrinj``, holds the command at an exact phase while
the test strikes. Every process a test starts
is ended by its pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Set

import pytest

from serrinj.codec import mce
from serrinj.errors import ExitCode
from serrinj.ops import audit
from serrinj.remote import RemoteThread
from serrinj.remote.arch import Registers
from serrinj.testvm.process import TestVmProcess
from tests.conftest import need_tool, no_such_pid
from tests.helpers import serrinj_cli
from tests.helpers.paused import Paused, env_with_tests
from tests.helpers.procs import task_states, wait_stopped
from tests.helpers.serrinj_cli import Result

X86 = os.uname().machine == "x86_64"
pytestmark = [
    pytest.mark.kvm,
    pytest.mark.root,
    pytest.mark.skipif(not X86, reason="x86_64 faults (NMI, machine checks); arm64: the lab"),
]
ROOT = Path(__file__).resolve().parent.parent
PHASES = ["seized", "borrowed", "syscall-done"]
Event = Dict[str, Any]


# ====================================================================== helpers
def serrinj(*args: object, env: Optional[Dict[str, str]] = None, timeout: float = 60) -> Result:
    return serrinj_cli.run(*args, env=env, timeout=timeout)


def heartbeat(vm: TestVmProcess, vcpu: int, timeout: float = 10.0) -> Event:
    mark = vm.mark()
    vm.command({"cmd": "heartbeat", "vcpu": vcpu})
    return vm.wait_event(
        lambda e: e.get("event") == "heartbeat" and e.get("vcpu") == vcpu, timeout, since=mark
    )


def assert_healthy(vm: TestVmProcess) -> Dict[int, Event]:
    """The VMM runs, the guest on every vCPU makes progress and its self-check is clean."""
    assert vm.alive(), vm.returncode
    first = {v.vcpu_id: heartbeat(vm, v.vcpu_id) for v in vm.vcpus}
    time.sleep(0.05)
    second = {v.vcpu_id: heartbeat(vm, v.vcpu_id) for v in vm.vcpus}
    for vid, hb in second.items():
        assert hb["check_failures"] == 0, hb
        assert hb["iterations"] >= first[vid]["iterations"]
        assert hb["ticks"] > first[vid]["ticks"], "the guest's timer stopped"
    bad = [e for e in vm.events_seen if e.get("event") in ("error", "exit", "guest-check-failed")]
    assert bad == [], bad
    return second


def assert_clean_error(r: Result, code: int, *words: str) -> None:
    assert r.rc == code, r
    # (click echoes one blank line on Ctrl-C, to end the terminal's ^C echo)
    stderr = r.stderr[1:] if code == ExitCode.INTERRUPTED and r.stderr[:1] == "\n" else r.stderr
    assert stderr.startswith("error: "), r
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r
    for w in words:
        assert w in r.stderr, (w, str(r))


def observe(pid: int, tid: int) -> Registers:
    """The thread's registers, read by a separate, read-only engine session."""
    with RemoteThread(pid, tid) as t:
        assert t.saved is not None
        return t.saved


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[None]:
    """SIGSTOP the whole VMM so that its registers hold still; SIGCONT on the way out."""
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_stopped(pid)
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def audit_since(n: int) -> List[Dict[str, Any]]:
    return [r for r in audit.read()[n:]]


def audit_mark() -> int:
    return len(audit.read())


def guest_nmis(vm: TestVmProcess, since: int = 0) -> List[Event]:
    return [e for e in vm.events_seen[since:] if e.get("event") == "nmi"]


# ====================================================================== the VMM dies
@pytest.mark.parametrize("phase", PHASES)
def test_test_vm_killed_mid_injection_is_exit_3(
    start_vm: Callable[..., TestVmProcess], paused_runs: List[Paused], tmp_path: Path, phase: str
) -> None:
    vm = start_vm(vcpus=2)
    n = audit_mark()
    run = Paused(tmp_path, phase, "nmi", "--pid", vm.pid, "--vcpu", 1)
    paused_runs.append(run)
    run.wait_paused()
    os.kill(vm.pid, signal.SIGKILL)
    # the thread serrinj holds is reaped by serrinj, so the VMM's parent sees the
    # exit only once serrinj has gone on
    r = run.release()
    assert_clean_error(r, ExitCode.NOT_FOUND, "exited")
    assert vm.wait_exit(10) == -signal.SIGKILL
    (rec,) = audit_since(n)
    assert rec["action"] == "inject-nmi" and rec["outcome"] == "failed", rec
    assert rec["error"]["kind"] == "target-gone"


@pytest.fixture(scope="module")
def firmware(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.helpers.qemu import build_firmware

    return build_firmware(tmp_path_factory.mktemp("fw") / "stub.bin")


@pytest.fixture
def qemu(tmp_path: Path, firmware: Path) -> Iterator[Any]:
    from tests.helpers.qemu import Qemu

    q = Qemu(tmp_path, firmware, f"srj-fm-{os.getpid()}-{tmp_path.name[-6:]}")
    try:
        q.wait_line("ready cpu=0")
        q.wait_line("ready cpu=1")
        yield q
    finally:
        q.stop()


@pytest.mark.qemu
@pytest.mark.parametrize("phase", ["seized", "syscall-done"])  # borrowed: test_qemu_x86.py
def test_qemu_killed_mid_injection_is_exit_3(
    qemu: Any, paused_runs: List[Paused], tmp_path: Path, phase: str
) -> None:
    run = Paused(
        tmp_path, phase, "mce", "--name", qemu.name, "--vcpu", 1, "--bank", 2, "--preset", "ce"
    )
    paused_runs.append(run)
    run.wait_paused()
    os.kill(qemu.pid, signal.SIGKILL)
    r = run.release()
    assert_clean_error(r, ExitCode.NOT_FOUND, "exited")
    assert qemu.proc.wait(timeout=10) == -signal.SIGKILL


@pytest.mark.parametrize("phase", PHASES)
def test_vmm_exiting_by_itself_while_its_vcpu_thread_is_held(
    start_vm: Callable[..., TestVmProcess], paused_runs: List[Paused], tmp_path: Path, phase: str
) -> None:
    """The VMM quits normally (exit_group from its main thread) while serrinj holds
    a vCPU thread: the kernel ends that thread under serrinj, which reports it."""
    vm = start_vm(vcpus=2)
    run = Paused(tmp_path, phase, "nmi", "--pid", vm.pid, "--vcpu", 0)
    paused_runs.append(run)
    run.wait_paused()
    vm.command({"cmd": "quit"})
    # the VMM gives its held vCPU thread 5 s to join, then exits anyway; its
    # main thread is a zombie then, and the held thread dies under serrinj
    vm.wait_event(lambda e: e.get("event") == "shutdown", 20)
    _wait_state(vm.pid, None, "Z")
    r = run.release()
    assert_clean_error(r, ExitCode.NOT_FOUND, "exited")
    assert vm.wait_exit(10) == 0


def test_vmm_exiting_while_serrinj_works_races_cleanly(
    start_vm: Callable[..., TestVmProcess], paused_runs: List[Paused], tmp_path: Path
) -> None:
    """The same, with serrinj released while the VMM is still exiting: it either
    finishes first (exit 0) or sees the thread die (exit 3), never anything else."""
    vms = [start_vm(vcpus=1) for _ in range(4)]
    runs = []
    for i, vm in enumerate(vms):
        (tmp_path / str(i)).mkdir()
        run = Paused(tmp_path / str(i), PHASES[i % 3], "nmi", "--pid", vm.pid)
        paused_runs.append(run)
        runs.append(run)
    for run in runs:
        run.wait_paused()
    for vm in vms:
        vm.command({"cmd": "quit"})
    for vm in vms:
        vm.wait_event(lambda e: e.get("event") == "shutdown", 20)
    for i, (vm, run) in enumerate(zip(vms, runs)):
        time.sleep(0.002 * i)
        r = run.release()
        assert r.rc in (0, ExitCode.NOT_FOUND), r
        assert "Traceback" not in r.stderr, r
        if r.rc:
            assert_clean_error(r, ExitCode.NOT_FOUND, "exited")
        # The test VM kicked the held thread (SIGUSR1) when it began to quit, and
        # the pause point held it past the test VM's 5 s join timeout: when the
        # kick lands after Python's finalization reset the handler, it ends the
        # exiting VMM by that signal instead of status 0. serrinj holds a thread
        # for microseconds outside these tests.
        assert vm.wait_exit(10) in (0, -signal.SIGUSR1)


def _wait_state(pid: int, tid: Optional[int], states: str, timeout: float = 10.0) -> None:
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    deadline = time.monotonic() + timeout
    while True:
        with open(path) as f:
            raw = f.read()
        if raw[raw.rindex(")") + 2] in states:
            return
        assert time.monotonic() < deadline, f"{path} never reached state {states}: {raw}"
        time.sleep(0.005)


# ====================================================================== serrinj is signalled
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize(
    "sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["SIGINT", "SIGTERM", "SIGHUP"]
)
@pytest.mark.parametrize("command", ["nmi", "mce"])
def test_signal_to_the_cli_mid_injection_restores_first_and_exits_130(
    start_vm: Callable[..., TestVmProcess],
    paused_runs: List[Paused],
    tmp_path: Path,
    phase: str,
    sig: int,
    command: str,
) -> None:
    """Ctrl-C (or SIGTERM, or SIGHUP: the terminal went away) while serrinj holds the
    vCPU thread: the thread is restored bit for bit and detached, no further ioctl is
    sent, and serrinj exits 130."""
    vm = start_vm(vcpus=2, mode="spin")
    tid = vm.vcpu(1).tid
    args: List[object] = [command, "--pid", vm.pid, "--vcpu", 1]
    if command == "mce":
        args += ["--bank", 1, "--preset", "uc"]
    n = audit_mark()
    with frozen(vm.pid):
        before = observe(vm.pid, tid)
        run = Paused(tmp_path, phase, *args)
        paused_runs.append(run)
        run.wait_paused()
        run.proc.send_signal(sig)
        time.sleep(0.05)
        r = run.release()
        after = observe(vm.pid, tid)
    assert after == before, before.diff(after)
    assert_clean_error(r, ExitCode.INTERRUPTED, "interrupted")
    # The pause came before the injecting ioctl (the first remote call reads the
    # vCPU), and an interrupted session sends nothing more.
    time.sleep(0.2)
    counters = assert_healthy(vm)
    assert counters[1]["nmi_count"] == 0 and counters[1]["mce_count"] == 0
    (rec,) = audit_since(n)
    assert rec["outcome"] == "interrupted", rec


# ====================================================================== already traced
def _wait_traced(pid: int, tid: int, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            tracer = int(next(x for x in f if x.startswith("TracerPid:")).split()[1])
        if tracer:
            return tracer
        assert time.monotonic() < deadline, "the tracer never attached"
        time.sleep(0.01)


@contextlib.contextmanager
def traced_by(tool: str, pid: int, tid: int) -> Iterator[subprocess.Popen[str]]:
    """A real strace (one thread) or gdb (the whole process) attached to the VMM."""
    exe = need_tool(tool, tool)
    if tool == "strace":
        argv = [exe, "-q", "-o", os.devnull, "-p", str(tid)]
    else:
        argv = [exe, "-q", "-nx", "--interpreter=mi2", "-p", str(pid)]
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert _wait_traced(pid, tid) == proc.pid
        yield proc
    finally:
        if tool == "gdb" and proc.poll() is None and proc.stdin is not None:
            # detach cleanly: the threads gdb stopped run on
            with contextlib.suppress(OSError):
                proc.stdin.write("-target-detach\n-gdb-exit\n")
                proc.stdin.flush()
        else:
            proc.terminate()  # strace detaches on SIGTERM
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stdin is not None:
            proc.stdin.close()


@pytest.mark.parametrize("tool", ["strace", "gdb"])
def test_already_traced_thread_is_a_conflict_and_nothing_is_sent(
    start_vm: Callable[..., TestVmProcess], tool: str
) -> None:
    vm = start_vm(vcpus=2)
    tid = vm.vcpu(0).tid
    n = audit_mark()
    with traced_by(tool, vm.pid, tid) as tracer:
        for args in (
            ["nmi", "--pid", vm.pid, "--vcpu", 0],
            ["mce", "--pid", vm.pid, "--vcpu", 0, "--bank", 1, "--preset", "uc"],
            ["status", "--pid", vm.pid, "--vcpu", 0],
        ):
            r = serrinj(*args)
            assert_clean_error(r, ExitCode.CONFLICT, f"traced by process {tracer.pid} ({tool})")
            assert "detach the debugger" in r.stderr
    records = audit_since(n)
    assert [(x["action"], x["outcome"]) for x in records] == [
        ("inject-nmi", "refused"),
        ("inject-mce", "refused"),
    ]
    counters = assert_healthy(vm)
    assert all(c["nmi_count"] == 0 and c["mce_count"] == 0 for c in counters.values())


# ====================================================================== the VMM is stopped
@pytest.mark.parametrize("stop_sig", [signal.SIGSTOP, signal.SIGTSTP], ids=["SIGSTOP", "SIGTSTP"])
def test_stopped_vmm_takes_the_faults_after_sigcont(
    start_vm: Callable[..., TestVmProcess], stop_sig: int
) -> None:
    """A VMM in a group stop (SIGSTOP, or SIGTSTP from a terminal): the injection
    succeeds, the VMM stays stopped, and the guest takes the faults after SIGCONT.
    ``--wait`` explains why it cannot be delivered yet (exit 7)."""
    # its own process group: SIGTSTP to an orphaned group (pytest's may be one, as
    # in a background job) is discarded by the kernel and would stop nothing
    vm = start_vm(vcpus=2, mode="futex", own_process_group=True)
    tid = vm.vcpu(1).tid
    mark = vm.mark()
    os.kill(vm.pid, stop_sig)
    try:
        wait_stopped(vm.pid)
        before = observe(vm.pid, tid)
        r = serrinj("nmi", "--json", "--pid", vm.pid, "--vcpu", 1)
        assert r.rc == 0, r
        (inj,) = r.data["injections"]
        assert inj["thread_state"] == "stopped" and inj["registers_restored"] is True
        assert inj["after"]["nmi"]["pending"] == 1
        r = serrinj("mce", "--pid", vm.pid, "--vcpu", 0, "--bank", 4, "--preset", "srao")
        assert r.rc == 0, r
        r = serrinj("nmi", "--pid", vm.pid, "--vcpu", 0, "--wait", "0.3")
        name = signal.Signals(stop_sig).name
        assert_clean_error(r, ExitCode.NOT_DELIVERED, f"stopped ({name})", "SIGCONT")
        after = observe(vm.pid, tid)
        assert after == before, before.diff(after)
        # still stopped: every thread, and the guest took nothing
        time.sleep(0.2)
        assert all(s == "T" for s in task_states(vm.pid).values()), task_states(vm.pid)
        assert [e for e in vm.events_seen[mark:] if e.get("event") in ("nmi", "mce")] == []
    finally:
        os.kill(vm.pid, signal.SIGCONT)
    vm.wait_event(lambda e: e.get("event") == "nmi" and e.get("vcpu") == 1, 10, since=mark)
    vm.wait_event(lambda e: e.get("event") == "nmi" and e.get("vcpu") == 0, 10, since=mark)
    ev = vm.wait_event(lambda e: e.get("event") == "mce" and e.get("vcpu") == 0, 10, since=mark)
    assert ev["banks"][0]["bank"] == 4
    counters = assert_healthy(vm)
    assert (counters[0]["nmi_count"], counters[0]["mce_count"], counters[1]["nmi_count"]) == (
        1,
        1,
        1,
    )


@pytest.mark.parametrize("phase", PHASES)
def test_group_stop_beginning_mid_injection(
    start_vm: Callable[..., TestVmProcess], paused_runs: List[Paused], tmp_path: Path, phase: str
) -> None:
    """SIGSTOP arrives for the VMM while serrinj holds its vCPU thread: serrinj finishes,
    the thread joins the group stop after the detach, and SIGCONT resumes all."""
    vm = start_vm(vcpus=2, mode="spin")
    mark = vm.mark()
    run = Paused(tmp_path, phase, "nmi", "--json", "--pid", vm.pid, "--vcpu", 1)
    paused_runs.append(run)
    run.wait_paused()
    os.kill(vm.pid, signal.SIGSTOP)
    try:
        wait_stopped(vm.pid)  # the held thread in its ptrace stop, the others in the group stop
        r = run.release()
        assert r.rc == 0, r
        assert r.data["injections"][0]["registers_restored"] is True
        wait_stopped(vm.pid)
        time.sleep(0.2)
        assert guest_nmis(vm, mark) == []
    finally:
        os.kill(vm.pid, signal.SIGCONT)
    vm.wait_event(lambda e: e.get("event") == "nmi" and e.get("vcpu") == 1, 10, since=mark)
    counters = assert_healthy(vm)
    assert counters[1]["nmi_count"] == 1 and counters[0]["nmi_count"] == 0


# ====================================================================== a vCPU thread ends
def _triple_fault_on_run(vm: TestVmProcess, vcpu: int) -> None:
    """Two uncorrected machine checks while the VM is paused: KVM turns the second
    (MCIP still set) into a triple fault, so the vCPU's thread ends when it runs."""
    uc = mce.preset("uc").build(bank=1)
    for _ in range(2):
        mark = vm.mark()
        vm.command({"cmd": "mce", "vcpu": vcpu, "bank": 1, "status": uc.status,
                    "mcg_status": uc.mcg_status})  # fmt: skip
        vm.wait_event(lambda e: e.get("event") == "ack" and e.get("cmd") == "mce", since=mark)


def test_vcpu_thread_ending_during_an_all_vcpu_injection(
    start_vm: Callable[..., TestVmProcess], paused_runs: List[Paused], tmp_path: Path
) -> None:
    """``nmi --vcpu all``: while serrinj holds vCPU 0, vCPU 1's guest triple-faults and
    its thread ends. vCPU 0 gets its NMI, vCPU 1 is a clear exit 3, and the audit
    trail has both outcomes."""
    vm = start_vm(vcpus=2)
    dead_tid = vm.vcpu(1).tid
    vm.command({"cmd": "pause"})
    vm.wait_event(lambda e: e.get("event") == "ack" and e.get("cmd") == "pause")
    _triple_fault_on_run(vm, 1)
    n = audit_mark()
    mark = vm.mark()
    run = Paused(tmp_path, "seized", "nmi", "--pid", vm.pid, "--vcpu", "all")
    paused_runs.append(run)
    run.wait_paused()
    vm.command({"cmd": "run"})
    ev = vm.wait_event(lambda e: e.get("event") == "exit", 10, since=mark)
    assert ev["vcpu"] == 1 and ev["reason"] == "SHUTDOWN", ev
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{vm.pid}/task/{dead_tid}"):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    r = run.release()
    assert_clean_error(r, ExitCode.NOT_FOUND, f"thread {dead_tid}", "vCPU 1", "the VMM runs on")
    vm.wait_event(lambda e: e.get("event") == "nmi" and e.get("vcpu") == 0, 10, since=mark)
    assert vm.alive()
    hb = heartbeat(vm, 0)
    assert hb["check_failures"] == 0 and hb["nmi_count"] == 1
    records = audit_since(n)
    assert [(x["vcpu_id"], x["outcome"]) for x in records] == [(0, "ok"), (1, "failed")], records


# ====================================================================== pid reuse
def pid_reuse_scenario() -> None:
    """Run as the init of a fresh pid namespace (see the test below); prints a JSON report.

    VM A is resolved by ``serrinj nmi --pid A``, which then waits for the VM's lock
    (held here, as another serrinj run would). Meanwhile A is killed, and VM B is
    started with the same pid (``ns_last_pid``), so that its vCPU thread even gets
    A's vCPU thread's tid. serrinj must notice the reuse and send nothing to B.
    """
    from serrinj.host import procfs
    from serrinj.ops import lock

    # not the start_vm fixture: this runs as a pid namespace's init, outside pytest, and
    # A must be gone (stopped here) before B is started with its pid
    def start() -> TestVmProcess:
        vm = TestVmProcess.start(vcpus=1, mode="halt")
        vm.wait_event(lambda e: e.get("event") == "guest-ready", 20)
        return vm

    a = start()
    a_pid, a_tid, a_start = a.pid, a.vcpu(0).tid, procfs.stat(a.pid).starttime
    report: Dict[str, Any] = {"a_pid": a_pid, "a_tid": a_tid}
    with lock.vm_lock(a_pid, a_start, "A", wait=1):
        cli = subprocess.Popen(
            [sys.executable, "-m", "serrinj", "nmi", "--pid", str(a_pid), "--vcpu", "0"],
            env={**os.environ, "SERRINJ_LOCK_WAIT": "60"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        lock_path = os.path.join(lock.lock_dir(), f"vm-{a_pid}-{a_start}.lock")
        deadline = time.monotonic() + 30
        while not any(  # serrinj has resolved the VM and waits for its lock
            os.path.realpath(f"/proc/{cli.pid}/fd/{fd}") == lock_path
            for fd in os.listdir(f"/proc/{cli.pid}/fd")
        ):
            assert time.monotonic() < deadline and cli.poll() is None, cli.communicate()
            time.sleep(0.01)
        os.kill(a_pid, signal.SIGKILL)
        a.stop()
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(a_pid - 1))
        b = start()
        report.update(b_pid=b.pid, b_tid=b.vcpu(0).tid)
    out, err = cli.communicate(timeout=60)
    report.update(rc=cli.returncode, stdout=out, stderr=err)
    report["b_nmi_count"] = heartbeat(b, 0)["nmi_count"]
    report["b_alive"] = b.alive()
    b.stop()
    print("REPORT " + json.dumps(report), flush=True)


def test_pid_reuse_between_discovery_and_attach_is_caught(tmp_path: Path) -> None:
    exe = need_tool("unshare", "util-linux")
    code = "from tests.test_fault_matrix import pid_reuse_scenario; pid_reuse_scenario()"
    n = audit_mark()
    proc = subprocess.Popen(
        [exe, "--pid", "--mount-proc", "--kill-child", sys.executable, "-c", code],
        cwd=ROOT,
        env=env_with_tests(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()  # --kill-child takes the whole namespace with it
            proc.communicate()
    line = next((x for x in out.splitlines() if x.startswith("REPORT ")), None)
    assert line is not None, (out, err)
    rep = json.loads(line[len("REPORT ") :])
    # the namespace really reused the pid, and even the vCPU thread's tid
    assert rep["b_pid"] == rep["a_pid"] and rep["b_tid"] == rep["a_tid"], rep
    r = Result(["nmi"], rep["rc"], rep["stdout"], rep["stderr"])
    assert_clean_error(r, ExitCode.NOT_FOUND, "pid was reused")
    assert rep["b_nmi_count"] == 0 and rep["b_alive"], rep
    (rec,) = audit_since(n)
    assert rec["outcome"] == "failed" and rec["error"]["kind"] == "target-gone", rec


# ====================================================================== restartable syscalls
#: x86_64 syscall numbers of what a --block-in vCPU thread blocks in
BLOCKED_IN = {
    # 219: restart_syscall, how the kernel resumes an interrupted timed wait
    "futex": {202, 219},
    "ppoll": {271},
    "nanosleep": {35, 219},
    "pipe": {0},
}


@pytest.mark.parametrize("kind", sorted(BLOCKED_IN))
def test_interrupted_restartable_syscalls_of_every_kind_in_the_vmm(
    start_vm: Callable[..., TestVmProcess], kind: str
) -> None:
    """The vCPU threads block in futex, ppoll, nanosleep or read(pipe) between runs
    (each interrupted by the engine's stop gets a different restart code: -512,
    -514, -516); the VMM checks every return value for a leaked restart code."""
    from serrinj.kvm import api
    from serrinj.target import attach as target
    from serrinj.target import discover

    vm = start_vm(vcpus=2, mode="futex", extra=["--block-in", kind, "--yield-ms", "20"])
    found = target.ensure_mapped(discover.find(pid=vm.pid), (0, 1))
    interrupted = 0
    for i in range(400):
        with target.attach(found, i % 2, (api.KVM_GET_VCPU_EVENTS,)) as (vc, rt):
            vc.get_events()
            assert rt.saved is not None
            nr, _args = rt.arch.entry_call(rt.saved)
            interrupted += nr in BLOCKED_IN[kind]
        assert rt.verified
    assert interrupted >= 100, f"only {interrupted} of 400 operations met the thread in {kind}"
    mark = vm.mark()
    for i in range(20):
        r = serrinj("nmi", "--json", "--pid", vm.pid, "--vcpu", i % 2, "--wait")
        assert r.rc == 0, r
        assert r.data["injections"][0]["registers_restored"] is True
    counters = assert_healthy(vm)  # no "error" event: no restart code ever leaked
    assert [counters[v]["nmi_count"] for v in (0, 1)] == [10, 10]
    assert len(guest_nmis(vm, mark)) == 20
    assert all(c["yields"] > 0 for c in counters.values())


def _naive_remote_getpid(pid: int, tid: int, kinds: Set[int]) -> bool:
    """A tracer that gets restarts wrong, built from the engine's ptrace primitives:
    it runs getpid in the thread, puts the registers back at its own syscall-exit
    stop and lets the thread run on from there (PTRACE_CONT), skipping the restart
    the kernel does in its signal path. Returns whether the thread was met blocked
    in one of ``kinds`` (nothing is changed otherwise)."""
    from serrinj.remote import ptrace
    from serrinj.remote.arch import host_arch
    from serrinj.remote.gadget import find_syscall_gadget

    arch = host_arch()

    def wait(kind: ptrace.StopKind) -> None:
        while True:
            stop = ptrace.wait_stop(tid, 5)
            assert stop is not None and stop.kind is not ptrace.StopKind.EXITED
            if stop.kind is kind:
                return
            sig = stop.signo if stop.kind is ptrace.StopKind.SIGNAL else 0
            (ptrace.resume_syscall if kind is ptrace.StopKind.SYSCALL else ptrace.cont)(tid, sig)

    ptrace.seize(tid)
    ptrace.interrupt(tid)
    wait(ptrace.StopKind.EVENT_STOP)
    saved = Registers.unpack(arch, ptrace.get_regset(tid, ptrace.NT_PRSTATUS, arch.regs_size))
    met = arch.entry_call(saved)[0] in kinds
    if met:
        gadget = find_syscall_gadget(pid, arch, avoid=(saved[arch.pc_reg],))
        call = arch.prepare_syscall(saved, gadget, arch.nr["getpid"], ())
        ptrace.set_regset(tid, ptrace.NT_PRSTATUS, call.pack())
        ptrace.resume_syscall(tid, 0)
        wait(ptrace.StopKind.SYSCALL)  # entry
        ptrace.resume_syscall(tid, 0)
        wait(ptrace.StopKind.SYSCALL)  # exit
        ptrace.set_regset(tid, ptrace.NT_PRSTATUS, saved.pack())
        ptrace.cont(tid, 0)  # the mistake: no stop in the signal path first
        time.sleep(0.2)
        ptrace.interrupt(tid)
        wait(ptrace.StopKind.EVENT_STOP)
    ptrace.detach(tid, 0)
    return met


@pytest.mark.parametrize("kind", ["pipe", "ppoll", "nanosleep"])
def test_the_vmm_would_see_a_naive_tracers_leaked_restart_code(
    start_vm: Callable[..., TestVmProcess], kind: str
) -> None:
    """The check above can fail: a tracer that skips the kernel's restart hands the
    VMM the raw restart code, and the test VM reports it as an error event."""
    vm = start_vm(vcpus=1, mode="futex", extra=["--block-in", kind, "--yield-ms", "50"])
    tid = vm.vcpu(0).tid
    # Bounded by time, not by attempts: an attempt that misses takes well under a
    # millisecond, and the guest needs to run on (to its next tick) before its
    # thread yields again.
    deadline = time.monotonic() + 10
    while not _naive_remote_getpid(vm.pid, tid, BLOCKED_IN[kind]):
        if time.monotonic() > deadline:
            pytest.fail(f"the vCPU thread was never met in {kind}")
        time.sleep(0.002)
    ev = vm.wait_event(lambda e: e.get("event") == "error", 10)
    assert ev["restart_code"] in (-512, -513, -514, -516), ev
    assert ev["vcpu"] == 0


# ====================================================================== sandboxed VMMs
@pytest.mark.parametrize("action", ["trap", "kill", "errno"])
def test_seccomp_filtered_vcpu_threads_through_the_cli(
    start_vm: Callable[..., TestVmProcess], action: str
) -> None:
    """A Firecracker-like filter on the vCPU threads answers the vCPU-event ioctls
    with SIGSYS, a kill or EPERM: status, nmi and mce are served from another
    thread of the VMM, which never meets its own filter."""
    vm = start_vm(vcpus=2, extra=["--seccomp", action])
    mark = vm.mark()
    r = serrinj("status", "--json", "--pid", vm.pid)
    assert r.rc == 0, r
    assert [v["seccomp_mode"] for v in r.data["vcpus"]] == [2, 2]
    r = serrinj("nmi", "--json", "--pid", vm.pid, "--vcpu", 1, "--wait")
    assert r.rc == 0, r
    assert r.data["injections"][0]["delivery"]["delivered"] is True
    for vid, preset, event in ((0, "uc", "mce"), (1, "corrected", "mce-poll")):
        r = serrinj(
            "mce", "--pid", vm.pid, "--vcpu", vid, "--bank", 2, "--preset", preset, "--wait"
        )
        assert r.rc == 0, r
        vm.wait_event(lambda e, v=vid, k=event: e.get("event") == k and e.get("vcpu") == v, 10)
    vm.wait_event(lambda e: e.get("event") == "nmi" and e.get("vcpu") == 1, 10, since=mark)
    counters = assert_healthy(vm)
    assert (counters[0]["mce_count"], counters[1]["nmi_count"], counters[1]["poll_count"]) == (
        1,
        1,
        1,
    )


def test_seccomp_filter_on_every_thread_refuses_everything_through_the_cli(
    start_vm: Callable[..., TestVmProcess],
) -> None:
    vm = start_vm(vcpus=2, extra=["--seccomp", "trap", "--seccomp-threads", "all"])
    n = audit_mark()
    for args in (
        ["status", "--pid", vm.pid],
        ["nmi", "--pid", vm.pid, "--vcpu", 0],
        ["mce", "--pid", vm.pid, "--vcpu", 1, "--bank", 1, "--preset", "uc"],
        ["mce", "--pid", vm.pid, "--vcpu", 0, "--bank", 1, "--preset", "ce", "--dry-run"],
    ):
        r = serrinj(*args)
        assert_clean_error(r, ExitCode.UNSUPPORTED, "TRAP", "no other thread", "nothing was sent")
    assert [(x["action"], x["outcome"]) for x in audit_since(n)] == [
        ("inject-nmi", "refused"),
        ("inject-mce", "refused"),
        ("inject-mce", "refused"),
    ]
    counters = assert_healthy(vm)
    assert all(c["nmi_count"] == c["mce_count"] == c["poll_count"] == 0 for c in counters.values())


# ====================================================================== /proc churn
CHURN = r"""
import os, random, sys, threading, time
from serrinj.vcpu.executor import LocalExecutor
from serrinj.kvm import api

ex = LocalExecutor()
deadline = time.monotonic() + float(sys.argv[1])
live = set()
made = 0
while time.monotonic() < deadline:
    while len(live) < 6:
        pid = os.fork()
        if pid == 0:
            try:
                kvm = os.open("/dev/kvm", os.O_RDWR)
                vm = ex.ioctl_int(kvm, api.KVM_CREATE_VM, 0)
                for i in range(random.randint(0, 2)):
                    ex.ioctl_int(vm, api.KVM_CREATE_VCPU, i)
                    threading.Thread(target=time.sleep, args=(0.05,), daemon=True).start()
                time.sleep(random.random() * 0.03)
            finally:
                os._exit(0)
        live.add(pid)
        made += 1
    pid, _ = os.wait()
    live.discard(pid)
for pid in live:
    os.waitpid(pid, 0)
print(made, flush=True)
"""


def test_list_while_vmms_come_and_go() -> None:
    """Processes holding KVM VM and vCPU fds start and exit all the time (their /proc
    entries vanish mid-scan): discovery and `serrinj list` never fail."""
    from serrinj.target import discover

    churn = subprocess.Popen(
        [sys.executable, "-c", CHURN, "12"], env=env_with_tests(), stdout=subprocess.PIPE, text=True
    )
    try:
        seen = scans = 0
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            vms = discover.scan()
            scans += 1
            seen += sum(1 for v in vms if v.pid != churn.pid and v.comm == "python")
        for _ in range(10):
            for args in (["list", "--json"], ["list"]):
                r = serrinj(*args)
                assert "Traceback" not in r.stderr, r
                if r.rc == ExitCode.PERMISSION:
                    # no VM alive at that instant, and some process serrinj may not
                    # inspect (pid 1 of a container can be one, even for root)
                    assert_clean_error(r, ExitCode.PERMISSION, "may not read the fds")
                else:
                    assert r.rc == 0, r
                    if "--json" in args:
                        assert isinstance(r.data["vms"], list), r
        out, _ = churn.communicate(timeout=30)
    finally:
        if churn.poll() is None:
            churn.kill()
            churn.communicate()
    assert churn.returncode == 0
    assert int(out) > 100, "the churn made too few VMs"
    assert seen > 50, f"only {seen} short-lived VMs seen in {scans} scans"


def test_test_vm_ends_on_sigterm_even_if_started_with_stop_signals_held() -> None:
    """TestVmProcess holds SIGINT/SIGTERM/SIGHUP while it forks the VMM, and a signal
    mask survives exec: the VMM must unblock them, or every stop() above would be
    a SIGKILL after a timeout and 'the VMM exits cleanly' would prove nothing."""
    vm = TestVmProcess.start(vcpus=1)
    try:
        with open(f"/proc/{vm.pid}/status") as f:
            blocked = int(next(x for x in f if x.startswith("SigBlk:")).split()[1], 16)
        assert not blocked & (1 << (signal.SIGTERM - 1)), f"SigBlk {blocked:#x}"
    finally:
        assert vm.stop() == 0  # SIGTERM did it, not the SIGKILL fallback


# ====================================================================== the audit trail
def _audited(n: int) -> List[tuple]:  # type: ignore[type-arg]
    return [
        (r["action"], r["outcome"], r["vcpu_id"], (r["error"] or {}).get("kind"))
        for r in audit_since(n)
    ]


def test_every_cli_injection_attempt_is_audited_with_its_outcome(
    start_vm: Callable[..., TestVmProcess], tmp_path: Path
) -> None:
    """Each command and each way it can be refused leaves exactly one record per
    attempt (per vCPU once a VM is resolved): ok, dry-run, refused, not-delivered."""
    from serrinj.kvm import arm64 as kvm_arm64
    from serrinj.ops import events

    vm = start_vm(vcpus=2)
    paused = start_vm(vcpus=1, extra=["--start-paused"], ready=False)
    pid = vm.pid
    saved = tmp_path / "events.json"
    cross = tmp_path / "arm64.json"
    cross.write_text(
        events.Snapshot("aarch64", [events.SavedVcpu(0, kvm_arm64.VcpuEvents().pack())]).dumps()
    )
    garbage = tmp_path / "garbage.json"
    garbage.write_text('{"schema": "serrinj-events/1", "arch": ')
    bad_campaign = tmp_path / "bad.toml"
    bad_campaign.write_text('[campaign]\nname = "x"\n[[step]]\nkind = "bogus"\n')
    cases: List[tuple] = [  # type: ignore[type-arg]
        # (argv, exit code, the records it must leave)
        (["nmi", "--pid", pid, "--vcpu", 1], 0, [("inject-nmi", "ok", 1, None)]),
        (["nmi", "--pid", pid, "--vcpu", "all", "--dry-run"], 0,
         [("inject-nmi", "dry-run", 0, None), ("inject-nmi", "dry-run", 1, None)]),
        (["nmi", "--pid", pid], 2, [("inject-nmi", "refused", None, "invalid-input")]),
        (["nmi", "--pid", pid, "--vcpu", 7], 3,
         [("inject-nmi", "refused", None, "target-not-found")]),
        (["nmi", "--pid", no_such_pid()], 3, [("inject-nmi", "refused", None, "target-not-found")]),
        (["nmi", "--bogus"], 2, [("inject-nmi", "refused", None, "invalid-input")]),
        (["nmi", "--pid", pid, "--vcpu", 0, "--wait", "-1"], 2,
         [("inject-nmi", "refused", None, "invalid-input")]),
        (["mce", "--pid", pid, "--vcpu", 0, "--bank", 2, "--preset", "uc", "--wait"], 0,
         [("inject-mce", "ok", 0, None)]),
        (["mce", "--pid", pid, "--vcpu", 1, "--bank", 1, "--preset", "ce", "--dry-run"], 0,
         [("inject-mce", "dry-run", 1, None)]),
        (["mce", "--pid", pid, "--vcpu", 0, "--bank", 40, "--preset", "ce"], 2,
         [("inject-mce", "refused", None, "invalid-input")]),
        (["mce", "--pid", pid, "--vcpu", 0, "--bank", 1, "--status", "val,bogus"], 2,
         [("inject-mce", "refused", None, "invalid-input")]),
        (["mce", "--pid", pid, "--vcpu", 0, "--preset", "ce"], 2,
         [("inject-mce", "refused", None, "invalid-input")]),
        (["mce", "--pid", paused.pid, "--bank", 1, "--preset", "uc-fatal"], 8,
         [("inject-mce", "refused", 0, "conflict")]),
        (["inject", "--pid", pid, "--vcpu", 0, "--severity", "ce"], 5,
         [("inject-serror", "refused", None, "unsupported")]),
        (["inject", "--pid", pid, "--vcpu", 0, "--ext-dabt"], 5,
         [("inject-ext-dabt", "refused", None, "unsupported")]),
        (["inject", "--esr", "0x2000011"], 2,
         [("inject-serror", "refused", None, "invalid-input")]),
        (["events", "save", "--pid", pid, "-o", saved], 0, []),
        (["events", "load", saved, "--pid", pid], 0,
         [("events-load", "ok", 0, None), ("events-load", "ok", 1, None)]),
        (["events", "load", garbage, "--pid", pid], 2,
         [("events-load", "refused", None, "invalid-input")]),
        (["events", "load", cross, "--pid", pid, "--vcpu", 0], 5,
         [("events-load", "refused", 0, "unsupported")]),
        (["run", bad_campaign, "--pid", pid], 2,
         [("campaign-run", "refused", None, "campaign-error")]),
        (["run", "--check-only", bad_campaign], 2, []),
        (["status", "--pid", pid], 0, []),
        (["list"], 0, []),
        (["esr", "decode", "0x1811"], 0, []),
    ]  # fmt: skip
    for argv, code, want in cases:
        n = audit_mark()
        r = serrinj(*argv)
        assert r.rc == code, r
        assert "Traceback" not in r.stderr, r
        assert _audited(n) == want, (argv, audit_since(n))
    # a refused attempt carries who, where and what was asked
    n = audit_mark()
    serrinj("nmi", "--pid", pid)
    (rec,) = audit_since(n)
    assert rec["request"]["argv"] == ["nmi", "--pid", str(pid)]
    assert rec["user"]["uid"] == os.getuid() and rec["serrinj_pid"] > 0
    assert rec["error"]["exit_code"] == ExitCode.USAGE
    # a fault still pending when --wait runs out: the VMM is stopped
    n = audit_mark()
    with frozen(pid):
        r = serrinj("nmi", "--pid", pid, "--vcpu", 0, "--wait", "0.2")
    assert r.rc == ExitCode.NOT_DELIVERED, r
    assert _audited(n) == [("inject-nmi", "not-delivered", 0, "not-delivered")]
    assert_healthy(vm)


def test_internal_errors_inside_a_use_case_are_audited_as_failed(
    start_vm: Callable[..., TestVmProcess],
) -> None:
    """Not only serrinj's own errors: anything that escapes a guarded use case."""
    from serrinj.ops import guard
    from serrinj.target import attach as target

    vm = start_vm(vcpus=2)
    tgt = target.resolve(pid=vm.pid, vcpu="all")

    @guard.guarded("inject-test", lambda: {"what": "test"})
    def broken(t: Any) -> List[Any]:
        out: List[Any] = guard.results()
        out.append(type("R", (), {"as_dict": lambda self: {"vcpu_id": 0}})())
        raise ZeroDivisionError("a bug")

    n = audit_mark()
    with pytest.raises(ZeroDivisionError):
        broken(tgt)
    assert _audited(n) == [
        ("inject-test", "ok", 0, None),
        ("inject-test", "failed", 1, "ZeroDivisionError"),
    ]


# ====================================================================== serrinj killed outright
def test_serrinj_sigkilled_before_changing_anything_leaves_the_vmm_running(
    start_vm: Callable[..., TestVmProcess], paused_runs: List[Paused], tmp_path: Path
) -> None:
    """SIGKILL cannot be caught: the kernel detaches the thread for the dead tracer.
    PTRACE_O_EXITKILL is never set, so the VMM lives on; held at `seized`, nothing
    of the thread had been changed. (Every later phase: tests/test_kill_safety.py.)"""
    vm = start_vm(vcpus=2, mode="spin")
    tid = vm.vcpu(0).tid
    with frozen(vm.pid):
        before = observe(vm.pid, tid)
        run = Paused(tmp_path, "seized", "nmi", "--pid", vm.pid, "--vcpu", 0)
        paused_runs.append(run)
        run.sigkill_when_paused()
        with open(f"/proc/{vm.pid}/task/{tid}/status") as f:
            assert "TracerPid:\t0\n" in f.read()
        after = observe(vm.pid, tid)
    assert after == before, before.diff(after)
    counters = assert_healthy(vm)
    assert counters[0]["nmi_count"] == 0
