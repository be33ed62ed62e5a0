"""A real QEMU (x86_64, -accel kvm) booting serrinj's firmware guest.

Serial lines come in on QEMU's stdout (``-nographic``); QMP goes over a unix
socket. :meth:`Qemu.stop` ends QEMU by its pid (``quit`` over QMP first) and
reaps it.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any, Dict, List, Optional, Sequence

import pytest


def build_firmware(out: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "serrinj.testvm.firmware_x86", "-o", str(out)], check=True
    )
    return out


class Qemu:
    """A QEMU process booting the firmware: serial lines in, QMP/HMP commands out."""

    def __init__(
        self,
        workdir: Path,
        image: Path,
        name: str,
        *,
        smp: int = 2,
        debug_threads: bool = True,
        extra: Sequence[str] = (),
    ) -> None:
        self.qmp_path = workdir / f"qmp-{name}.sock"
        self.stderr_path = workdir / f"qemu-{name}.stderr"
        name_arg = f"guest={name},debug-threads=on" if debug_threads else f"guest={name}"
        self.name = name
        self.argv = [
            "qemu-system-x86_64", "-accel", "kvm", "-bios", str(image), "-nographic",
            "-nic", "none", "-smp", str(smp), "-m", "32", "-name", name_arg,
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off", *extra,
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
        self._qmp: Any = None
        self._sock: Optional[socket.socket] = None

    def _read(self, stream: IO[bytes]) -> None:
        for raw in stream:
            line = raw.decode(errors="replace").strip()
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()

    def mark(self) -> int:
        with self._cond:
            return len(self.lines)

    def wait_line(self, text: str, timeout: float = 20.0, since: int = 0) -> str:
        """The first serial line at index >= ``since`` equal to ``text`` (or starting
        with it when ``text`` ends in ``*``)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[since:]:
                    if line == text or (text.endswith("*") and line.startswith(text[:-1])):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(
                        f"no serial line {text!r} (QEMU returncode {self.proc.poll()}); "
                        f"serial so far: {self.lines[-20:]}; stderr: "
                        f"{self.stderr_path.read_text(errors='replace')[-2000:]}"
                    )
                self._cond.wait(left)

    def lines_since(self, since: int) -> List[str]:
        with self._cond:
            return list(self.lines[since:])

    def send_serial(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def ping(self, timeout: float = 10.0) -> str:
        """Send ``p`` on the serial port; the guest answers ``pong cpu=0 n=<k>``."""
        mark = self.mark()
        self.send_serial(b"p")
        return self.wait_line("pong cpu=0*", timeout=timeout, since=mark)

    def qmp(self, command: str, **arguments: Any) -> Any:
        if self._qmp is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            deadline = time.monotonic() + 10
            while True:
                try:
                    sock.connect(str(self.qmp_path))
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    if time.monotonic() > deadline:
                        sock.close()
                        raise
                    time.sleep(0.05)
            self._sock = sock
            self._qmp = sock.makefile("rw")
            json.loads(self._qmp.readline())  # the greeting
            self._execute({"execute": "qmp_capabilities"})
        request: Dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        return self._execute(request)

    def hmp(self, command_line: str) -> str:
        """Run a human-monitor command through QMP; returns its text output."""
        return str(self.qmp("human-monitor-command", **{"command-line": command_line}))

    def status(self) -> str:
        return str(self.qmp("query-status")["status"])

    def cpu_threads(self) -> Dict[int, int]:
        """cpu-index -> thread id, as QEMU itself reports them."""
        return {c["cpu-index"]: c["thread-id"] for c in self.qmp("query-cpus-fast")}

    def _execute(self, request: Dict[str, Any]) -> Any:
        self._qmp.write(json.dumps(request) + "\n")
        self._qmp.flush()
        while True:
            message = json.loads(self._qmp.readline())
            if "error" in message:
                raise AssertionError(f"QMP {request}: {message['error']}")
            if "return" in message:
                return message["return"]
            # asynchronous events (e.g. MEMORY_FAILURE after `mce`) are skipped

    def stop(self) -> None:
        """End QEMU by its pid (quit over QMP first), reap it, close everything."""
        try:
            if self._qmp is not None and self.proc.poll() is None:
                try:
                    self._qmp.write(json.dumps({"execute": "quit"}) + "\n")
                    self._qmp.flush()
                except OSError:
                    pass
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
            # (closing flushes: a QEMU that died leaves a broken pipe)
            if self._qmp is not None:
                with contextlib.suppress(OSError):
                    self._qmp.close()
            if self._sock is not None:
                self._sock.close()
            for stream in (self.proc.stdin, self.proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
            self._stderr.close()
            self._reader.join(5)


class Observations:
    """What the passing tests of one module printed, shown in pytest's terminal summary.

    pytest shows a test's output only when it fails. The QEMU tests print what the
    guest said on its serial port for each injection (their observations); this
    plugin collects the output of the passing ones and prints it in a section of
    its own at the end of the run, without changing pytest's options for the
    other tests. Register it with :func:`show_observations`.
    """

    def __init__(self) -> None:
        self.prefixes: List[str] = []
        self.seen: Dict[str, List[str]] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "call" or not report.passed:
            return
        if not any(report.nodeid.startswith(p) for p in self.prefixes):
            return
        text = "".join(c for name, c in report.sections if name == "Captured stdout call")
        lines = [x.rstrip() for x in text.splitlines() if x.strip()]
        if lines:
            self.seen[report.nodeid] = lines

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.seen:
            return
        terminalreporter.section("observations of passing tests (what the guest printed)")
        for nodeid, lines in self.seen.items():
            terminalreporter.write_line(nodeid)
            for line in lines:
                terminalreporter.write_line(f"    {line}")


_PLUGIN = "serrinj-qemu-observations"


def show_observations(request: pytest.FixtureRequest) -> None:
    """Show, at the end of the run, what the passing tests of ``request``'s module printed."""
    manager = request.config.pluginmanager
    plugin = manager.get_plugin(_PLUGIN)
    if plugin is None:
        plugin = Observations()
        manager.register(plugin, _PLUGIN)
    prefix = request.node.nodeid + "::"
    if prefix not in plugin.prefixes:
        plugin.prefixes.append(prefix)
