"""A real QEMU (x86_64, -accel kvm) booting serrinj's firmware guest, for the benchmarks.

The guest prints what it observes on COM1 (QEMU's stdout with -nographic).
QEMU gets two QMP monitors: one this process keeps open, and one left free
for a fresh client process per command (a QMP socket serves one client at a
time). :meth:`Qemu.stop` ends QEMU by its pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Any, Dict, List, Optional

__all__ = ["QMP_CLIENT", "Qemu", "build_firmware"]

#: A minimal QMP client run as a fresh process per HMP command:
#: ``python -I -S -c QMP_CLIENT SOCKET 'COMMAND LINE'``.
QMP_CLIENT = """\
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile("rw")
f.readline()
for req in ({"execute": "qmp_capabilities"},
            {"execute": "human-monitor-command", "arguments": {"command-line": sys.argv[2]}}):
    f.write(json.dumps(req) + "\\n")
    f.flush()
    while True:
        m = json.loads(f.readline())
        if "return" in m or "error" in m:
            break
    if "error" in m:
        sys.exit(m["error"].get("desc", "QMP error"))
sys.stdout.write(m["return"])
"""


def build_firmware(path: str) -> str:
    """Build the firmware guest image (``python -m serrinj.testvm.firmware_x86``)."""
    subprocess.run(
        [sys.executable, "-m", "serrinj.testvm.firmware_x86", "-o", path],
        check=True,
        capture_output=True,
    )
    return path


class Qemu:
    """A QEMU process booting the firmware: serial lines in, QMP commands out."""

    def __init__(self, workdir: str, image: str, name: str, smp: int = 2) -> None:
        self.name = name
        self.qmp_path = os.path.join(workdir, f"qmp-{name}.sock")
        self.qmp_free_path = os.path.join(workdir, f"qmp-{name}-free.sock")
        self.stderr_path = os.path.join(workdir, f"qemu-{name}.stderr")
        self.argv = [
            "qemu-system-x86_64", "-accel", "kvm", "-bios", image, "-nographic",
            "-nic", "none", "-smp", str(smp), "-m", "32",
            "-name", f"guest={name},debug-threads=on",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-qmp", f"unix:{self.qmp_free_path},server=on,wait=off",
        ]  # fmt: skip
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr
        )
        self.pid = self.proc.pid
        self.lines: List[str] = []
        self._cond = threading.Condition()
        assert self.proc.stdout is not None
        self._reader = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)
        self._reader.start()
        self._sock: Optional[socket.socket] = None
        self._qmp: Optional[IO[str]] = None

    def _read(self, stream: IO[bytes]) -> None:
        for raw in stream:
            line = raw.decode(errors="replace").strip()
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def mark(self) -> int:
        with self._cond:
            return len(self.lines)

    def wait_line(self, prefix: str, timeout: float = 20.0, since: int = 0) -> str:
        """The first serial line at index >= ``since`` starting with ``prefix``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[since:]:
                    if line.startswith(prefix):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    with open(self.stderr_path, errors="replace") as f:
                        err = f.read()[-1000:]
                    raise RuntimeError(
                        f"QEMU printed no {prefix!r} (returncode {self.proc.poll()});"
                        f" last lines {self.lines[-5:]}; stderr {err}"
                    )
                self._cond.wait(left)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def qmp(self, command: str, **arguments: Any) -> Any:
        """One QMP command over the connection this process keeps."""
        if self._qmp is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            deadline = time.monotonic() + 10
            while True:
                try:
                    sock.connect(self.qmp_path)
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    if time.monotonic() > deadline:
                        sock.close()
                        raise
                    time.sleep(0.05)
            self._sock = sock
            self._qmp = sock.makefile("rw")
            json.loads(self._qmp.readline())
            self._execute({"execute": "qmp_capabilities"})
        request: Dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        return self._execute(request)

    def hmp(self, command_line: str) -> str:
        return str(self.qmp("human-monitor-command", **{"command-line": command_line}))

    def _execute(self, request: Dict[str, Any]) -> Any:
        assert self._qmp is not None
        self._qmp.write(json.dumps(request) + "\n")
        self._qmp.flush()
        while True:
            message = json.loads(self._qmp.readline())
            if "error" in message:
                raise RuntimeError(f"QMP {request}: {message['error']}")
            if "return" in message:
                return message["return"]

    def stop(self) -> None:
        """End QEMU by its pid (quit over QMP first), reap it, close everything."""
        try:
            if self._qmp is not None and self.alive():
                with contextlib.suppress(OSError):
                    self._qmp.write(json.dumps({"execute": "quit"}) + "\n")
                    self._qmp.flush()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
        finally:
            for closable in (self._qmp, self._sock, self.proc.stdin, self.proc.stdout):
                if closable is not None:
                    with contextlib.suppress(OSError):
                        closable.close()
            self._stderr.close()
            self._reader.join(5)
