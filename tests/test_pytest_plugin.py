"""serrinj's pytest plugin, run by pytest itself (pytester) against real test VMs and QEMU.

The inner test sessions load the plugin the way a lab's do: through the
``pytest11`` entry point of the installed serrinj. A failing inner test must
carry the audit records, the vCPU status and the console in its report, and
its injections as JUnit properties; the example suite (examples/pytest) runs
against serrinj's firmware guest under QEMU and against the test VM, and its
JUnit report validates against the schema the campaigns' reports are held to.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest
import xmlschema

from tests.conftest import need_tool
from tests.test_campaign import EXAMPLES, ROOT, XSD, LoggedVm

pytest_plugins = ["pytester"]

X86 = pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86_64 faults (NMI, MCE)")
PLUGIN_NAME = "serrinj.pytest_plugin"


def _suite_props(xml_path: Path) -> Dict[str, str]:
    root = ET.parse(xml_path).getroot()
    return {p.get("name", ""): p.get("value", "") for p in root.iter("property")}


def _cases(xml_path: Path) -> Dict[str, str]:
    """test case name -> passed | failure | error | skipped."""
    out = {}
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        bad = [c.tag for c in case if c.tag in ("failure", "error", "skipped")]
        out[case.get("name", "")] = bad[0] if bad else "passed"
    return out


# ---------------------------------------------------------------------- loading
def test_the_plugin_is_registered_through_the_entry_point(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--trace-config", "-q", "--co")
    result.stdout.fnmatch_lines([f"*{PLUGIN_NAME}*"])
    # naming it as well (what a lab without the installed wheel does) loads it once
    pytester.makepyfile("def test_one(serrinj_console):\n    pass\n")
    pytester.runpytest("-p", PLUGIN_NAME, "-rs").assert_outcomes(skipped=1)
    help_text = pytester.runpytest("--help").stdout.str()
    for option in ("--serrinj-pid", "--serrinj-name", "--serrinj-console"):
        assert option in help_text


def test_serrinj_never_imports_pytest() -> None:
    code = (
        "import sys, serrinj, serrinj.api, serrinj.cli, serrinj.campaign;"
        " serrinj.find; print(sorted(m for m in sys.modules if m.split('.')[0] in"
        " ('pytest', '_pytest', 'pluggy')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# ---------------------------------------------------------------------- markers
def test_serrinj_needs_skips_with_the_reason(pytester: pytest.Pytester) -> None:
    here, other = ("x86_64", "arm64") if os.uname().machine == "x86_64" else ("arm64", "x86_64")
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.serrinj_needs("{other}")
        def test_other_arch():
            pass

        @pytest.mark.serrinj_needs("{here}", "kvm")
        def test_this_arch():
            pass

        @pytest.mark.serrinj_needs("warp-drive")
        def test_unknown():
            pass
        """
    )
    result = pytester.runpytest("-rs", "--strict-markers")
    result.assert_outcomes(passed=1, skipped=1, errors=1)
    result.stdout.fnmatch_lines([f"SKIPPED * serrinj_needs('{other}'): needs an {other} host*"])
    result.stdout.fnmatch_lines(["*unknown capability 'warp-drive'*"])


