"""serrinj against a VMM nobody here wrote: an unmodified QEMU (x86_64, -accel kvm).

QEMU boots serrinj's firmware guest (``-bios``), which prints what it
observes on its serial port. serrinj is used through its CLI, in its own
process, exactly as a user would. QEMU's own QMP is the independent witness
(``query-cpus-fast`` thread ids, ``query-status``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest

from serrinj import mce
from tests.helpers.qemu import Qemu, build_firmware

pytestmark = [pytest.mark.qemu, pytest.mark.kvm, pytest.mark.root]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def firmware(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_firmware(tmp_path_factory.mktemp("fw") / "stub.bin")


@pytest.fixture
def qemu(request: pytest.FixtureRequest, tmp_path: Path, firmware: Path) -> Iterator[Qemu]:
    debug_threads = getattr(request, "param", True)
    q = Qemu(
        tmp_path, firmware, f"srj-{os.getpid()}-{tmp_path.name[-6:]}", debug_threads=debug_threads
    )
    try:
        q.wait_line("ready cpu=0")
        q.wait_line("ready cpu=1")
        yield q
    finally:
        q.stop()


def serrinj(*args: str, env: Dict[str, str] | None = None) -> Tuple[int, Any, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "serrinj", "--json", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    try:
        data = json.loads(proc.stdout) if proc.stdout.strip() else None
    except json.JSONDecodeError:
        data = proc.stdout
    return proc.returncode, data, proc.stderr


def _vcpus(doc: Any) -> List[Dict[str, Any]]:
    return list(doc["vcpus"])


@pytest.mark.parametrize("qemu", [True, False], indirect=True, ids=["debug-threads", "unnamed"])
def test_list_and_status_find_qemu_and_its_vcpu_threads(qemu: Qemu) -> None:
    rc, doc, err = serrinj("list")
    assert rc == 0, err
    vms = [v for v in doc["vms"] if v["pid"] == qemu.pid]
    assert len(vms) == 1 and vms[0]["name"] == qemu.name and vms[0]["vmm"] == "qemu"
    rc, doc, err = serrinj("status", "--name", qemu.name)
    assert rc == 0, err
    truth = qemu.cpu_threads()  # QEMU's own cpu-index -> thread id
    got = {v["vcpu_id"]: v["thread"]["tid"] for v in _vcpus(doc)}
    assert got == truth
    assert all(v["registers_restored"] for v in _vcpus(doc))
    assert qemu.status() == "running"


def _thread_states(pid: int) -> Dict[int, str]:
    out: Dict[int, str] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        out[int(tid)] = raw[raw.rindex(")") + 2]
    return out


def _states_while_held(qemu: Qemu, vcpu: int, tmp: Path) -> Dict[int, str]:
    """Every QEMU thread's state while serrinj holds vCPU ``vcpu`` at its
    ``borrowed`` pause point (registers replaced, the ioctl not yet run)."""
    marker = tmp / f"held-{vcpu}"
    env = dict(
        os.environ,
        SERRINJ_TEST_PAUSE_AT="borrowed",
        SERRINJ_TEST_PAUSE_FILE=str(marker),
        PYTHONPATH=str(ROOT),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "serrinj", "nmi", "--name", qemu.name, "--vcpu", str(vcpu)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr
            time.sleep(0.01)
        states = _thread_states(qemu.pid)
    finally:
        # The engine pauses at this phase of every remote syscall: keep releasing.
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError):
                marker.unlink()
            time.sleep(0.005)
        _out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    return states


@pytest.mark.parametrize("qemu", [True, False], indirect=True, ids=["debug-threads", "unnamed"])
def test_nmi_and_machine_checks_reach_the_guest_and_qemu_runs_on(
    qemu: Qemu, tmp_path: Path
) -> None:
    threads = qemu.cpu_threads()
    mark = qemu.mark()
    states = _states_while_held(qemu, 1, tmp_path)
    assert states[threads[1]] == "t", "the target vCPU thread is not in a ptrace stop"
    stopped = [tid for tid, st in states.items() if st == "t" and tid != threads[1]]
    assert stopped == [], f"other QEMU threads were stopped: {stopped}"
    qemu.wait_line("nmi cpu=1 count=1", since=mark)
    rc, doc, err = serrinj("nmi", "--name", qemu.name, "--vcpu", "1", "--wait")
    assert rc == 0, err
    assert doc["injections"][0]["delivery"]["delivered"] is True
    qemu.wait_line("nmi cpu=1 count=2", since=mark)
    for vid, name, bank in ((0, "corrected", 2), (0, "srao", 1)):
        p = mce.preset(name).build(bank=bank, addr=0x7000 + bank)
        mark = qemu.mark()
        rc, doc, err = serrinj(
            "mce", "--name", qemu.name, "--vcpu", str(vid), "--bank", str(bank),
            "--status", hex(p.status), "--addr", hex(p.addr), "--misc", hex(p.misc),
            "--mcg-status", hex(p.mcg_status),
        )  # fmt: skip
        assert rc == 0, err
        kind = "mce" if p.status & (1 << 61) else "mce-poll"
        line = qemu.wait_line(f"{kind} cpu={vid} bank={bank} *", since=mark)
        assert f"status=0x{p.status:016x}" in line and f"addr=0x{p.addr:016x}" in line
        assert qemu.status() == "running"
    assert qemu.ping().startswith("pong cpu=0")


@pytest.mark.parametrize("qemu", [True, False], indirect=True, ids=["debug-threads", "unnamed"])
def test_paused_qemu_takes_the_faults_after_cont(qemu: Qemu) -> None:
    qemu.qmp("stop")
    assert qemu.status() == "paused"
    mark = qemu.mark()
    rc, _doc, err = serrinj("nmi", "--name", qemu.name, "--vcpu", "1")
    assert rc == 0, err
    uc = mce.preset("srao").build(bank=3, addr=0x9000)
    rc, _doc, err = serrinj(
        "mce", "--name", qemu.name, "--vcpu", "0", "--bank", "3", "--status", hex(uc.status),
        "--addr", hex(uc.addr), "--misc", hex(uc.misc), "--mcg-status", hex(uc.mcg_status),
    )  # fmt: skip
    assert rc == 0, err
    time.sleep(0.5)
    assert not [x for x in qemu.lines_since(mark) if x.startswith(("nmi", "mce"))]
    qemu.qmp("cont")
    qemu.wait_line("nmi cpu=1 count=1", since=mark)
    qemu.wait_line(f"mce cpu=0 bank=3 status=0x{uc.status:016x}*", since=mark)
    assert qemu.status() == "running"


def test_qemu_exiting_mid_injection_is_a_clear_error(qemu: Qemu, tmp_path: Path) -> None:
    marker = tmp_path / "pause"
    env = dict(
        os.environ,
        SERRINJ_TEST_PAUSE_AT="borrowed",
        SERRINJ_TEST_PAUSE_FILE=str(marker),
        PYTHONPATH=str(ROOT),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "serrinj", "nmi", "--name", qemu.name, "--vcpu", "0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 20
    while not marker.exists():
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr
        time.sleep(0.01)
    os.kill(qemu.pid, signal.SIGKILL)
    time.sleep(0.1)
    marker.unlink()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 3, (out, err)
    assert err.startswith("error: ") and "exited" in err
    assert "Traceback" not in err
    qemu.proc.wait(timeout=10)
