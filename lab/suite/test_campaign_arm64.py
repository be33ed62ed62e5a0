"""The arm64 campaign examples, run for real: ``serrinj run examples/....toml --junit``.

Each example's VM is started exactly as the comment at the top of its file
says (same QEMU options, same paths under /tmp, which is the lab's own
tmpfs), and the campaign is run unchanged, through the CLI. The test plays
the operator where the campaign asks for one, and reads the JUnit report
the campaign wrote.

On the host without RAS both campaigns inject a syndrome, so ``serrinj run``
must refuse them before sending anything; the masked example checks that (the
other would need a Linux boot to show the same refusal).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from typing import Any, Dict, Iterator, List, Optional

import pytest

from lab.guest import env
from lab.guest.cli import serrinj
from lab.guest.nested import NestedAssets
from serrinj.testvm.firmware_arm64 import FirmwareOptions, build

PROJECT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(PROJECT, "examples")
CAMPAIGN_TIMEOUT_S = 240


def _rm(*paths: str) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


class _Qemu:
    """The example's QEMU, its own output (not the guest's console) kept in a file."""

    def __init__(self, cmd: List[str], out: str) -> None:
        self.out = out
        with open(out, "wb") as fh:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=fh, stderr=fh)

    def poll(self) -> Optional[int]:
        return self.proc.poll()

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def why(self) -> str:
        with open(self.out, errors="replace") as fh:
            return f"QEMU (rc={self.proc.poll()}) said: {fh.read()[-2000:]}"


@contextlib.contextmanager
def _qemu(cmd: List[str], out: str) -> Iterator[_Qemu]:
    """Run the example's QEMU; kill it by its pid if it is still running at the end."""
    q = _Qemu(cmd, out)
    try:
        yield q
    finally:
        if q.proc.poll() is None:
            q.proc.kill()
        q.proc.wait(timeout=30)
        if q.proc.stdin is not None:
            q.proc.stdin.close()
        _rm(out)


def _wait_for_text(path: str, text: str, timeout: float, qemu: _Qemu) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(FileNotFoundError), open(path, errors="replace") as fh:
            if text in fh.read():
                return
        assert qemu.poll() is None, qemu.why()
        assert time.monotonic() < deadline, f"no {text!r} in {path} after {timeout:.0f} s"
        time.sleep(0.1)


def _junit(path: str) -> Dict[str, Any]:
    """The report: the suite's counts and each test case's name and outcome."""
    root = ET.parse(path).getroot()
    suite = root.find("testsuite")
    assert suite is not None
    cases = []
    for case in suite.findall("testcase"):
        bad = [c.tag for c in case if c.tag in ("failure", "error", "skipped")]
        cases.append({"name": case.get("name"), "outcome": bad[0] if bad else "passed"})
    counts = {k: int(suite.get(k, "0")) for k in ("tests", "failures", "errors", "skipped")}
    return {"counts": counts, "cases": cases, "name": suite.get("name")}


def _show(rep: Dict[str, Any]) -> None:
    """The JUnit report as observation lines: the suite's counts, then each case."""
    print(f"junit {rep['name']}: {rep['counts']}")
    for case in rep["cases"]:
        print(f"  {case['outcome']}: {case['name']}")


class _Run:
    """``serrinj --json run ...`` in the background, its JSON lines read as they come."""

    def __init__(self, *args: str) -> None:
        self.lines: List[Dict[str, Any]] = []
        self.raw = ""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serrinj", "--json", "run", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._queue: queue.Queue[Optional[str]] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def next_event(self, timeout: float) -> Optional[Dict[str, Any]]:
        """The next step event, ``None`` for the result line or at the end of the output.

        An error before the campaign starts is one indented JSON object, not a line:
        its text is kept in ``raw`` and parsed by :meth:`finish`.
        """
        while True:
            try:
                line = self._queue.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"serrinj run printed nothing for {timeout:.0f} s") from None
            if line is None:
                self._queue.put(None)
                return None
            try:
                doc: Dict[str, Any] = json.loads(line)
            except ValueError:
                self.raw += line
                continue
            self.lines.append(doc)
            return doc.get("event")

    def finish(self, timeout: float) -> int:
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=timeout)
        while True:  # the reader has put every line left, then None
            line = self._queue.get(timeout=timeout)
            if line is None:
                self._queue.put(None)
                break
            try:
                self.lines.append(json.loads(line))
            except ValueError:
                self.raw += line
        if self.raw.strip():
            self.lines.append(json.loads(self.raw))
        return rc

    @property
    def stderr(self) -> str:
        assert self.proc.stderr is not None
        return self.proc.stderr.read() if self.proc.poll() is not None else "(running)"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self._reader.join(timeout=30)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


# ---------------------------------------------------------------------- masked SError

MASKED_SOCK = "/tmp/masked.sock"
MASKED_LOG = "/tmp/masked.console"
MASKED_GO = "/tmp/masked.go"


