"""A real libvirt daemon (without systemd) and a transient KVM domain booting serrinj's firmware.

Debian's monolithic ``libvirtd`` (``libvirt-daemon``, ``libvirt-daemon-driver-qemu``,
``libvirt-clients``; ``scripts/install-deps`` installs them, adds the ``libvirt-qemu``
user and writes ``/etc/libvirt/qemu.conf``: QEMU as root, no security driver, its
stdio in files) is started with ``libvirtd --daemon --pid-file F``, which returns 0
even when its QEMU driver failed, so :meth:`Libvirtd.start` polls
``virsh -c qemu:///system uri`` until the daemon answers. A daemon that already
answers before the start is used and left running; one started here is ended by
the pid in its pid file, never by name.

:class:`Domain` is a transient domain (``virsh create``): ``type='kvm'``, the firmware
as its ``<loader>`` (QEMU ``-bios``), the serial console in a file, no disk, no NIC,
no balloon. :meth:`Domain.destroy` ends it with ``virsh destroy``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional
from xml.sax.saxutils import escape

URI = "qemu:///system"
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
#: what scripts/install-deps writes into qemu.conf (BRIEF section 11)
QEMU_CONF_SETTINGS = (
    'user = "root"',
    'group = "root"',
    'security_driver = "none"',
    'stdio_handler = "file"',
)


def virsh(*args: str, timeout: float = 60.0, check: bool = True) -> str:
    proc = subprocess.run(
        ["virsh", "-c", URI, *args], capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)} -> {proc.returncode}: {proc.stderr}")
    return proc.stdout


def _answers() -> bool:
    try:
        proc = subprocess.run(
            ["virsh", "-c", URI, "uri"], capture_output=True, text=True, timeout=10
        )
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0


def setup_problem() -> Optional[str]:
    """Why this host cannot run the libvirt tests as installed, or None."""
    import pwd

    try:
        pwd.getpwnam("libvirt-qemu")
    except KeyError:
        return "the libvirt-qemu user is missing; run `make deps` (scripts/install-deps adds it)"
    try:
        lines = {line.strip() for line in QEMU_CONF.read_text().splitlines()}
    except OSError:
        return f"{QEMU_CONF} is missing; run `make deps` (scripts/install-deps writes it)"
    absent = [s for s in QEMU_CONF_SETTINGS if s not in lines]
    if absent:
        return f"{QEMU_CONF} lacks {', '.join(absent)}; run `make deps`"
    return None


def _starttime(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except OSError:
        return None
    return int(raw[raw.rindex(")") + 2 :].split()[19])


class Libvirtd:
    """The libvirt daemon the tests talk to."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.pid_file = workdir / "libvirtd.pid"
        self.log_file = workdir / "libvirtd.log"
        self.pid: Optional[int] = None  # set only when this object started it
        self._starttime: Optional[int] = None

    def start(self, timeout: float = 60.0) -> None:
        if _answers():
            return  # a daemon of the host's own: use it, leave it alone
        env = dict(os.environ, LIBVIRT_LOG_OUTPUTS=f"3:file:{self.log_file}")
        subprocess.run(
            ["libvirtd", "--daemon", "--pid-file", str(self.pid_file)],
            env=env,
            check=False,
            timeout=30,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.pid is None and self.pid_file.exists():
                try:
                    self.pid = int(self.pid_file.read_text().strip())
                    self._starttime = _starttime(self.pid)
                except ValueError:
                    pass  # written but not yet complete
            if self.pid is not None and _answers():
                return
            if time.monotonic() > deadline:
                log = ""
                if self.log_file.exists():
                    log = self.log_file.read_text(errors="replace")[-3000:]
                raise AssertionError(f"libvirtd did not answer within {timeout} s; its log:\n{log}")
            time.sleep(0.1)

    def stop(self, timeout: float = 15.0) -> None:
        """End the daemon started here (SIGTERM, then SIGKILL) and wait until it is gone."""
        pid = self.pid
        if pid is None or _starttime(pid) != self._starttime:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + timeout
            while _starttime(pid) == self._starttime and time.monotonic() < deadline:
                time.sleep(0.05)
            if _starttime(pid) != self._starttime:
                break
        self.pid = None


class Domain:
    """A transient KVM domain booting the firmware; its serial output goes to a file."""

    def __init__(self, name: str, firmware: Path, workdir: Path, vcpus: int = 2) -> None:
        self.name = name
        self.serial = workdir / f"{name}.serial"
        self.xml = workdir / f"{name}.xml"
        self.xml.write_text(domain_xml(name, firmware, self.serial, vcpus))
        self.created = False
        self.pid = 0

    def create(self, timeout: float = 60.0) -> None:
        virsh("create", str(self.xml), timeout=timeout)
        self.created = True
        pid_file = Path(f"/run/libvirt/qemu/{self.name}.pid")
        deadline = time.monotonic() + 10
        while not pid_file.exists():
            assert time.monotonic() < deadline, f"{pid_file} did not appear"
            time.sleep(0.05)
        self.pid = int(pid_file.read_text().strip())

    def lines(self) -> List[str]:
        try:
            text = self.serial.read_text(errors="replace")
        except FileNotFoundError:
            return []
        return [line.strip() for line in text.splitlines() if line.strip()]

    def mark(self) -> int:
        return len(self.lines())

    def wait_line(self, text: str, timeout: float = 20.0, since: int = 0) -> str:
        """The first serial line at index >= ``since`` equal to ``text`` (or starting
        with it when ``text`` ends in ``*``)."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines()[since:]:
                if line == text or (text.endswith("*") and line.startswith(text[:-1])):
                    return line
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no serial line {text!r} from domain {self.name};"
                    f" serial: {self.lines()[-20:]}; state: {self.state()}"
                )
            time.sleep(0.05)

    def state(self) -> str:
        return virsh("domstate", self.name, check=False).strip()

    def destroy(self) -> None:
        if self.created:
            virsh("destroy", self.name, check=False)
            self.created = False
        for path in (self.xml, self.serial, Path(f"/var/log/libvirt/qemu/{self.name}.log")):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def domain_xml(name: str, firmware: Path, serial: Path, vcpus: int) -> str:
    """A minimal transient KVM domain: the firmware as BIOS, the serial console in a file."""
    values: Dict[str, str] = {
        "name": escape(name),
        "fw": escape(str(firmware)),
        "serial": escape(str(serial)),
        "emulator": escape(shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"),
    }
    return f"""<domain type='kvm'>
  <name>{values["name"]}</name>
  <memory unit='MiB'>32</memory>
  <vcpu>{vcpus}</vcpu>
  <os>
    <type arch='x86_64'>hvm</type>
    <loader>{values["fw"]}</loader>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{values["emulator"]}</emulator>
    <serial type='file'>
      <source path='{values["serial"]}'/>
      <target port='0'/>
    </serial>
    <console type='file'>
      <source path='{values["serial"]}'/>
      <target type='serial' port='0'/>
    </console>
    <memballoon model='none'/>
  </devices>
</domain>
"""
