"""Run the real ``serrinj`` command and keep what it did: the one run helper of the tests.

``run(*args)`` runs ``serrinj ARGS`` as a subprocess (the venv's script, else
``python -m serrinj``) and returns a :class:`Result`: the argv, the exit code,
stdout, stderr and, through :attr:`Result.data` / :attr:`Result.lines`, its JSON.

- ``debugfs=True`` runs it as ``unshare -m --propagation private sh -c
  'mount -t debugfs none /sys/kernel/debug && exec serrinj ...'``: the mount
  exists only in that namespace, so the host's own mounts (and every other
  process on it) never see it.
- ``without_debugfs=True`` runs it where debugfs is not mounted (see
  ``tests.conftest.without_debugfs``: a private namespace with it unmounted,
  when this test run has it mounted).

A command that outlives ``timeout`` is ended gently (SIGTERM, then SIGKILL):
serrinj acts on SIGTERM only once the VMM's thread is released.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

_VENV_SCRIPT = Path(sys.executable).with_name("serrinj")
SERRINJ: List[str] = (
    [str(_VENV_SCRIPT)] if _VENV_SCRIPT.exists() else [sys.executable, "-m", "serrinj"]
)
DEBUGFS = "/sys/kernel/debug"
_MOUNT_AND_EXEC = f'mount -t debugfs none {DEBUGFS} && exec "$@"'


@dataclass
class Result:
    """A finished ``serrinj`` command."""

    argv: List[str]
    rc: int
    stdout: str
    stderr: str

    @property
    def data(self) -> Dict[str, Any]:
        """stdout as the one JSON object it must be."""
        try:
            obj = json.loads(self.stdout)
        except ValueError as err:
            raise AssertionError(f"stdout is not one JSON object: {self}") from err
        assert isinstance(obj, dict), self
        return obj

    @property
    def lines(self) -> List[Any]:
        """stdout as JSON: one document, or JSON lines (``run --json``)."""
        try:
            return [json.loads(self.stdout)]
        except ValueError:
            return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]

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
    without_debugfs: bool = False,
    env: Optional[Mapping[str, str]] = None,
    inherit_env: bool = True,
    timeout: float = 60.0,
    cwd: Optional[str] = None,
    prefix: Sequence[str] = (),
    serrinj: Sequence[str] = (),
) -> Result:
    """Run ``[PREFIX] serrinj ARGS``.

    ``env`` is added to this process's environment (with ``inherit_env=False``, it
    is the whole environment). ``prefix`` is a command that runs the rest (``setpriv
    ...``, ``sudo -n``, ``strace -o FILE``); ``serrinj`` replaces the command that is
    serrinj (:data:`SERRINJ`), e.g. ``python -m serrinj`` from another PYTHONPATH.
    """
    argv = [str(a) for a in args]
    command = [*prefix, *(serrinj or SERRINJ), *argv]
    if debugfs:
        command = [*debugfs_prefix(), *command]
    elif without_debugfs:
        from tests.conftest import without_debugfs as unmounted

        command = unmounted(command)
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**(os.environ if inherit_env else {}), **(env or {})},
        cwd=cwd,
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