def test_arm64_masked_serror_example(nested: NestedAssets, lab: env.LabConfig) -> None:
    """The bare guest keeps SErrors masked until it reads 'u'; the campaign's pause step
    is where the operator (this test) types it and touches the file the step waits for."""
    example = os.path.join(EXAMPLES, "arm64-masked-serror.toml")
    _rm(MASKED_SOCK, MASKED_LOG, MASKED_GO)
    tmp = tempfile.mkdtemp(prefix="campaign-")
    elf, report = os.path.join(tmp, "guest.elf"), os.path.join(tmp, "masked.xml")
    with open(elf, "wb") as fh:
        fh.write(build(FirmwareOptions(mask_serror=True)).elf())
    cmd = [
        nested.qemu, "-M", "virt,gic-version=3", "-accel", "kvm", "-cpu", "host", "-nodefaults",
        "-display", "none", "-name", "guest=masked,debug-threads=on", "-kernel", elf,
        "-chardev", f"socket,id=con,path={MASKED_SOCK},server=on,wait=off,logfile={MASKED_LOG}",
        "-serial", "chardev:con",
    ]  # fmt: skip
    run: Optional[_Run] = None
    try:
        with _qemu(cmd, os.path.join(tmp, "qemu.out")) as qemu:
            _wait_for_text(MASKED_LOG, "ready cpu=0", 60, qemu)
            run = _Run(example, "--junit", report)
            if not lab.expect_ras:
                # the ESR needs RAS: refused when checked against the host, before any step
                rc = run.finish(CAMPAIGN_TIMEOUT_S)
                assert rc == 2, run.stderr
                err = run.lines[-1]["error"]
                assert "KVM_CAP_ARM_INJECT_SERROR_ESR is 0" in err["message"], err
                rep = _junit(report)
                assert rep["counts"]["errors"] == 1, rep
                st = serrinj("status", "--name", "masked", "--vcpu", "0")
                assert st.rc == 0, st
                assert st.data["vcpus"][0]["events"]["serror_pending"] is False  # nothing sent
                return
            while True:
                ev = run.next_event(CAMPAIGN_TIMEOUT_S)
                if ev is None or (ev["event"] == "message" and ev["kind"] == "pause"):
                    break
                assert ev["outcome"] in (None, "passed"), (ev, run.lines)
            assert ev is not None and run.proc.poll() is None, (run.lines, run.raw)
            # the operator: unmask SErrors in the guest, then tell the campaign
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(MASKED_SOCK)
                s.sendall(b"u")
                _wait_for_text(MASKED_LOG, "unmasked cpu=0", 20, qemu)
            with open(MASKED_GO, "w"):
                pass
            rc = run.finish(CAMPAIGN_TIMEOUT_S)
            assert rc == 0, (run.lines[-1:], run.stderr, qemu.why())
            assert qemu.poll() is None, qemu.why()  # QEMU runs on
        result = run.lines[-1]
        assert result["exit_code"] == 0 and result["counts"]["failed"] == 0, result
        rep = _junit(report)
        _show(rep)
        assert rep["name"] == "arm64-masked-serror"
        assert rep["counts"] == {"tests": 6, "failures": 0, "errors": 0, "skipped": 0}, rep
        assert all(c["outcome"] == "passed" for c in rep["cases"]), rep
        names = " | ".join(c["name"] for c in rep["cases"])
        assert "expect pending (step 2) - it stays pending while the guest masks it" in names
        assert "with exactly the injected syndrome" in names
        with open(MASKED_LOG, errors="replace") as fh:
            assert "serror cpu=0 esr=0x00000000be001811 " in fh.read()
    finally:
        if run is not None:
            run.stop()
        _rm(MASKED_SOCK, MASKED_LOG, MASKED_GO, elf, report)
        os.rmdir(tmp)


# ---------------------------------------------------------------------- Linux, by severity

RAS_LOG = "/tmp/arm64-ras.console"


@pytest.mark.skipif(
    not env.current().expect_ras,
    reason="a campaign with a syndrome is refused without RAS: the masked example checks it",
)
def test_arm64_ras_example(nested: NestedAssets) -> None:
    """A Linux guest survives the CE SError and panics on the UER one, printing its ESR."""
    example = os.path.join(EXAMPLES, "arm64-ras.toml")
    _rm(RAS_LOG)
    tmp = tempfile.mkdtemp(prefix="campaign-")
    report = os.path.join(tmp, "arm64-ras.xml")
    cmd = [
        nested.qemu, "-M", "virt,gic-version=3", "-accel", "kvm", "-cpu", "host", "-m", "512",
        "-name", "guest=arm64-ras,debug-threads=on", "-nographic", "-no-reboot", "-nic", "none",
        "-serial", f"file:{RAS_LOG}", "-kernel", nested.kernel, "-initrd", nested.initrd,
        "-append", "console=ttyAMA0 panic=-1",
    ]  # fmt: skip
    try:
        with _qemu(cmd, os.path.join(tmp, "qemu.out")) as qemu:
            _wait_for_text(RAS_LOG, "Booting Linux", 60, qemu)  # the VM exists: run it
            r = serrinj("run", example, "--junit", report, timeout=CAMPAIGN_TIMEOUT_S)
            assert r.rc == 0, f"{r}\n{qemu.why()}"
            result = r.lines[-1]
            assert result["exit_code"] == 0, result
            assert qemu.wait(timeout=60) == 0  # the panic rebooted the guest: QEMU exited
        rep = _junit(report)
        _show(rep)
        assert rep["name"] == "arm64-ras"
        assert rep["counts"] == {"tests": 6, "failures": 0, "errors": 0, "skipped": 0}, rep
        names = " | ".join(c["name"] for c in rep["cases"])
        assert "the guest survived the CE" in names and "and panics" in names
        with open(RAS_LOG, errors="replace") as fh:
            console = fh.read()
        assert "SError Interrupt on CPU0, code 0x00000000be000c11" in console
        assert console.count("SError Interrupt on CPU") == 1  # the CE left no trace
    finally:
        _rm(RAS_LOG, report)
        os.rmdir(tmp)
