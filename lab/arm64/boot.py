"""Boot the emulated arm64 host under QEMU (TCG) and follow its serial console.

Every boot runs under a wall-clock limit: when it passes, the QEMU this
module started is killed by its pid, and the boot counts as failed.
"""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

from lab import protocol, skips
from lab.arm64 import config

QEMU = "qemu-system-aarch64"


def orphan_proof(cmd: Sequence[str]) -> List[str]:
    """``cmd`` wrapped so that the kernel kills it when the thread that started it dies.

    A SIGKILL of the lab runner (a CI job cancelled, an OOM kill) cannot be caught, so
    without this its QEMUs would run on, orphaned, for up to the boot limit. util-linux's
    ``setpriv --pdeathsig`` sets PR_SET_PDEATHSIG and then execs ``cmd`` under the same pid,
    so killing "the QEMU by its pid" still works.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return list(cmd)
    return [setpriv, "--pdeathsig", "KILL", "--", *cmd]


@dataclass(frozen=True)
class BootSpec:
    """One boot of the matrix."""

    kernel: str
    cpu: config.Cpu
    image: str

    @property
    def name(self) -> str:
        return f"{self.kernel}/{self.cpu.name}"


@dataclass
class BootOutcome:
    spec: BootSpec
    report: protocol.BootReport
    seconds: float
    log: str
    timed_out: bool = False
    qemu_rc: Optional[int] = None
    tail: List[str] = field(default_factory=list)
    #: whether the boot had the inner QEMU (decides which skips are accepted)
    with_qemu: bool = True
    #: CPU time QEMU used (user + system; None when unknown): unlike ``seconds``, it does
    #: not grow when the machine is busy with other work, so boots can be compared
    cpu_seconds: Optional[float] = None

    def allowed_skip(self, result: protocol.CaseResult) -> Optional[str]:
        """Why this boot accepts ``result``'s skip (``lab/skips.py``), or None."""
        return skips.allowed_for(self.spec.cpu.ras, self.with_qemu)(result)

    def problems(self) -> List[str]:
        out = []
        if self.timed_out:
            out.append(f"timed out after {self.seconds:.0f} s (QEMU killed)")
        return out + self.report.problems(self.allowed_skip)

    @property
    def ok(self) -> bool:
        return not self.problems()


def qemu_binary() -> str:
    path = shutil.which(QEMU)
    if path is None:
        raise FileNotFoundError(
            f"{QEMU} is not installed: run `make deps` (package qemu-system-arm)"
        )
    return path


def append_line(spec: BootSpec, mode: str, with_qemu: bool, guest_timeout: int) -> str:
    words = [
        config.KERNEL_APPEND,
        f"lab.mode={mode}",
        f"lab.kernel={spec.kernel}",
        f"lab.cpu={spec.cpu.name}",
        f"lab.ras={int(spec.cpu.ras)}",
        f"lab.commit={int(config.KERNELS[spec.kernel].serror_commit_at_set)}",
        f"lab.qemu={int(with_qemu)}",
    ]
    if guest_timeout:
        words.append(f"lab.timeout={guest_timeout}")
    return " ".join(words)


def command(spec: BootSpec, initrd: str, append: str) -> List[str]:
    return [
        qemu_binary(),
        "-M",
        config.MACHINE,
        "-cpu",
        spec.cpu.qemu,
        "-smp",
        str(config.SMP),
        "-m",
        str(config.MEMORY_MB),
        "-nographic",
        "-no-reboot",
        "-nic",
        "none",
        "-kernel",
        spec.image,
        "-initrd",
        initrd,
        "-append",
        append,
    ]


def run(
    spec: BootSpec,
    initrd: str,
    log_path: str,
    timeout: float,
    with_qemu: bool,
    on_line: Optional[
        Callable[[protocol.BootReport, Optional[protocol.CaseResult], str], None]
    ] = None,
    cancel: Optional[threading.Event] = None,
) -> BootOutcome:
    """Boot once in ``run`` mode; every console line goes to ``log_path``.

    Setting ``cancel`` (from another thread) ends the boot: QEMU is killed by its pid.
    """
    guest_timeout = max(10, int(timeout) - config.GUEST_MARGIN_S)
    cmd = command(spec, initrd, append_line(spec, "run", with_qemu, guest_timeout))
    report = protocol.BootReport()
    lines: queue.Queue[Optional[str]] = queue.Queue()
    start = time.monotonic()
    proc = subprocess.Popen(
        orphan_proof(cmd),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )

    def reader() -> None:
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            lines.put(raw.decode(errors="replace").rstrip("\r\n"))
        lines.put(None)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    timed_out = False
    tail: List[str] = []
    try:
        with open(log_path, "w") as log:
            log.write("$ " + " ".join(cmd) + "\n")
            while True:
                left = start + timeout - time.monotonic()
                if left <= 0:
                    timed_out = True
                    break
                if cancel is not None and cancel.is_set():
                    break
                try:
                    text = lines.get(timeout=min(left, 1.0))
                except queue.Empty:
                    continue
                if text is None:
                    break
                log.write(text + "\n")
                log.flush()
                tail = ([*tail, protocol.clean(text)])[-40:]
                done = protocol.feed(report, text)
                if on_line is not None:
                    on_line(report, done, text)
    finally:
        rc, cpu = _reap(proc)
        thread.join(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()
    return BootOutcome(
        spec=spec,
        report=report,
        seconds=time.monotonic() - start,
        log=log_path,
        timed_out=timed_out,
        qemu_rc=rc,
        tail=tail,
        with_qemu=with_qemu,
        cpu_seconds=cpu,
    )


def _reap(proc: subprocess.Popen[bytes]) -> tuple[int, Optional[float]]:
    """Kill QEMU (the child started by ``run``, by its pid) unless it has exited, wait for
    it, and say how much CPU time it used (wait4's rusage)."""
    if proc.returncode is not None:  # reaped elsewhere: its usage is gone
        return proc.returncode, None
    try:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        for _ in range(20):  # its console closed: it is on its way out
            if pid != 0:
                break
            time.sleep(0.05)
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == 0:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
    except ChildProcessError:
        return proc.wait(), None
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime


def interactive(spec: BootSpec, initrd: str, with_qemu: bool, timeout: Optional[float]) -> int:
    """Boot in ``shell`` mode with the console on this terminal; returns QEMU's status."""
    cmd = command(spec, initrd, append_line(spec, "shell", with_qemu, 0))
    proc = subprocess.Popen(orphan_proof(cmd))
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return 124
    except BaseException:  # Ctrl-C, or SIGTERM/SIGHUP turned into Terminated by main()
        proc.kill()
        proc.wait()
        raise
    finally:
        # QEMU's -nographic leaves the terminal raw when it is killed
        if os.isatty(0):
            subprocess.run(["stty", "sane"], check=False)


def matrix(
    kernels: Optional[Sequence[str]], cpus: Optional[Sequence[str]]
) -> List[tuple[str, str]]:
    """The (kernel, cpu) boots for the command-line selection.

    Nothing selected: the CI matrix (:data:`config.DEFAULT_MATRIX`). Kernels
    only: ``max`` on each, plus ``cortex-a57`` on the first. Otherwise the
    product of the selections.
    """
    if not kernels and not cpus:
        return list(config.DEFAULT_MATRIX)
    ks = list(kernels or config.KERNELS)
    if not cpus:
        return [(k, "max") for k in ks] + [(ks[0], "cortex-a57")]
    return [(k, c) for k in ks for c in cpus]
