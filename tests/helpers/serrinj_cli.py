"""Run the real ``serrinj`` command, optionally with debugfs mounted in a private mount namespace.

``run(..., debugfs=True)`` runs it as ``unshare -m --propagation private sh -c
'mount -t debugfs none /sys/kernel/debug && exec serrinj ...'``: the mount exists
only in that namespace, so the host's own mounts (and every other process on it)
never see it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

_VENV_SCRIPT = Path(sys.executable).with_name("serrinj")
SERRINJ: List[str] = (
    [str(_VENV_SCRIPT)] if _VENV_SCRIPT.exists() else [sys.executable, "-m", "serrinj"]
)
DEBUGFS = "/sys/kernel/debug"
_MOUNT_AND_EXEC = f'mount -t debugfs none {DEBUGFS} && exec "$@"'


@dataclass
class Result:
    argv: List[str]
    rc: int
    stdout: str
    stderr: str

    @property
    def data(self) -> Dict[str, Any]:
        try:
            obj = json.loads(self.stdout)
        except ValueError as err:
            raise AssertionError(f"stdout is not one JSON object: {self}") from err
        assert isinstance(obj, dict)
        return obj

    def __str__(self) -> str:
        return (
            f"serrinj {' '.join(self.argv)} -> {self.rc}\n"
            f"--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"
        )


def debugfs_prefix() -> List[str]:
    """The command prefix that mounts debugfs in a private mount namespace, then execs."""
    unshare = shutil.which("unshare")
    assert unshare is not None, "unshare (util-linux) is missing"
    return [unshare, "-m", "--propagation", "private", "sh", "-c", _MOUNT_AND_EXEC, "sh"]


def run(
    *args: object,
    debugfs: bool = False,
    env: Optional[Dict[str, str]] = None,
    timeout: float = 60.0,
) -> Result:
    """Run ``serrinj ARGS``; with ``debugfs`` inside a private namespace that has it mounted."""
    argv = [str(a) for a in args]
    prefix = debugfs_prefix() if debugfs else []
    proc = subprocess.Popen(
        [*prefix, *SERRINJ, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM first: serrinj acts on it only once the VMM's thread is released;
        # a SIGKILL while it holds borrowed registers could crash the VMM
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        err += f"\n(the test ended serrinj after {timeout} s)"
    return Result(argv, proc.returncode, out, err)
