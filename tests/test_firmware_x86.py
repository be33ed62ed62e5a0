"""The x86 firmware guest in a real QEMU (``-accel kvm -bios stub.bin``).

Before serrinj's own engine is involved, QEMU's HMP commands (over QMP)
inject the NMI and the machine checks, and the firmware's handlers must print
exactly what was injected on the serial console (QEMU's stdout).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any, Dict, Iterator, List

import pytest

from serrinj.kvm import x86_64 as kx
from serrinj.testvm.firmware_x86 import AP_SIPI_VECTOR, IMAGE_SIZE, build_firmware

pytestmark = [pytest.mark.qemu, pytest.mark.kvm]

UC_STATUS = 0xBE00000000000135  # VAL UC EN MISCV ADDRV PCC
CE_STATUS = 0x9C0000000000009A  # VAL EN MISCV ADDRV


class Qemu:
    """A QEMU process booting the firmware: serial lines in, HMP commands out."""

    def __init__(self, workdir: Path, image: Path, name: str) -> None:
        self.qmp_path = workdir / "qmp.sock"
        self.stderr_path = workdir / "qemu.stderr"
        self.argv = [
            "qemu-system-x86_64", "-accel", "kvm", "-bios", str(image), "-nographic",
            "-nic", "none", "-smp", "2", "-m", "32", "-name", f"guest={name},debug-threads=on",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]  # fmt: skip
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr
        )
        self.lines: List[str] = []
        self._cond = threading.Condition()
        assert self.proc.stdout is not None
        self._reader = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)
        self._reader.start()
        self._qmp: Any = None

    def _read(self, stream: IO[bytes]) -> None:
        for raw in stream:
            line = raw.decode(errors="replace").strip()
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()

    def wait_line(self, text: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
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

    def send_serial(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def hmp(self, command: str) -> str:
        """Run a human-monitor command through QMP; returns its text output."""
        if self._qmp is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            deadline = time.monotonic() + 10
            while True:
                try:
                    sock.connect(str(self.qmp_path))
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            self._sock = sock
            self._qmp = sock.makefile("rw")
            json.loads(self._qmp.readline())  # the greeting
            self._execute({"execute": "qmp_capabilities"})
        reply = self._execute(
            {"execute": "human-monitor-command", "arguments": {"command-line": command}}
        )
        return str(reply)

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
            if self._qmp is not None:
                self._qmp.close()
                self._sock.close()
            for stream in (self.proc.stdin, self.proc.stdout):
                if stream is not None:
                    stream.close()
            self._stderr.close()
            self._reader.join(5)


@pytest.fixture
def stub(tmp_path: Path) -> Path:
    """The firmware, built by its command-line entry point."""
    image = tmp_path / "stub.bin"
    subprocess.run(
        [sys.executable, "-m", "serrinj.testvm.firmware_x86", "-o", str(image)], check=True
    )
    return image


@pytest.fixture
def qemu(tmp_path: Path, stub: Path) -> Iterator[Qemu]:
    vm = Qemu(tmp_path, stub, "serrinj-fw-test")
    try:
        yield vm
    finally:
        vm.stop()


def test_image_layout(stub: Path) -> None:
    image = stub.read_bytes()
    assert image == build_firmware()
    assert len(image) == IMAGE_SIZE
    # F000:FFF0 holds a far jump into F000; the APs start at offset 0 (vector 0xF0)
    assert image[0xFFF0] == 0xEA
    assert int.from_bytes(image[0xFFF3:0xFFF5], "little") == 0xF000
    assert AP_SIPI_VECTOR << 12 == 0xF0000
    assert image[0] == 0xFA  # cli


def _thread_names(pid: int) -> List[str]:
    names = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except FileNotFoundError:
            continue
    return names


def test_firmware_reports_what_qemu_injects(qemu: Qemu) -> None:
    qemu.wait_line("ready cpu=0")
    qemu.wait_line("ready cpu=1")  # the AP came up through INIT-SIPI-SIPI
    assert {"CPU 0/KVM", "CPU 1/KVM"} <= set(_thread_names(qemu.proc.pid))

    qemu.send_serial(b"p")
    qemu.wait_line("pong cpu=0 n=1")
    qemu.send_serial(b"p")
    qemu.wait_line("pong cpu=0 n=2")

    # QEMU's `nmi` reaches every CPU (LINT1 programmed as NMI)
    qemu.hmp("nmi")
    qemu.wait_line("nmi cpu=0 count=1")
    qemu.wait_line("nmi cpu=1 count=1")

    # uncorrected: #MC on CPU 1, twice (the handler clears MCIP between them)
    for bank, addr, misc in ((1, 0xDEAD0000, 0x8C), (4, 0xBEEF000, 0x8D)):
        qemu.hmp(f"mce 1 {bank} {UC_STATUS:#x} 0x5 {addr:#x} {misc:#x}")
        qemu.wait_line(
            f"mce cpu=1 bank={bank} status=0x{UC_STATUS:016x} addr=0x{addr:016x} "
            f"misc=0x{misc:016x} mcg_status=0x{kx.MCG_STATUS_RIPV | kx.MCG_STATUS_MCIP:016x}"
        )

    # corrected: no exception; CPU 0 finds it by polling
    qemu.hmp(f"mce 0 2 {CE_STATUS:#x} 0x0 0x1234 0x86")
    qemu.wait_line(
        f"mce-poll cpu=0 bank=2 status=0x{CE_STATUS:016x} addr=0x{0x1234:016x} "
        f"misc=0x{0x86:016x} mcg_status=0x{0:016x}"
    )

    qemu.send_serial(b"p")
    qemu.wait_line("pong cpu=0 n=3")  # still serving after all of it
    assert qemu.proc.poll() is None
    assert not [line for line in qemu.lines if line.startswith("exception")]
    assert sum(line.startswith("ready") for line in qemu.lines) == 2  # no reset happened
