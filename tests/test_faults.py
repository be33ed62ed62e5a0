"""Faults in the middle of an operation: serrinj is signalled, or the target dies.

The engine's phase observer, installed by the test-only launcher
``tests.helpers.paused_serrinj``, holds the operation at an exact phase while
the test strikes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator, Tuple

import pytest

from serrinj.remote import RemoteThread
from tests.helpers.paused import paused_argv
from tests.helpers.procs import Workload, wait_stopped

pytestmark = pytest.mark.root
ROOT = Path(__file__).resolve().parent.parent
PHASES = ["seized", "borrowed", "syscall-done"]


@pytest.fixture
def target() -> Iterator[Workload]:
    w = Workload("futex")
    try:
        yield w
    finally:
        w.stop()


def _driver(w: Workload, phase: str, marker: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [
            *paused_argv(phase, marker, "--script", str(ROOT / "tests/helpers/driver.py")),
            str(w.pid),
            str(w.tid),
        ],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 10
    while not marker.exists():
        assert time.monotonic() < deadline, "the driver never reached the pause point"
        time.sleep(0.01)
    return proc


def _finish(proc: subprocess.Popen[str]) -> Tuple[int, str]:
    out, _ = proc.communicate(timeout=20)
    return proc.returncode, out


def _snapshot(w: Workload) -> object:
    with RemoteThread(w.pid, w.tid) as t:
        return t.saved


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_serrinj_mid_operation_restores_first(
    target: Workload, tmp_path: Path, phase: str, sig: int
) -> None:
    marker = tmp_path / "pause"
    os.kill(target.pid, signal.SIGSTOP)  # freeze the target so its registers can be compared
    try:
        wait_stopped(target.pid)
        before = _snapshot(target)
        proc = _driver(target, phase, marker)
        os.kill(proc.pid, sig)
        time.sleep(0.1)
        marker.unlink()
        code, out = _finish(proc)
        after = _snapshot(target)
    finally:
        os.kill(target.pid, signal.SIGCONT)
    assert code == (130 if sig == signal.SIGINT else 143), out
    # The signal was acted on only after the thread was restored and detached.
    assert "verified True" in out
    assert after == before
    beats = target.beats(3)
    assert beats[-1] > beats[0]
    assert target.bad_lines() == []


@pytest.mark.parametrize("phase", PHASES)
def test_target_killed_mid_operation(target: Workload, tmp_path: Path, phase: str) -> None:
    marker = tmp_path / "pause"
    proc = _driver(target, phase, marker)
    os.kill(target.pid, signal.SIGKILL)
    time.sleep(0.1)
    marker.unlink()
    code, out = _finish(proc)
    # The tracer (the driver) had to collect the dead thread before its parent can.
    target.proc.wait(timeout=5)
    assert code == 3, out
    assert "exited" in out
