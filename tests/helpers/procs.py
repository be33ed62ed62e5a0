"""Spawn and end test target processes by pid, never by name."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))


class Workload:
    """A workload.py child whose stdout lines are collected on a thread."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "workload.py"), kind],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: List[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        first = self.next_line(10)
        assert first and first.startswith("READY"), first
        _, pid, tid = first.split()
        self.pid, self.tid = int(pid), int(tid)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def next_line(self, timeout: float) -> Optional[str]:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            return None
        self.seen.append(line)
        return line

    def beats(self, n: int, timeout: float = 5.0) -> List[int]:
        """Wait for ``n`` heartbeats; returns the loop counters they carried."""
        out: List[int] = []
        while len(out) < n:
            line = self.next_line(timeout)
            assert line is not None, f"no heartbeat from {self.kind} workload"
            assert not line.startswith("BAD"), line
            if line.startswith("beat"):
                out.append(int(line.split()[1]))
        return out

    def bad_lines(self) -> List[str]:
        while self.next_line(0.05) is not None:
            pass
        return [s for s in self.seen if s.startswith("BAD")]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._reader.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def task_states(pid: int) -> Dict[int, str]:
    """tid -> the state letter of /proc/PID/task/TID/stat (``T`` a group stop, ``t`` a
    ptrace stop) of every thread of ``pid``."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        out[int(tid)] = raw[raw.rindex(")") + 2]
    return out


def wait_stopped(pid: int, timeout: float = 10.0) -> None:
    """Wait until every thread of ``pid`` is stopped (after a SIGSTOP: the signal is
    delivered, and each thread stops, asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        states = task_states(pid)
        if states and all(s in "Tt" for s in states.values()):
            return
        assert time.monotonic() < deadline, f"not every thread of {pid} stopped: {states}"
        time.sleep(0.002)
