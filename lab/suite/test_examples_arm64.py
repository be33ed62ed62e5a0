"""examples/pytest, run in the arm64 lab as a lab runs it: pytest over the suite, its own process.

On a host with RAS, the suite's arm64 tests run against a Linux guest under the
inner QEMU (its console in a file, as the suite's README says): the guest
survives the CE SError and panics on the UER one, printing the injected
syndrome. Its x86_64 tests skip with the reason. On the host without RAS
(cortex-a57) every test of the suite skips, each saying why, and nothing is
injected. The JUnit report is read back either way.

serrinj is not installed in the lab (no entry point), so the plugin is named
with ``-p serrinj.pytest_plugin``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from typing import Dict, Iterator, List, Tuple

from lab.guest import env
from lab.guest.nested import NestedAssets

PROJECT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SUITE = os.path.join(PROJECT, "examples", "pytest")
NAME = "arm64-examples"
CONSOLE = "/tmp/arm64-examples.console"
SUITE_TIMEOUT_S = 600
ARM64 = ("test_a_corrected_serror_is_survived", "test_an_uncorrectable_recoverable_serror_panics")
X86 = (
    "test_a_corrected_machine_check_is_logged",
    "test_an_uncorrected_machine_check_is_logged",
    "test_an_nmi_is_handled",
    "test_the_vcpus_are_left_as_they_were",
)


def _rm(*paths: str) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


def run_suite(junit: str, *args: str) -> Tuple[int, str]:
    argv = [sys.executable, "-m", "pytest", SUITE, "-p", "serrinj.pytest_plugin",
            "-p", "no:cacheprovider", "-rs", f"--junitxml={junit}", *args]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, cwd=PROJECT, timeout=SUITE_TIMEOUT_S)
    return out.returncode, out.stdout + out.stderr


def cases(junit: str) -> Dict[str, Tuple[str, str]]:
    """test name -> (passed | failure | error | skipped, the message)."""
    out = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        bad = [c for c in case if c.tag in ("failure", "error", "skipped")]
        out[case.get("name", "")] = (
            (bad[0].tag, bad[0].get("message", "")) if bad else ("passed", "")
        )
    return out


def properties(junit: str) -> Dict[str, str]:
    return {
        p.get("name", ""): p.get("value", "") for p in ET.parse(junit).getroot().iter("property")
    }


@contextlib.contextmanager
def linux_guest(nested: NestedAssets, workdir: str) -> Iterator[subprocess.Popen[bytes]]:
    """The inner QEMU booting Linux, its console in CONSOLE; killed by its pid at the end."""
    cmd = [
        nested.qemu, "-M", "virt,gic-version=3", "-accel", "kvm", "-cpu", "host", "-m", "512",
        "-name", f"guest={NAME},debug-threads=on", "-nographic", "-no-reboot", "-nic", "none",
        "-serial", f"file:{CONSOLE}", "-kernel", nested.kernel, "-initrd", nested.initrd,
        "-append", "console=ttyAMA0 panic=-1",
    ]  # fmt: skip
    out = os.path.join(workdir, "qemu.out")
    with open(out, "wb") as fh:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fh, stderr=fh)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        _rm(out)


def wait_for_boot(proc: subprocess.Popen[bytes], timeout: float = 180) -> None:
    """Until Linux has reached user space (what a lab's VM is when its suite starts)."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(FileNotFoundError), open(CONSOLE, errors="replace") as fh:
            text = fh.read()
            if "as init process" in text or "login:" in text:
                return
        assert proc.poll() is None, f"QEMU exited ({proc.poll()}) before the guest booted"
        assert time.monotonic() < deadline, f"the guest did not boot in {timeout:.0f} s"
        time.sleep(0.2)


def test_the_example_suite(nested: NestedAssets, lab: env.LabConfig) -> None:
    tmp = tempfile.mkdtemp(prefix="examples-")
    junit = os.path.join(tmp, "examples.xml")
    _rm(CONSOLE)
    try:
        if not lab.expect_ras:
            # no VM needed: every test skips before its fixtures, saying why
            rc, output = run_suite(junit, "--serrinj-name", NAME, "--serrinj-console", CONSOLE)
            assert rc == 0, output
            got = cases(junit)
            print(f"junit: {sorted((n, o) for n, (o, _m) in got.items())}")
            assert {n: o for n, (o, _m) in got.items()} == {n: "skipped" for n in ARM64 + X86}
            for name in ARM64:
                assert "KVM_CAP_ARM_INJECT_SERROR_ESR is 0" in got[name][1], got[name]
            for name in X86:
                assert "needs an x86_64 host; this one is aarch64" in got[name][1], got[name]
            return
        with linux_guest(nested, tmp) as qemu:
            wait_for_boot(qemu)
            rc, output = run_suite(junit, "--serrinj-name", NAME, "--serrinj-console", CONSOLE)
            assert rc == 0, output
            assert qemu.wait(timeout=120) == 0  # the panic ended the guest: QEMU exited
        got = cases(junit)
        for name, (outcome, message) in sorted(got.items()):
            print(f"{outcome}: {name} {message[:80]}")
        assert {n: got[n][0] for n in ARM64} == {n: "passed" for n in ARM64}, got
        assert {n: got[n][0] for n in X86} == {n: "skipped" for n in X86}, got
        props: List[str] = sorted(properties(junit).values())
        for value in props:
            print(f"property: {value}")
        assert any(v.startswith("serror esr=0x1811 ") and ": delivered" in v for v in props)
        assert any(v.startswith("serror esr=0xc11 ") and ": delivered" in v for v in props)
        with open(CONSOLE, errors="replace") as fh:
            console = fh.read()
        assert console.count("SError Interrupt on CPU") == 1  # the CE left no trace
        assert "be000c11" in console
    finally:
        _rm(CONSOLE, junit)
        os.rmdir(tmp)
