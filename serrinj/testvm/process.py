"""Run the test VM as a separate process and talk to it (tests, benchmarks, the arm64 lab).

::

    with TestVmProcess.start(vcpus=2, mode="halt") as vm:
        mark = vm.mark()
        vm.command({"cmd": "nmi", "vcpu": 1})
        vm.wait_event(lambda e: e["event"] == "nmi" and e["vcpu"] == 1, since=mark)

The child is ``python -m serrinj.testvm``; its stdout (JSON events) and stderr
are read by background threads, so the child never blocks on a full pipe.
:meth:`TestVmProcess.stop` ends it by its pid only (SIGTERM, then SIGKILL
after a timeout) and reaps it; leaving the ``with`` block calls it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import IO, Any, Callable, Dict, List, Optional, Sequence, Tuple

__all__ = ["TestVmError", "TestVmProcess", "VcpuInfo", "thread_comm", "thread_syscall"]

Event = Dict[str, Any]


class TestVmError(RuntimeError):
    """The test VM did not start, died, or did not report what was awaited."""

    __test__ = False


@dataclass(frozen=True)
class VcpuInfo:
    """One vCPU of the running test VM, as its ``ready`` event describes it."""

    vcpu_id: int
    tid: int
    fd: int
    thread_name: str
    #: every fd of this vCPU in the VMM (``fd`` first; Firecracker's profile adds a dup)
    fds: Tuple[int, ...] = ()
    #: its KVM_GET_STATS_FD fd (QEMU's profile), or None
    stats_fd: Optional[int] = None


class TestVmProcess:
    """A running ``python -m serrinj.testvm`` child process."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, popen: subprocess.Popen[str], argv: Sequence[str]) -> None:
        self._popen = popen
        self.argv = list(argv)
        self._events: List[Event] = []
        self._stderr: List[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self._write_lock = threading.Lock()
        self.ready: Event = {}
        assert popen.stdout is not None and popen.stderr is not None
        self._readers = [
            threading.Thread(target=self._read_stdout, args=(popen.stdout,), daemon=True),
            threading.Thread(target=self._read_stderr, args=(popen.stderr,), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    # ----------------------------------------------------------------- start

    @classmethod
    def start(
        cls,
        arch: Optional[str] = None,
        vcpus: int = 1,
        mode: str = "halt",
        extra_args: Sequence[str] = (),
        timeout: float = 30.0,
        python: str = sys.executable,
        env: Optional[Dict[str, str]] = None,
        own_process_group: bool = False,
    ) -> TestVmProcess:
        """Spawn the test VM and wait for its ``ready`` event.

        With ``own_process_group`` the VM leads a process group of its own in
        this session, as a shell puts a job: the job-control stop signals
        (SIGTSTP, SIGTTIN, SIGTTOU) stop it then whatever process group the
        caller runs in. The kernel discards those signals for a member of an
        orphaned process group, which the caller's group may be (a background
        job whose shell has gone, a CI runner).
        """
        argv = [python, "-m", "serrinj.testvm", "--vcpus", str(vcpus), "--mode", mode]
        if arch is not None:
            argv += ["--arch", arch]
        argv += list(extra_args)
        # A Ctrl-C landing inside Popen would leave a child nobody owns: hold the
        # stop signals until the child is created and owned by ``vm``.
        held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        on_main = threading.current_thread() is threading.main_thread()
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, held) if on_main else None
        vm: Optional[TestVmProcess] = None
        try:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                bufsize=1,
                env=env,
                close_fds=True,
                # not process_group=0: that is Python 3.11+
                preexec_fn=os.setpgrp if own_process_group else None,
            )
            vm = cls(popen, argv)
        finally:
            if old_mask is not None:
                try:
                    signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
                except BaseException:
                    if vm is not None:
                        vm.stop()
                    raise
        try:
            vm.ready = vm.wait_event(lambda e: e.get("event") == "ready", timeout)
        except BaseException:
            vm.stop()
            raise
        return vm

    # ----------------------------------------------------------------- readers

    def _read_stdout(self, stream: IO[str]) -> None:
        for line in stream:
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "unparsed", "line": line}
            if not isinstance(event, dict):
                event = {"event": "unparsed", "line": line}
            event.setdefault("_t", time.monotonic())
            with self._cond:
                self._events.append(event)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def _read_stderr(self, stream: IO[str]) -> None:
        for line in stream:
            with self._cond:
                self._stderr.append(line.rstrip("\n"))
                del self._stderr[:-200]

    # ----------------------------------------------------------------- queries

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def vcpus(self) -> List[VcpuInfo]:
        """The vCPUs from the ``ready`` event."""
        return [
            VcpuInfo(
                v["vcpu_id"],
                v["tid"],
                v["fd"],
                v.get("thread_name", ""),
                tuple(v.get("fds") or (v["fd"],)),
                v.get("stats_fd"),
            )
            for v in self.ready.get("vcpus", [])
        ]

    @property
    def threads(self) -> List[Dict[str, Any]]:
        """The profile's other threads (``name``, ``tid``, ``filters``) from ``ready``."""
        return list(self.ready.get("threads", []))

    def sigsys_count(self, timeout: float = 10.0) -> int:
        """How many seccomp traps (SIGSYS) the VMM has taken, asked over stdin."""
        mark = self.mark()
        self.command({"cmd": "sigsys"})
        return int(self.wait_event(lambda e: e["event"] == "sigsys-count", timeout, mark)["count"])

    def vcpu(self, vcpu_id: int) -> VcpuInfo:
        for info in self.vcpus:
            if info.vcpu_id == vcpu_id:
                return info
        raise KeyError(f"the test VM has no vCPU {vcpu_id}")

    @property
    def events_seen(self) -> List[Event]:
        """Every event received so far (a copy; ``_t`` is the monotonic arrival time)."""
        with self._cond:
            return list(self._events)

    @property
    def stderr_lines(self) -> List[str]:
        with self._cond:
            return list(self._stderr)

    def mark(self) -> int:
        """The number of events seen so far, for ``wait_event(..., since=mark)``."""
        with self._cond:
            return len(self._events)

    def alive(self) -> bool:
        return self._popen.poll() is None

    @property
    def returncode(self) -> Optional[int]:
        return self._popen.poll()

    def wait_event(
        self, predicate: Callable[[Event], bool], timeout: float = 10.0, since: int = 0
    ) -> Event:
        """The first event at index >= ``since`` matching ``predicate``; waits up to ``timeout``."""
        deadline = time.monotonic() + timeout
        index = since
        with self._cond:
            while True:
                while index < len(self._events):
                    event = self._events[index]
                    index += 1
                    if predicate(event):
                        return event
                if self._eof:
                    raise TestVmError(self._describe("the test VM exited before the event came"))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TestVmError(self._describe(f"no matching event within {timeout} s"))
                self._cond.wait(left)

    def _describe(self, what: str) -> str:
        recent = [json.dumps({k: v for k, v in e.items() if k != "_t"}) for e in self._events[-8:]]
        lines = [f"{what} (pid {self.pid}, returncode {self._popen.poll()})"]
        lines += ["  recent events:"] + [f"    {r}" for r in recent]
        lines += ["  stderr:"] + [f"    {s}" for s in self._stderr[-20:]]
        return "\n".join(lines)

    # ----------------------------------------------------------------- control

    def command(self, cmd: Dict[str, Any]) -> None:
        """Send one command line to the VMM's stdin."""
        stdin = self._popen.stdin
        if stdin is None or stdin.closed:
            raise TestVmError("the test VM's stdin is closed")
        with self._write_lock:
            try:
                stdin.write(json.dumps(cmd) + "\n")
                stdin.flush()
            except (BrokenPipeError, ValueError) as err:
                raise TestVmError(self._describe(f"cannot send {cmd}: {err}")) from err

    def stop(self, timeout: float = 5.0) -> Optional[int]:
        """End the child by pid (SIGTERM, then SIGKILL after ``timeout``) and reap it."""
        popen = self._popen
        if popen.poll() is None:
            try:
                popen.terminate()
                popen.wait(timeout)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait(timeout)
        for stream in (popen.stdin, popen.stdout, popen.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        for reader in self._readers:
            reader.join(timeout)
        return popen.returncode

    def wait_exit(self, timeout: float = 10.0) -> int:
        """Wait for the child to exit by itself (e.g. after ``quit``); returns its status."""
        code = self._popen.wait(timeout)
        for reader in self._readers:
            reader.join(timeout)
        return code

    def __enter__(self) -> TestVmProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def thread_syscall(pid: int, tid: int) -> str:
    """``/proc/PID/task/TID/syscall`` (e.g. ``16 0x7 0xae80 ...`` or ``running``)."""
    with open(f"/proc/{pid}/task/{tid}/syscall") as f:
        return f.read().strip()


def thread_comm(pid: int, tid: int) -> str:
    """``/proc/PID/task/TID/comm``: the thread's name."""
    with open(f"/proc/{pid}/task/{tid}/comm") as f:
        return f.read().strip()
