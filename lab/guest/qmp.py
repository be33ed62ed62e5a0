"""A minimal QMP client: QEMU's own account of itself, the witness next to serrinj's.

Start QEMU with ``-qmp unix:PATH,server=on,wait=off`` and::

    with Qmp(PATH) as q:
        q.execute("query-status")["status"]          # "running"
        q.execute("query-cpus-fast")                  # cpu-index -> thread-id
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any, Dict


class QmpError(RuntimeError):
    """QEMU answered with an error, or did not answer."""


class Qmp:
    """One QMP session over a UNIX socket (capabilities negotiated on connect)."""

    def __init__(self, path: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise QmpError(f"no QMP socket at {path} after {timeout:.0f} s")
            time.sleep(0.02)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._sock.connect(path)
        self._file = self._sock.makefile("rwb")
        greeting = self._read()
        if "QMP" not in greeting:
            raise QmpError(f"not a QMP greeting: {greeting}")
        self.execute("qmp_capabilities")

    def _read(self) -> Dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise QmpError("QEMU closed the QMP connection")
        msg: Dict[str, Any] = json.loads(line)
        return msg

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run ``command`` and return its ``return`` value (events are skipped)."""
        req: Dict[str, Any] = {"execute": command}
        if arguments:
            req["arguments"] = arguments
        self._file.write(json.dumps(req).encode() + b"\n")
        self._file.flush()
        while True:
            msg = self._read()
            if "return" in msg:
                return msg["return"]
            if "error" in msg:
                raise QmpError(f"{command}: {msg['error']}")

    def cpu_threads(self) -> Dict[int, int]:
        """QEMU's own map of cpu-index (KVM's vCPU id on arm64) to thread id."""
        return {c["cpu-index"]: c["thread-id"] for c in self.execute("query-cpus-fast")}

    def close(self) -> None:
        try:
            self._file.close()
        finally:
            self._sock.close()

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