# ---------------------------------------------------------------------- the console
def test_the_console_expects_lines_written_after_the_test_began(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    log = tmp_path / "console.log"
    log.write_text("old: panic before the test\n")
    pytester.makepyfile(
        f"""
        import threading, time

        LOG = {str(log)!r}

        def write_later(*lines, delay=0.3):
            def run():
                time.sleep(delay)
                with open(LOG, "a") as f:
                    for line in lines:
                        f.write(line)
                        f.flush()
                        time.sleep(0.05)
            threading.Thread(target=run).start()

        def test_expect_finds_successive_lines(serrinj_console):
            write_later("boot\\r\\n", "nmi cpu=1 count=1\\n", "nmi cpu=1 co", "unt=2\\n")
            m = serrinj_console.expect(r"nmi cpu=(\\d) count=1", timeout=5)
            assert m.group(1) == "1"
            serrinj_console.expect(r"count=2$", timeout=5)
            serrinj_console.expect_not(r"panic", within=0.3)

        def test_expect_times_out_with_the_tail(serrinj_console):
            write_later("something else\\n", delay=0)
            serrinj_console.expect(r"never printed", timeout=0.5)

        def test_expect_not_fails_on_a_match(serrinj_console):
            write_later("Kernel panic - not syncing\\n", delay=0.2)
            serrinj_console.expect_not(r"Kernel panic", within=3)
        """
    )
    result = pytester.runpytest("--serrinj-console", str(log), "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=2)
    out = result.stdout.str()
    assert "no line of" in out and "matched /never printed/ within 0.5 s" in out
    assert "something else" in out  # the tail of the log is in the failure
    assert "a line matched /Kernel panic/" in out
    assert "old: panic before the test" not in out.split("expect_not_fails_on_a_match")[-1]
    # a failing test that used the console carries its end as a report section
    assert "serrinj console:" in out


def test_without_a_console_or_a_vm_the_fixtures_skip(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_console(serrinj_console):
            pass

        def test_vm(serrinj_vm):
            pass
        """
    )
    with pytest.MonkeyPatch.context() as mp:
        for key in ("SERRINJ_PID", "SERRINJ_NAME", "SERRINJ_CONSOLE"):
            mp.delenv(key, raising=False)
        result = pytester.runpytest("-rs")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(
        ["*no console log: give --serrinj-console FILE*", "*no VM under test: give --serrinj-pid*"]
    )


# ---------------------------------------------------------------------- VMs
@pytest.mark.kvm
@X86
def test_a_failing_test_reports_the_audit_status_and_injections(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    """The fixture starts and ends the test VM; the failure report carries what serrinj did."""
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.serrinj_test_vm(vcpus=2)
        def test_passes(serrinj_test_vm):
            t = serrinj_test_vm
            mark = t.mark()
            assert t.vm.nmi(vcpu=1, wait=5).delivered
            t.wait_event("nmi", vcpu=1, since=mark)
            with open("pid-passes", "w") as f:
                f.write(str(t.pid))

        @pytest.mark.serrinj_test_vm(vcpus=2)
        def test_fails(serrinj_test_vm):
            t = serrinj_test_vm
            with open("pid-fails", "w") as f:
                f.write(str(t.pid))
            t.vm.mce(2, preset="srao", addr=0x12345000, vcpu=0, wait=5)
            t.wait_event("mce", vcpu=0)
            t.vm.nmi(vcpu=1, wait=5)
            assert t.events("nmi") == [], "the guest took an NMI"
        """
    )
    junit = tmp_path / "inner.xml"
    result = pytester.runpytest("-p", "no:cacheprovider", f"--junitxml={junit}")
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    failing = out[out.index("_ test_fails _") :]
    # the audit records of this test's injections, then each vCPU's status now
    assert "serrinj audit" in failing and "serrinj vCPU status: pid" in failing
    audit_lines = [x for x in failing.splitlines() if x.startswith('{"action"')]
    assert [x.split('"action": ')[1].split(",")[0] for x in audit_lines] == [
        '"inject-mce"',
        '"inject-nmi"',
    ]
    assert '"status": 13618885273168380096' in audit_lines[0]  # the SRAO MCi_STATUS
    assert "vCPU 0: thread" in failing and "vCPU 1: thread" in failing
    # a passing test has no such sections
    assert out.count("serrinj audit") == 1
    # each test had its own VM, and it is gone
    for name in ("pid-passes", "pid-fails"):
        pid = int((pytester.path / name).read_text())
        assert not os.path.exists(f"/proc/{pid}"), f"test VM {pid} still runs"
    # the injections, as JUnit properties, in a report valid against the Jenkins schema
    xmlschema.XMLSchema(XSD).validate(str(junit))
    props = _suite_props(junit)
    mce = props["test_a_failing_test_reports_the_audit_status_and_injections.py::test_fails"
                " serrinj.injection.1"]  # fmt: skip
    assert mce.startswith("mce bank=2 status=0xbd000000000000c0 addr=0x12345000 misc=0x8c")
    assert mce.endswith("vcpu 0: delivered after " + mce.split("delivered after ")[1])
    nmi = props["test_a_failing_test_reports_the_audit_status_and_injections.py::test_fails"
                " serrinj.injection.2"]  # fmt: skip
    assert nmi.startswith("nmi vm pid") and " vcpu 1: delivered" in nmi
    assert any(k.endswith("::test_passes serrinj.injection.1") for k in props)


@pytest.mark.kvm
@pytest.mark.root
@X86
def test_xunit1_puts_the_injections_on_the_test_case(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    with LoggedVm(str(tmp_path), vcpus=1) as vm:
        pytester.makepyfile(
            """
            def test_nmi(serrinj_vm):
                assert serrinj_vm.nmi(wait=5).delivered
                assert False
            """
        )
        junit = tmp_path / "x1.xml"
        result = pytester.runpytest(
            "-o", "junit_family=xunit1", f"--junitxml={junit}", "--serrinj-pid", str(vm.pid)
        )
        result.assert_outcomes(failed=1)
    case = ET.parse(junit).getroot().find(".//testcase")
    assert case is not None
    props = {p.get("name"): p.get("value") for p in case.iter("property")}
    assert props["serrinj.injection.1"].startswith(f"nmi vm pid {vm.pid} vcpu 0: delivered")


@pytest.mark.kvm
@pytest.mark.root
@X86
def test_serrinj_vm_is_picked_by_option_or_environment(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with LoggedVm(str(tmp_path), vcpus=2) as vm:
        pytester.makepyfile(
            f"""
            def test_it(serrinj_vm):
                assert serrinj_vm.pid == {vm.pid}
                assert serrinj_vm.vcpu_ids == (0, 1)
                assert serrinj_vm.status().vcpus[1].vcpu_id == 1
            """
        )
        pytester.runpytest("--serrinj-pid", str(vm.pid)).assert_outcomes(passed=1)
        monkeypatch.setenv("SERRINJ_PID", str(vm.pid))
        pytester.runpytest().assert_outcomes(passed=1)
        monkeypatch.setenv("SERRINJ_PID", str(os.getpid()))  # the option wins over it
        pytester.runpytest("--serrinj-pid", str(vm.pid)).assert_outcomes(passed=1)
        result = pytester.runpytest()  # this process is no VMM: an error, serrinj's message
        result.assert_outcomes(errors=1)
        result.stdout.fnmatch_lines([f"*serrinj_vm: process {os.getpid()} (*) is not a KVM VMM*"])


# ---------------------------------------------------------------------- examples/pytest
EXAMPLE_SUITE = os.path.join(EXAMPLES, "pytest")
X86_CASES = {
    "test_a_corrected_machine_check_is_logged",
    "test_an_uncorrected_machine_check_is_logged",
    "test_an_nmi_is_handled",
    "test_the_vcpus_are_left_as_they_were",
}
ARM64_CASES = {
    "test_a_corrected_serror_is_survived",
    "test_an_uncorrectable_recoverable_serror_panics",
}


def run_example_suite(target: List[str], console: str, junit: Path) -> Tuple[int, str]:
    """pytest over examples/pytest in its own process, as a lab runs it."""
    argv = [sys.executable, "-m", "pytest", EXAMPLE_SUITE, *target, "--serrinj-console",
            console, f"--junitxml={junit}", "-rs", "-p", "no:cacheprovider"]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=300)
    return out.returncode, out.stdout + out.stderr


def check_example_report(junit: Path, rc: int, output: str) -> None:
    assert rc == 0, output
    xmlschema.XMLSchema(XSD).validate(str(junit))
    cases = _cases(junit)
    assert cases == {**{c: "passed" for c in X86_CASES}, **{c: "skipped" for c in ARM64_CASES}}
    assert "serrinj_needs('arm64'): needs an arm64 host; this one is x86_64" in output
    props = _suite_props(junit)
    corrected = next(v for k, v in props.items() if "corrected_machine_check" in k)
    assert corrected.startswith("mce bank=1 status=0x9c0000000000009f addr=0x12345000")
    uncorrected = next(v for k, v in props.items() if "uncorrected_machine_check" in k)
    assert uncorrected.startswith("mce bank=2 status=0xbd000000000000c0")
    assert any(k.endswith("test_an_nmi_is_handled serrinj.injection.1") for k in props)


@pytest.mark.kvm
@pytest.mark.root
@pytest.mark.slow
@X86
def test_the_example_suite_passes_against_the_test_vm(tmp_path: Path) -> None:
    with LoggedVm(str(tmp_path), vcpus=2) as vm:
        junit = tmp_path / "testvm.xml"
        rc, output = run_example_suite(["--serrinj-pid", str(vm.pid)], vm.log_path, junit)
        check_example_report(junit, rc, output)
        assert len([e for e in vm.events() if e["event"] == "nmi"]) == 1
        assert vm.proc.poll() is None


@pytest.fixture
def firmware_qemu(tmp_path: Path) -> Iterator[Tuple[str, str, int]]:
    """QEMU booting serrinj's firmware guest, its serial console written to a file."""
    qemu = need_tool("qemu-system-x86_64", "qemu-system-x86")
    image = tmp_path / "fw.bin"
    subprocess.run(
        [sys.executable, "-m", "serrinj.testvm.firmware_x86", "-o", str(image)], check=True
    )
    name = f"examples-{os.getpid()}"
    console = tmp_path / "console.log"
    with open(tmp_path / "qemu.out", "wb") as out:
        proc = subprocess.Popen(
            [qemu, "-accel", "kvm", "-bios", str(image), "-display", "none", "-monitor", "none",
             "-nic", "none", "-smp", "2", "-m", "32", "-name", f"guest={name},debug-threads=on",
             "-serial", f"file:{console}"],
            stdout=out, stderr=out, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while "ready cpu=1" not in (console.read_text() if console.exists() else ""):
            assert proc.poll() is None, (tmp_path / "qemu.out").read_text()
            assert time.monotonic() < deadline, "the firmware guest did not start"
            time.sleep(0.05)
        yield name, str(console), proc.pid
        assert proc.poll() is None, "QEMU exited during the suite"
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@pytest.mark.kvm
@pytest.mark.root
@pytest.mark.qemu
@pytest.mark.slow
@X86
def test_the_example_suite_passes_against_qemu(
    firmware_qemu: Tuple[str, str, int], tmp_path: Path
) -> None:
    name, console, _pid = firmware_qemu
    junit = tmp_path / "qemu.xml"
    rc, output = run_example_suite(["--serrinj-name", name], console, junit)
    check_example_report(junit, rc, output)
    with open(console) as f:
        text = f.read()
    assert "mce cpu=0 bank=2 status=0xbd000000000000c0 addr=0x0000000012345000" in text
    assert "nmi cpu=1 count=1" in text


@pytest.mark.kvm
@pytest.mark.root
@pytest.mark.slow
@X86
def test_a_failing_example_is_reported_as_a_failure(tmp_path: Path) -> None:
    """The same suite against a guest that prints nothing: the console checks fail, with the
    syndromes still in the report (the suite can fail)."""
    with LoggedVm(str(tmp_path), vcpus=2) as vm:
        silent = tmp_path / "silent.log"
        silent.write_text("")
        junit = tmp_path / "silent.xml"
        rc, output = run_example_suite(["--serrinj-pid", str(vm.pid)], str(silent), junit)
    assert rc == 1, output
    xmlschema.XMLSchema(XSD).validate(str(junit))
    cases = _cases(junit)
    assert {c for c, o in cases.items() if o == "failure"} == X86_CASES - {
        "test_the_vcpus_are_left_as_they_were"
    }
    assert "serrinj audit" in output and "serrinj vCPU status" in output
