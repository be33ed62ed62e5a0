"""The inner VMM inside the lab: a real arm64 QEMU (``-accel kvm``) and a Linux guest.

The nested piece of the initramfs carries Debian's ``qemu-system-aarch64``,
a guest kernel and a busybox initramfs whose ``/init`` prints
:data:`MARKER`, then (with ``lab.tick=N``) a :data:`TICK` line every N seconds,
and keeps a shell on its console. :class:`InnerQemu` starts it with the guest
console on a pipe, waits for lines with a deadline, and always ends the QEMU
it started, by pid. Later suites (injection into a real VMM) build on it::

    with InnerQemu.start(nested_assets) as vm:
        vm.wait_for(MARKER, timeout=120)
        ...  # vm.pid is the VMM to attach to
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

MARKER = "LAB-NESTED-GUEST-UP"
TICK = "LAB-NESTED-TICK"
ROOT = "/opt/lab/nested"
QEMU = "/usr/bin/qemu-system-aarch64"


@dataclass(frozen=True)
class NestedAssets:
    """Where the nested piece put the inner VMM and its guest."""

    qemu: str = QEMU
    kernel: str = f"{ROOT}/Image"
    initrd: str = f"{ROOT}/initrd.cpio.gz"

    def missing(self) -> List[str]:
        return [p for p in (self.qemu, self.kernel, self.initrd) if not os.path.exists(p)]


def command(
    assets: NestedAssets,
    name: str = "nested",
    tick: int = 1,
    memory_mb: int = 256,
    append: str = "",
    extra: Sequence[str] = (),
) -> List[str]:
    """The inner QEMU's command line: KVM, the host's CPU, console on stdio, no devices."""
    cmdline = f"console=ttyAMA0 rdinit=/init panic=-1 quiet lab.tick={tick} {append}".strip()
    return [
        assets.qemu,
        "-M",
        "virt,gic-version=3",
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-smp",
        "1",
        "-m",
        str(memory_mb),
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        # debug-threads names the vCPU threads "CPU 0/KVM" (BRIEF section 6)
        "-name",
        f"{name},debug-threads=on",
        "-serial",
        "stdio",
        "-kernel",
        assets.kernel,
        "-initrd",
        assets.initrd,
        "-append",
        cmdline,
        *extra,
    ]


class InnerQemu:
    """A running inner QEMU whose guest console is read line by line."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.lines: List[str] = []
        self._queue: queue.Queue[Optional[str]] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @classmethod
    def start(cls, assets: NestedAssets, **kwargs: object) -> InnerQemu:
        cmd = command(assets, **kwargs)  # type: ignore[arg-type]
        proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        return cls(proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            self._queue.put(raw.decode(errors="replace").rstrip("\r\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float) -> str:
        """The first new console line matching regex ``pattern``; raises on timeout or exit."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"no {pattern!r} within {timeout:.0f} s; console:\n" + self.tail()
                )
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self._queue.put(None)  # keep reporting the exit to later calls
                raise RuntimeError(
                    f"QEMU exited (rc={self.proc.poll()}) before {pattern!r}; console:\n"
                    + self.tail()
                )
            self.lines.append(line)
            if regex.search(line):
                return line

    def send(self, text: str) -> None:
        """Type ``text`` (and a newline) on the guest's console."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.lines[-n:])

    def stop(self, timeout: float = 10) -> int:
        """End the QEMU this object started (by its pid) and reap it; returns its status."""
        if self.proc.poll() is None:
            self.proc.kill()
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=timeout)  # it sees EOF once QEMU is gone
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        return rc

    def __enter__(self) -> InnerQemu:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
