"""``serrinj ARGS`` held at one phase of its engine, for tests that strike meanwhile.

:class:`Paused` runs the test-only launcher ``tests.helpers.paused_serrinj``;
the ``paused_runs`` fixture of ``tests/conftest.py`` ends every run a test
leaves behind, by its pid.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from tests.helpers.serrinj_cli import Result

ROOT = Path(__file__).resolve().parent.parent.parent


def env_with_tests(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """This environment, with the checkout on PYTHONPATH (``python -m tests.helpers...``)."""
    return {**os.environ, "PYTHONPATH": str(ROOT), **(extra or {})}


def paused_argv(phase: str, marker: Path, *options: str) -> List[str]:
    """The command line of the launcher ``tests.helpers.paused_serrinj`` holding the
    engine at ``phase`` (``marker`` appears while it waits), with its other
    ``options``, up to the ``--`` that the serrinj arguments follow."""
    return [
        sys.executable,
        "-m",
        "tests.helpers.paused_serrinj",
        "--pause-at",
        phase,
        "--marker",
        str(marker),
        *options,
        "--",
    ]


class Paused:
    """``serrinj ARGS`` held at an engine phase (``tests.helpers.paused_serrinj``).

    The engine pauses at that phase of *every* remote syscall after the first
    ``skip``; :meth:`release` lets it go on and keeps releasing later pauses until
    the command ends.
    """

    def __init__(self, tmp: Path, phase: str, *args: object, skip: int = 0, **popen: Any) -> None:
        self.marker = tmp / f"pause-{phase}-{time.monotonic_ns()}"
        self.argv = [str(a) for a in args]
        self.proc = subprocess.Popen(
            [*paused_argv(phase, self.marker, "--skip", str(skip)), *self.argv],
            env=env_with_tests(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            **popen,
        )

    def wait_paused(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.marker.exists():
            if self.proc.poll() is not None:
                out, err = self.proc.communicate()
                raise AssertionError(
                    f"serrinj ended before pausing: {self.proc.returncode}\n{out}\n{err}"
                )
            assert time.monotonic() < deadline, "serrinj never reached the pause point"
            time.sleep(0.005)

    def release(self, timeout: float = 60.0) -> Result:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            with contextlib.suppress(FileNotFoundError):
                self.marker.unlink()
            assert time.monotonic() < deadline, "serrinj did not finish"
            time.sleep(0.005)
        out, err = self.proc.communicate()
        return Result(self.argv, self.proc.returncode, out, err)

    def sigkill_when_paused(self) -> None:
        """Wait until serrinj is held, SIGKILL it there, and clear its marker."""
        self.wait_paused()
        self.proc.kill()
        self.proc.wait(10)
        self.marker.unlink()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()
