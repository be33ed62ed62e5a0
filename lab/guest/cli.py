"""serrinj's command line as a user runs it: ``python3 -m serrinj --json ...``, its own process.

The lab's CLI tests go through this one function, so every check is on what
the command printed (one JSON object, or one per line for ``run --json``) and
its exit code, never on serrinj's internals::

    r = serrinj("inject", "--pid", str(pid), "--vcpu", "0", "--esr", "0x1811")
    assert r.rc == 0, r
    inj = r.data["injections"][0]
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

#: generous: a CLI call in the emulated host takes 1-5 s
TIMEOUT_S = 120


@dataclass(frozen=True)
class CliResult:
    """One finished ``serrinj`` command."""

    args: List[str]
    rc: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def data(self) -> Any:
        """The JSON object on stdout (``None`` when stdout is empty or not JSON)."""
        try:
            return json.loads(self.stdout) if self.stdout.strip() else None
        except ValueError:
            return None

    @property
    def lines(self) -> List[Any]:
        """stdout as JSON lines (``serrinj --json run`` prints one object per event)."""
        return [json.loads(x) for x in self.stdout.splitlines() if x.strip()]

    @property
    def error(self) -> Dict[str, Any]:
        """The ``error`` object of a failed command (``{}`` if there is none)."""
        data = self.data
        if data is None:  # JSON lines (``run``): the error is the last one
            try:
                data = self.lines[-1] if self.lines else None
            except ValueError:
                data = None
        return dict(data.get("error") or {}) if isinstance(data, dict) else {}

    def __str__(self) -> str:
        return (
            f"serrinj {' '.join(self.args)} -> rc={self.rc} in {self.seconds:.2f} s\n"
            f"stdout: {self.stdout[-3000:]}\nstderr: {self.stderr[-3000:]}"
        )


def serrinj(*args: str, json_output: bool = True, timeout: Optional[float] = None) -> CliResult:
    """Run ``python3 -m serrinj [--json] ARGS`` and wait for it."""
    argv = ["--json", *args] if json_output else list(args)
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "serrinj", *argv],
        capture_output=True,
        text=True,
        timeout=timeout or TIMEOUT_S,
    )
    took = time.monotonic() - t0
    result = CliResult(argv, proc.returncode, proc.stdout, proc.stderr, took)
    # process chatter to stderr (shown for failures); stdout is for the test's observations
    print(f"serrinj {' '.join(argv)}: rc={proc.returncode} in {took:.2f} s", file=sys.stderr)
    return result
