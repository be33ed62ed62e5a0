"""serrinj against a VMM nobody here wrote: an unmodified QEMU (x86_64, -accel kvm).

QEMU boots serrinj's firmware guest (``-bios``), which prints what it
observes on its serial port. serrinj is used through its CLI, in its own
process, exactly as a user would. QEMU's own QMP is the independent witness
(``query-cpus-fast`` thread ids, ``query-status``).

Each test prints what the guest printed on its serial port for each injection;
pytest shows that for passing tests too, in an "observations" section of its
terminal summary (``tests.helpers.qemu.show_observations``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest

from serrinj.codec import mce
from tests.helpers import serrinj_cli
from tests.helpers.paused import paused_argv
from tests.helpers.qemu import Qemu, build_firmware, show_observations

pytestmark = [pytest.mark.qemu, pytest.mark.kvm, pytest.mark.root]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def _observations(request: pytest.FixtureRequest) -> None:
    show_observations(request)


def _observe(qemu: Qemu, since: int, what: str) -> None:
    """Print the guest's serial lines since ``since``: the observation of one injection."""
    lines = qemu.lines_since(since)
    print(f"{what}: guest serial: {' | '.join(lines) if lines else '(nothing)'}")


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
    r = serrinj_cli.run("--json", *args, env=env, inherit_env=env is None)
    try:
        data = json.loads(r.stdout) if r.stdout.strip() else None
    except json.JSONDecodeError:
        data = r.stdout
    return r.rc, data, r.stderr


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


_STOPPED = ("t", "T")  # ptrace stop, job-control stop


def _held_run(qemu: Qemu, vcpu: int, tmp: Path, *args: str) -> Tuple[int, int]:
    """Run ``serrinj ARGS`` with the engine pausing at every remote syscall (its
    ``borrowed`` pause point: registers replaced, the ioctl not yet run), and sample
    every QEMU thread's state at each pause and between them. Asserts that vCPU
    ``vcpu``'s thread is in a ptrace stop at each pause and that no other QEMU thread
    is ever stopped; returns (pauses, samples)."""
    tid = qemu.cpu_threads()[vcpu]
    marker = tmp / f"held-{vcpu}-{time.monotonic_ns()}"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [*paused_argv("borrowed", marker), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    at_pauses: List[Dict[int, str]] = []
    samples: List[Dict[int, str]] = []
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None:
            assert time.monotonic() < deadline, "serrinj did not finish"
            if marker.exists():
                at_pauses.append(_thread_states(qemu.pid))
                marker.unlink()  # release this pause; the next syscall pauses again
            else:
                samples.append(_thread_states(qemu.pid))
                time.sleep(0.002)
        _out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()  # the serrinj started above
            proc.communicate()
    assert proc.returncode == 0, err
    assert at_pauses, "the engine never reached its borrowed pause point"
    for states in at_pauses:
        assert states[tid] == "t", f"the target vCPU thread is not in a ptrace stop: {states}"
    stopped = sorted(
        {t for st in [*at_pauses, *samples] for t, state in st.items() if state in _STOPPED} - {tid}
    )
    assert stopped == [], f"other QEMU threads were stopped: {stopped}"
    return len(at_pauses), len(samples) + len(at_pauses)


@pytest.mark.parametrize("qemu", [True, False], indirect=True, ids=["debug-threads", "unnamed"])
def test_nmi_and_machine_checks_reach_the_guest_and_qemu_runs_on(
    qemu: Qemu, tmp_path: Path
) -> None:
    """An NMI and two machine checks, each with serrinj held at every remote syscall:
    only the target vCPU's thread is ever stopped, the guest reports each fault on its
    serial port and answers a ping after each one, and QEMU keeps running."""
    mark = qemu.mark()
    held = _held_run(qemu, 1, tmp_path, "nmi", "--name", qemu.name, "--vcpu", "1")
    qemu.wait_line("nmi cpu=1 count=1", since=mark)
    qemu.ping()
    _observe(qemu, mark, f"nmi vCPU 1, held at {held[0]} pause(s), no other thread stopped")
    mark = qemu.mark()
    rc, doc, err = serrinj("nmi", "--name", qemu.name, "--vcpu", "1", "--wait")
    assert rc == 0, err
    assert doc["injections"][0]["delivery"]["delivered"] is True
    qemu.wait_line("nmi cpu=1 count=2", since=mark)
    qemu.ping()
    _observe(qemu, mark, "nmi vCPU 1 --wait")
    for vid, name, bank in ((0, "corrected", 2), (0, "srao", 1)):
        p = mce.preset(name).build(bank=bank, addr=0x7000 + bank)
        mark = qemu.mark()
        held = _held_run(
            qemu, vid, tmp_path,
            "mce", "--name", qemu.name, "--vcpu", str(vid), "--bank", str(bank),
            "--status", hex(p.status), "--addr", hex(p.addr), "--misc", hex(p.misc),
            "--mcg-status", hex(p.mcg_status),
        )  # fmt: skip
        kind = "mce" if p.status & (1 << 61) else "mce-poll"
        line = qemu.wait_line(f"{kind} cpu={vid} bank={bank} *", since=mark)
        assert f"status=0x{p.status:016x}" in line and f"addr=0x{p.addr:016x}" in line
        assert qemu.status() == "running"
        assert qemu.ping().startswith("pong cpu=0")  # the guest answers after each one
        _observe(
            qemu, mark, f"mce {name} vCPU {vid} bank {bank}, held at {held[0]} pause(s),"
            " no other thread stopped",
        )  # fmt: skip


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
    assert qemu.ping().startswith("pong cpu=0")
    _observe(qemu, mark, "nmi vCPU 1 and mce srao vCPU 0 while paused, then cont")


def test_qemu_exiting_mid_injection_is_a_clear_error(qemu: Qemu, tmp_path: Path) -> None:
    mark = qemu.mark()
    marker = tmp_path / "pause"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [*paused_argv("borrowed", marker), "nmi", "--name", qemu.name, "--vcpu", "0"],
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
    _observe(qemu, mark, f"nmi vCPU 0, QEMU killed mid-injection: serrinj said {err.strip()!r}")
