"""The lab's runner (inside the guest): report the host's KVM, run the suite.

Everything the host needs to know goes to the console as protocol lines
(:mod:`lab.protocol`). The capability probe uses serrinj's own code
(``serrinj._native.ioctl_int`` and ``serrinj.kvm.api``), so the first lines of
every boot already exercise the package under test on arm64.

Usage inside the lab::

    python3 -m lab.guest.runner                 BEGIN/INFO lines, the suite, END
    python3 -m lab.guest.runner --report-only   BEGIN/INFO lines only
    python3 -m lab.guest.runner --suite-only [PYTEST ARGS]   (the `lab-suite` command)
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import platform
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional

from lab import protocol
from lab.guest import env

PROJECT = "/opt/serrinj"
SUITE = "lab/suite"
#: The host's arch-generic engine tests, run again here so that the aarch64 half
#: of the remote engine is proven by exactly the tests that prove x86_64's.
HOST_TESTS = (
    "tests/test_remote_engine.py",
    "tests/test_faults.py",
    "tests/test_seccomp.py",
    # the use cases against the test VM (arm64 variants where x86 injects NMIs/#MC)
    "tests/test_engine_kvm.py",
    "tests/test_sandbox_and_fds.py",
    "tests/test_events_migration.py",
)
RAS_MESSAGE = "RAS Extension Support"
CAPS = (41, 158, 178)
RUN_SETTINGS = "/etc/lab/run.json"


def emit(kind: str, text: str = "") -> None:
    sys.stdout.write(protocol.line(kind, text) + "\n")
    sys.stdout.flush()


def kernel_log() -> str:
    """The kernel's ring buffer, read from /dev/kmsg without blocking."""
    chunks: List[str] = []
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return ""
    try:
        while True:
            try:
                record = os.read(fd, 8192)
            except OSError as err:
                if err.errno == errno.EPIPE:  # a record was overwritten: keep going
                    continue
                break  # EAGAIN: no more records
            if not record:
                break
            chunks.append(record.decode(errors="replace").split(";", 1)[-1])
    finally:
        os.close(fd)
    return "".join(chunks)


def probe_kvm() -> Dict[str, str]:
    """/dev/kvm and the caps the suite cares about, through serrinj's bindings."""
    info: Dict[str, str] = {}
    try:
        from serrinj._native import ioctl_int
        from serrinj.kvm import api
    except Exception as err:  # the working tree may be broken: say so, keep going
        emit(protocol.ERROR, f"serrinj could not be imported: {type(err).__name__}: {err}")
        return info
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        info["kvm"] = "0"
        emit(protocol.ERROR, f"/dev/kvm: {err.strerror}")
        return info
    try:
        info["kvm"] = "1"
        info["api"] = str(ioctl_int(fd, api.KVM_GET_API_VERSION))
        for cap in CAPS:
            info[f"cap{cap}"] = str(ioctl_int(fd, api.KVM_CHECK_EXTENSION, cap))
    except OSError as err:
        emit(protocol.ERROR, f"KVM probe failed: {err}")
    finally:
        os.close(fd)
    return info


def report(cfg: env.LabConfig) -> None:
    emit(
        protocol.BEGIN,
        f"kernel={platform.release()} label={cfg.kernel} cpu={cfg.cpu} "
        f"expect_ras={int(cfg.expect_ras)} qemu={int(cfg.with_qemu)} "
        f"python={platform.python_version()} machine={platform.machine()}",
    )
    ras = RAS_MESSAGE in kernel_log()
    info = probe_kvm()
    emit(protocol.INFO, f"ras_detected={int(ras)} " + " ".join(f"{k}={v}" for k, v in info.items()))


def settings() -> Dict[str, List[str]]:
    """What the host chose for this run (``/etc/lab/run.json``, from the project piece)."""
    try:
        with open(RUN_SETTINGS) as fh:
            data: Dict[str, List[str]] = json.load(fh)
            return data
    except (OSError, ValueError):
        return {}


def uptime() -> float:
    try:
        with open("/proc/uptime") as fh:
            return float(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0


def run_suite(args: List[str], deadline: Optional[float], color: bool = True) -> int:
    """pytest over the suite (or ``args``), one RESULT line per test; returns its exit code."""
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-p", "lab.guest.plugin"]
    if not color:
        cmd.append("--color=no")  # the console goes to a log file
    # pytest arguments without a test path select within the suite
    paths = [a for a in args if os.path.exists(os.path.join(PROJECT, a.split("::", 1)[0]))]
    cmd += list(args) if paths else [*args, SUITE, *HOST_TESTS]
    proc = subprocess.Popen(cmd, cwd=PROJECT, start_new_session=True)
    try:
        return proc.wait(
            timeout=None if deadline is None else max(1.0, deadline - time.monotonic())
        )
    except subprocess.TimeoutExpired:
        emit(protocol.ERROR, "the suite ran out of time; its processes were killed")
        # the session holds pytest and anything it started (e.g. an inner QEMU)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return 124


def drain() -> None:
    """Wait until the console has sent everything: poweroff must not cut the END line."""
    try:
        import termios

        termios.tcdrain(sys.stdout.fileno())
    except (ImportError, OSError, ValueError):
        pass


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="lab.guest.runner")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--suite-only", action="store_true")
    opts, pytest_args = parser.parse_known_args(argv)
    cfg = env.current()
    if opts.suite_only:
        return run_suite(pytest_args, None)
    report(cfg)
    if opts.report_only:
        drain()
        return 0
    deadline = None
    if cfg.timeout:
        # the host kills QEMU at its own limit: stop early enough to say why
        deadline = time.monotonic() + cfg.timeout - uptime()
    rc = run_suite(pytest_args or settings().get("pytest_args", []), deadline, color=False)
    emit(protocol.END, f"rc={rc}")
    drain()
    return rc


if __name__ == "__main__":
    sys.exit(main())
