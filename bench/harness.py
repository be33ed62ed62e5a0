"""Running things to measure: timed child processes, the test VM, CPU pinning.

Everything started here is ended by its pid (never by name) in ``finally``
blocks; :class:`Context` keeps the list, so even an exception or Ctrl-C
leaves no test VM, QEMU or gdb behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from serrinj.testvm.process import TestVmProcess

__all__ = ["CmdResult", "Context", "pin_test_vm", "run_cmd"]


@dataclass(frozen=True)
class CmdResult:
    """One finished child process: wall time from spawn to reaped.

    ``maxrss_kb`` is the kernel's ``ru_maxrss``, which for a child of a large
    process is inflated by the parent's size; use :func:`peak_rss_kb` for RSS.
    """

    argv: Sequence[str]
    seconds: float
    returncode: int
    stdout: str
    stderr: str
    maxrss_kb: int


def run_cmd(
    argv: Sequence[str],
    env: Optional[Mapping[str, str]] = None,
    timeout: float = 60.0,
    cwd: Optional[str] = None,
) -> CmdResult:
    """Run ``argv`` to completion; time it (spawn to reap) and take its peak RSS.

    Output goes to temporary files rather than pipes, so no reader thread
    competes with the child for the CPU while it is timed.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            list(argv), stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, cwd=cwd
        )
        deadline = t0 + timeout
        try:
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid == proc.pid:
                    break
                if time.perf_counter() > deadline:
                    raise subprocess.TimeoutExpired(list(argv), timeout)
                time.sleep(0.0002)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(proc.pid, 0)
            proc.returncode = -9
            raise
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return CmdResult(
            argv=list(argv),
            seconds=seconds,
            returncode=proc.returncode,
            stdout=out.read().decode(errors="replace"),
            stderr=err.read().decode(errors="replace"),
            maxrss_kb=int(usage.ru_maxrss),
        )


#: Forks, execs argv[1:] with its output discarded, and prints the child's peak RSS.
_RSS_WRAPPER = """\
import os, resource, sys
pid = os.fork()
if pid == 0:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    try:
        os.execvp(sys.argv[1], sys.argv[1:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
print(usage.ru_maxrss, os.waitstatus_to_exitcode(status))
"""


def peak_rss_kb(argv: Sequence[str], env: Optional[Mapping[str, str]] = None) -> Tuple[int, int]:
    """``(peak RSS in KiB, exit code)`` of ``argv``.

    A child's ``ru_maxrss`` includes the high-water mark of the memory it was
    forked from (Linux carries it across exec), so a child of this process
    would report at least this process's size. The child is therefore forked
    from a bare ``python -I -S`` (about 8 MiB), which is below anything measured.
    """
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _RSS_WRAPPER, *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    rss, code = proc.stdout.split()
    return int(rss), int(code)


@dataclass
class Context:
    """Shared settings of one ``make bench`` run, and what it must clean up."""

    scale: float = 1.0
    workdir: str = ""
    env: Dict[str, str] = field(default_factory=dict)
    started: List[subprocess.Popen] = field(default_factory=list)  # type: ignore[type-arg]
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    notes: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.workdir:
            self.workdir = self.stack.enter_context(tempfile.TemporaryDirectory(prefix="srjb-"))
        env = dict(os.environ)
        # Measure serrinj as installed: with compiled bytecode cached (pip
        # writes it at install time); PYTHONDONTWRITEBYTECODE would make every
        # run compile its modules again.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["SERRINJ_AUDIT_LOG"] = os.path.join(self.workdir, "audit.jsonl")
        env["SERRINJ_LOCK_DIR"] = os.path.join(self.workdir, "locks")
        env.setdefault("NO_COLOR", "1")
        self.env = env
        # the in-process (library) measurements audit and lock in the same place
        os.environ["SERRINJ_AUDIT_LOG"] = env["SERRINJ_AUDIT_LOG"]
        os.environ["SERRINJ_LOCK_DIR"] = env["SERRINJ_LOCK_DIR"]

    def rounds(self, n: int, minimum: int = 3) -> int:
        return max(minimum, round(n * self.scale))

    @property
    def python(self) -> str:
        return sys.executable

    @property
    def serrinj(self) -> List[str]:
        """The ``serrinj`` console script next to this Python (as a user runs it)."""
        script = os.path.join(os.path.dirname(sys.executable), "serrinj")
        if os.access(script, os.X_OK):
            return [script]
        found = shutil.which("serrinj")
        return [found] if found else [sys.executable, "-m", "serrinj"]

    def progress(self, message: str) -> None:
        print(f"bench: {message}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def test_vm(
        self, vcpus: int = 2, mode: str = "halt", extra_args: Sequence[str] = ()
    ) -> Iterator[TestVmProcess]:
        """The built-in test VM in its own process, its guest ready; ended by pid."""
        vm = TestVmProcess.start(vcpus=vcpus, mode=mode, env=self.env, extra_args=extra_args)
        try:
            vm.wait_event(lambda e: e.get("event") == "guest-ready", timeout=30)
            yield vm
        finally:
            vm.stop()

    def close(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
        self.stack.close()


def pin_test_vm(
    vm: TestVmProcess, quiet_vcpu: int, quiet_cpu: int, other_cpus: Sequence[int]
) -> None:
    """Give vCPU ``quiet_vcpu``'s thread CPU ``quiet_cpu`` alone; every other thread
    of the VMM (and this process and its children) the ``other_cpus``.

    On a 2-core host this keeps the injector and the VMM's other threads from
    competing with the measured vCPU for its core, so what the guest sees is
    the injection and not the host scheduler.
    """
    others = set(other_cpus)
    quiet_tid = vm.vcpu(quiet_vcpu).tid
    for name in os.listdir(f"/proc/{vm.pid}/task"):
        tid = int(name)
        with contextlib.suppress(OSError):
            os.sched_setaffinity(tid, {quiet_cpu} if tid == quiet_tid else others)
    os.sched_setaffinity(0, others)


def unpin(vm: Optional[TestVmProcess] = None) -> None:
    """Let this process (and the VMM's threads) run anywhere again."""
    every = set(range(os.cpu_count() or 1))
    os.sched_setaffinity(0, every)
    if vm is not None and vm.alive():
        for name in os.listdir(f"/proc/{vm.pid}/task"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(name), every)
