"""Spawn and end test target processes by pid, never by name."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from typing import List, Optional

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
