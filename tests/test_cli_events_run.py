"""`serrinj events save|load` and `serrinj run`, through the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, List, Tuple

import pytest
import xmlschema

from serrinj.testvm.process import TestVmProcess
from tests.helpers import serrinj_cli
from tests.helpers.testvm import VmFactory

pytestmark = [pytest.mark.kvm, pytest.mark.root]
ROOT = Path(__file__).resolve().parent.parent
XSD = ROOT / "tests/data/junit/junit-10.xsd"
X86 = os.uname().machine == "x86_64"


def serrinj(*args: str) -> Tuple[int, str, str]:
    r = serrinj_cli.run(*args, timeout=120)
    return r.rc, r.stdout, r.stderr


@pytest.fixture
def pair(start_vm: VmFactory) -> Tuple[TestVmProcess, TestVmProcess]:
    paused = ["--start-paused"]
    return start_vm(vcpus=2, extra=paused), start_vm(vcpus=2, extra=paused)


@pytest.mark.skipif(not X86, reason="the arm64 scenario runs in the arm64 lab")
def test_events_save_load_through_the_cli(
    pair: Tuple[TestVmProcess, TestVmProcess], tmp_path: Path
) -> None:
    a, b = pair
    assert serrinj("nmi", "--pid", str(a.pid), "--vcpu", "0")[0] == 0
    # to stdout, as a plain file
    rc, out, err = serrinj("events", "save", "--pid", str(a.pid))
    assert rc == 0, err
    assert json.loads(out)["schema"] == "serrinj-events/1"
    saved = tmp_path / "a.json"
    saved.write_text(out)
    rc, out, err = serrinj("--json", "events", "load", str(saved), "--pid", str(b.pid))
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["command"] == "events load"
    assert [r["after"]["nmi"]["pending"] for r in doc["results"]] == [1, 0]
    mark = b.mark()
    b.command({"cmd": "run"})
    assert b.wait_event(lambda e: e["event"] == "nmi", since=mark)["vcpu"] == 0
    # a broken file is refused, naming the key, and nothing is loaded
    bad = json.loads(saved.read_text())
    bad["arch"] = "mips"
    saved.write_text(json.dumps(bad))
    rc, _out, err = serrinj("events", "load", str(saved), "--pid", str(a.pid))
    assert rc == 2 and "arch" in err


class LoggedVm:
    """The test VM with its event lines in a file the campaign's log steps read."""

    def __init__(self, log: Path) -> None:
        self.log = open(log, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serrinj.testvm", "--vcpus", "2", "--ignore-eof"],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
        )
        self.path = log

    def ready(self) -> None:
        import time

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            lines = self.path.read_text().splitlines()
            if sum('"guest-ready"' in x for x in lines) >= 2:
                return
            time.sleep(0.05)
        raise AssertionError("the test VM did not get ready")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


@pytest.mark.skipif(not X86, reason="x86-smoke.toml is the x86_64 example")
def test_run_the_x86_example_with_junit_and_json_lines(tmp_path: Path) -> None:
    vm = LoggedVm(tmp_path / "guest.log")
    try:
        vm.ready()
        report = tmp_path / "report.xml"
        rc, out, err = serrinj(
            "--json", "run", str(ROOT / "examples/x86-smoke.toml"), "--pid", str(vm.proc.pid),
            "--log", str(vm.path), "--junit", str(report),
        )  # fmt: skip
        assert rc == 0, (out, err)
        lines: List[Any] = [json.loads(x) for x in out.splitlines()]
        assert all(x["schema"] == "serrinj/1" and x["command"] == "run" for x in lines)
        events = [x["event"]["event"] for x in lines[:-1]]
        assert events[0] == "campaign-started" and events[-1] == "campaign-finished"
        result = lines[-1]
        assert result["exit_code"] == 0 and result["counts"]["failed"] == 0
        schema = xmlschema.XMLSchema(str(XSD))
        schema.validate(str(report))
        assert 'failures="0"' in report.read_text()
    finally:
        vm.close()


def test_run_refuses_a_bad_file_and_still_writes_a_report(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[steps]]\ninject = "nmi"\nsevrity = "ce"\n')
    report = tmp_path / "r.xml"
    rc, _out, err = serrinj("run", str(bad), "--junit", str(report), "--pid", "1")
    assert rc == 2
    assert f"{bad}:3" in err and "sevrity" in err
    assert 'errors="1"' in report.read_text() or "<error" in report.read_text()


@pytest.mark.skipif(not X86, reason="x86-smoke.toml is the x86_64 example")
def test_run_on_a_terminal_draws_a_progress_bar(tmp_path: Path) -> None:
    """With stderr on a terminal (a pty here), ``serrinj run`` draws rich's progress
    bar there while the steps run: the step being run and its count out of the total."""
    import pty
    import re
    import select

    vm = LoggedVm(tmp_path / "guest.log")
    master, slave = pty.openpty()
    try:
        vm.ready()
        proc = subprocess.Popen(
            [sys.executable, "-m", "serrinj", "run", str(ROOT / "examples/x86-smoke.toml"),
             "--pid", str(vm.proc.pid), "--log", str(vm.path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave,
            env={**{k: v for k, v in os.environ.items() if k != "NO_COLOR"},
                 "TERM": "xterm", "COLUMNS": "120"},
        )  # fmt: skip
        os.close(slave)
        slave = -1
        screen = b""
        while True:
            ready, _, _ = select.select([master], [], [], 30)
            if not ready:
                break
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer of the pty has gone
                break
            if not chunk:
                break
            screen += chunk
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, (out, screen[-2000:])
        text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.decode("utf-8", "replace"))
        # MofNCompleteColumn: "done/total" with the campaign's 9 steps, and the bar itself
        counts = {int(m) for m in re.findall(r"\b(\d)/9\b", text)}
        assert len(counts) >= 2 and max(counts) <= 9, text[-2000:]
        assert "━" in text, text[-2000:]
        # the report itself goes to stdout, not the terminal
        assert b"x86-smoke" in out
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
        vm.close()
