"""The bare-metal arm64 guest (``serrinj.testvm.firmware_arm64``) under the inner QEMU with KVM.

Each test builds the guest ELF, boots it with
``qemu-system-aarch64 -M virt,gic-version=3 -accel kvm -cpu host -nodefaults -kernel``
(the UART on a pipe so the test can type to it), and reads its console:
``ready cpu=<n>`` for every CPU (the secondaries come up through PSCI CPU_ON
over HVC), ``pong`` for each ``p``, ``unmasked`` for ``u``. QEMU is always
ended by its pid.
"""

from __future__ import annotations

import fcntl
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterator, List, Optional, Set

import pytest

from lab.guest import env
from lab.guest.cli import serrinj
from lab.guest.nested import InnerQemu, NestedAssets
from lab.guest.qmp import Qmp
from serrinj.ops import audit
from serrinj.testvm.firmware_arm64 import PROBE_ADDR, FirmwareOptions, build

BOOT_TIMEOUT_S = 60
ISS_CE = 0x1811
ISS_KSELFTEST = 0x101D1ED
#: ioctl is syscall 29 on arm64; KVM_RUN is 0xae80 (what /proc/PID/task/TID/syscall shows)
_KVM_RUN_SYSCALL = re.compile(r"^29 0x[0-9a-f]+ 0xae80 ")


#: the VM's name with -name guest=NAME,debug-threads=on
NAME = "bare"


def _command(qemu: str, elf: str, smp: int, debug_threads: bool, qmp: str) -> List[str]:
    cmd = [qemu, "-M", "virt,gic-version=3", "-accel", "kvm", "-cpu", "host", "-nodefaults",
           "-display", "none", "-no-reboot", "-m", "64", "-serial", "stdio", "-kernel", elf,
           "-smp", str(smp), "-qmp", f"unix:{qmp},server=on,wait=off"]  # fmt: skip
    if debug_threads:
        cmd += ["-name", f"guest={NAME},debug-threads=on"]
    return cmd


class Bare:
    """One inner QEMU running the bare guest."""

    def __init__(self, vm: InnerQemu, smp: int, qmp_path: str, debug_threads: bool) -> None:
        self.vm = vm
        self.smp = smp
        self.qmp_path = qmp_path
        self.debug_threads = debug_threads

    def qmp(self) -> Qmp:
        """A QMP session with this QEMU (close it, or use it in ``with``)."""
        return Qmp(self.qmp_path)

    def target(self) -> List[str]:
        """How serrinj is told which VM: by name when QEMU has one, else by pid."""
        return ["--name", NAME] if self.debug_threads else ["--pid", str(self.pid)]

    @property
    def pid(self) -> int:
        return self.vm.pid

    def type(self, data: str) -> None:
        # InnerQemu.send adds a newline, which the guest ignores like any unknown byte
        self.vm.send(data)

    def wait_ready(self) -> float:
        """Seconds until every CPU said ``ready``."""
        t0 = time.monotonic()
        self.vm.wait_for(r"^boot mode=", BOOT_TIMEOUT_S)
        seen: Set[int] = set()
        while len(seen) < self.smp:
            line = self.vm.wait_for(r"^ready cpu=\d+$", BOOT_TIMEOUT_S)
            seen.add(int(line.split("=")[1]))
        assert seen == set(range(self.smp))
        return time.monotonic() - t0

    def threads(self) -> List[int]:
        return sorted(int(t) for t in os.listdir(f"/proc/{self.pid}/task"))

    def comm(self, tid: int) -> str:
        with open(f"/proc/{self.pid}/task/{tid}/comm") as fh:
            return fh.read().strip()

    def syscall(self, tid: int) -> str:
        with open(f"/proc/{self.pid}/task/{tid}/syscall") as fh:
            return fh.read().strip()

    def proc_alive(self) -> bool:
        return self.vm.proc.poll() is None

    def problems(self) -> List[str]:
        return [
            line for line in self.vm.lines if line.startswith(("exception", "halted", "timeout"))
        ]


StartBare = Callable[..., Bare]


@pytest.fixture
def bare(nested: NestedAssets) -> Iterator[StartBare]:
    started: List[InnerQemu] = []
    tmp = tempfile.TemporaryDirectory(prefix="bare-")

    def _start(opts: FirmwareOptions, smp: int, debug_threads: bool = True) -> Bare:
        elf = os.path.join(tmp.name, f"guest{len(started)}.elf")
        qmp = os.path.join(tmp.name, f"qmp{len(started)}.sock")
        with open(elf, "wb") as fh:
            fh.write(build(opts).elf())
        proc = subprocess.Popen(
            _command(nested.qemu, elf, smp, debug_threads, qmp),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        vm = InnerQemu(proc)
        started.append(vm)
        return Bare(vm, smp, qmp, debug_threads)

    try:
        yield _start
    finally:
        for vm in started:
            vm.stop()
        tmp.cleanup()


def _wait_thread_state(b: Bare, tid: int, want: re.Pattern[str], timeout: float) -> Optional[str]:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        last = b.syscall(tid)
        if want.search(last):
            return None
        time.sleep(0.05)
    return last


@pytest.mark.parametrize("debug_threads", [True, False], ids=["debug-threads", "plain-names"])
@pytest.mark.parametrize("smp", [1, 2])
def test_boot_ready_and_pong(bare: StartBare, smp: int, debug_threads: bool) -> None:
    b = bare(FirmwareOptions(mode="wfi"), smp, debug_threads)
    took = b.wait_ready()
    print(f"bare smp={smp} ready after {took:.2f} s")
    b.type("p")
    assert b.vm.wait_for(r"^pong ", 10) == "pong cpu=0 n=1"
    b.type("p")
    assert b.vm.wait_for(r"^pong ", 10) == "pong cpu=0 n=2"
    names = {b.comm(t) for t in b.threads()}
    if debug_threads:
        assert {f"CPU {n}/KVM" for n in range(smp)} <= names
    else:
        assert not any(n.endswith("/KVM") for n in names)
        assert "qemu-system-aar" in names
    assert b.problems() == []


def test_idle_vcpus_wait_in_kvm_run(bare: StartBare) -> None:
    """In wfi mode every vCPU thread sits in ioctl(KVM_RUN): the idle guest of BRIEF section 1."""
    b = bare(FirmwareOptions(mode="wfi"), 2)
    b.wait_ready()
    vcpu_threads = [t for t in b.threads() if re.match(r"CPU \d+/KVM", b.comm(t))]
    assert len(vcpu_threads) == 2
    for tid in vcpu_threads:
        assert _wait_thread_state(b, tid, _KVM_RUN_SYSCALL, 10) is None


def test_spin_mode_answers(bare: StartBare) -> None:
    b = bare(FirmwareOptions(mode="spin"), 2)
    b.wait_ready()
    b.type("pp")
    b.vm.wait_for(r"^pong cpu=0 n=2$", 10)
    assert b.problems() == []


@pytest.mark.parametrize("mode", ["wfi", "spin"])
def test_mask_serror_until_u(bare: StartBare, mode: str) -> None:
    b = bare(FirmwareOptions(mode=mode, mask_serror=True), 2)
    b.wait_ready()
    b.type("p")
    b.vm.wait_for(r"^pong ", 10)
    assert not [line for line in b.vm.lines if line.startswith("unmasked")]
    b.type("u")
    seen = {b.vm.wait_for(r"^unmasked cpu=\d+$", 10) for _ in range(2)}
    assert seen == {"unmasked cpu=0", "unmasked cpu=1"}


def test_mmio_probe_is_answered_by_qemu(bare: StartBare) -> None:
    """Under KVM the unassigned probe address is an MMIO exit QEMU answers: no abort by itself."""
    b = bare(FirmwareOptions(mode="spin", mmio_probe=True), 2)
    b.wait_ready()
    b.type("p")
    b.vm.wait_for(r"^pong cpu=0 n=1$", 20)
    time.sleep(0.5)
    b.type("p")
    b.vm.wait_for(r"^pong cpu=0 n=2$", 20)
    assert not [line for line in b.vm.lines if line.startswith("sync")]
    assert b.problems() == []


# --- through serrinj's CLI: the remote engine injects into the inner QEMU, the guest reports

ISS_UER = 0x0C11
ESR_SERROR = 0xBE000000
IDS = 1 << 24
#: (--esr value or None for the CPU's own syndrome)
CE, UER, KSELFTEST, CPU = ISS_CE, ISS_UER, ISS_KSELFTEST, None
#: (smp, debug-threads, mode, the first ISS): every pair of vCPU count, thread naming
#: and idle/busy guest occurs once; each configuration then takes every syndrome
SYNDROMES = [CE, UER, KSELFTEST, CPU]
PAIRWISE = [
    (1, False, "wfi", CE),
    (2, True, "wfi", UER),
    (1, True, "spin", KSELFTEST),
    (2, False, "spin", CPU),
]


def _esr(line: str) -> int:
    m = re.search(r" esr=0x([0-9a-f]{16}) ", line)
    assert m, line
    return int(m.group(1), 16)


def _still_running(b: Bare, pongs: int) -> None:
    """QEMU's own word (QMP) that the VM runs, and the guest's answer on its console."""
    with b.qmp() as q:
        assert q.execute("query-status")["status"] == "running"
    b.type("p")
    pong = b.vm.wait_for(rf"^pong cpu=0 n={pongs}$", 20)
    assert b.proc_alive()
    assert b.problems() == []
    print(f"QEMU still running (QMP query-status), the guest answered {pong!r}")


@pytest.mark.parametrize(
    "smp, debug_threads, mode, iss",
    PAIRWISE,
    ids=[f"smp{n}-{'named' if d else 'unnamed'}-{m}" for n, d, m, _ in PAIRWISE],
)
def test_serrinj_injects_serror_into_the_bare_guest(
    bare: StartBare,
    smp: int,
    debug_threads: bool,
    mode: str,
    iss: Optional[int],
    lab: env.LabConfig,
) -> None:
    """Every syndrome (CE, UER, IDS, the CPU's own; starting with the configuration's
    own) reaches the bare guest exactly, injected in turn into each of its vCPUs
    through the thread QEMU itself names for that vCPU; QEMU runs on."""
    b = bare(FirmwareOptions(mode=mode), smp, debug_threads)
    b.wait_ready()
    with b.qmp() as q:
        threads = q.cpu_threads()  # QEMU's own cpu-index -> thread id
    assert sorted(threads) == list(range(smp))
    # an ESR needs RAS (refused with exit 5: test_cli_arm64)
    order = [iss, *[x for x in SYNDROMES if x != iss]] if lab.expect_ras else [CPU]
    seen: List[str] = []
    for i, syndrome in enumerate(order):
        vcpu = (smp - 1 - i) % smp  # the last vCPU first, then alternating
        args = ["inject", *b.target(), "--vcpu", str(vcpu), "--wait", "20"]
        if syndrome is not None:
            args += ["--esr", hex(syndrome)]
        r = serrinj(*args)
        assert r.rc == 0, r
        inj = r.data["injections"][0]
        assert inj["tid"] == threads[vcpu], "serrinj stopped another thread than QEMU's vCPU"
        assert inj["registers_restored"] is True and inj["delivery"]["delivered"] is True
        line = b.vm.wait_for(rf"^serror cpu={vcpu} ", 20)
        seen.append(line)
        what = "the CPU's own syndrome" if syndrome is None else f"--esr {syndrome:#x}"
        print(f"bare {mode} smp={smp} {b.target()[0]} vCPU {vcpu}: {what} -> {line!r}")
        if syndrome is not None:
            assert _esr(line) == ESR_SERROR | syndrome
        elif lab.expect_ras:
            assert _esr(line) == ESR_SERROR | IDS  # KVM's own syndrome on a RAS host
        else:
            assert _esr(line) >> 26 == 0x2F  # chosen by a CPU without RAS
    # exactly one SError per injection
    assert [x for x in b.vm.lines if x.startswith("serror")] == seen
    _still_running(b, 1)


def test_serrinj_masked_serror_waits_for_unmask(bare: StartBare, lab: env.LabConfig) -> None:
    if not lab.expect_ras:
        pytest.skip("needs a host with RAS (an ESR is refused otherwise)")
    b = bare(FirmwareOptions(mode="wfi", mask_serror=True), 2)
    b.wait_ready()
    r = serrinj("inject", "--pid", str(b.pid), "--vcpu", "1", "--esr", hex(ISS_KSELFTEST))
    assert r.rc == 0, r
    b.type("p")
    b.vm.wait_for(r"^pong ", 20)
    assert not [line for line in b.vm.lines if line.startswith("serror")]
    b.type("u")
    line = b.vm.wait_for(r"^serror cpu=1 ", 20)
    assert _esr(line) == 0xBE000000 | ISS_KSELFTEST
    assert b.problems() == []


@pytest.mark.parametrize(
    "smp, debug_threads", [(2, True), (1, False)], ids=["smp2-named", "smp1-unnamed"]
)
def test_serrinj_ext_dabt_hits_the_probe(bare: StartBare, smp: int, debug_threads: bool) -> None:
    b = bare(FirmwareOptions(mode="spin", mmio_probe=True), smp, debug_threads)
    b.wait_ready()
    vcpu = smp - 1
    r = serrinj(
        "inject", *b.target(), "--vcpu", str(vcpu), "--ext-dabt", "--mmio-addr", hex(PROBE_ADDR),
        "--mmio-timeout", "20",
    )  # fmt: skip
    assert r.rc == 0, r
    assert r.data["injections"][0]["before"]["mmio_exit"]["phys_addr"] == PROBE_ADDR
    line = b.vm.wait_for(rf"^sync cpu={vcpu} ", 20)
    print(f"bare ext_dabt: {line!r}")
    low = _esr(line) & 0xFFFFFFFF
    assert low >> 26 == 0x25 and low & 0x3F == 0x10
    assert line.endswith(f"far=0x{PROBE_ADDR:016x}")
    _still_running(b, 1)  # the probe load was skipped and the guest runs on


def _iss_for(lab: env.LabConfig) -> Optional[int]:
    """A survivable RAS syndrome on a RAS host; the CPU's own without RAS (an ESR is refused)."""
    return ISS_CE if lab.expect_ras else CPU


def _check_esr(line: str, iss: Optional[int], lab: env.LabConfig) -> None:
    if iss is not None:
        assert _esr(line) == ESR_SERROR | iss, line
    elif lab.expect_ras:
        assert _esr(line) == ESR_SERROR | IDS, line
    else:
        assert _esr(line) >> 26 == 0x2F, line


def test_paused_qemu_takes_the_serror_after_cont(bare: StartBare, lab: env.LabConfig) -> None:
    """QMP ``stop``, then serrinj injects into the paused QEMU: it succeeds, the guest
    takes nothing while paused, and takes exactly the injected SError after ``cont``."""
    b = bare(FirmwareOptions(mode="wfi"), 2)
    b.wait_ready()
    with b.qmp() as q:
        q.execute("stop")
        assert q.execute("query-status")["status"] == "paused"
    iss = _iss_for(lab)
    r = serrinj("inject", *b.target(), "--vcpu", "1", *([] if iss is None else ["--esr", hex(iss)]))
    assert r.rc == 0, r
    inj = r.data["injections"][0]
    assert inj["registers_restored"] is True
    after = inj["after"]
    print(
        f"paused QEMU: inject --vcpu 1 ok (thread {inj['thread_state']}); after SET"
        f" serror_pending={after['serror_pending']} serror_esr={after['serror_esr']:#x}"
    )
    # as this kernel does it: up to 6.16 pending until the vCPU runs; since 6.17 already
    # in the guest's registers (PC at the SError vector), handled when the VM resumes
    assert inj["thread_state"] == "userspace"
    assert after["serror_pending"] is (not lab.expect_commit)
    if lab.expect_commit:
        taken = after["last_exception"]
        assert taken["serror"] and taken["at_serror_vector"], taken
        d = inj["delivery"]
        assert d["delivered"] and d["polls"] == 0 and "when the VM resumes" in d["reason"], d
        st = serrinj("status", *b.target(), "--vcpu", "1")
        assert st.rc == 0, st
        last = st.data["vcpus"][0]["last_exception"]
        assert last["at_serror_vector"] and last["esr_el1"] == taken["esr_el1"], last
        print(f"  status while paused: SError in the registers, PC {last['pc']:#x}")
    elif lab.expect_ras:
        assert after["serror_esr"] == (IDS if iss is None else iss)
    # paused: the guest runs nothing, so it prints no serror line
    with pytest.raises(TimeoutError):
        b.vm.wait_for(r"^serror ", 1.0)
    with b.qmp() as q:
        q.execute("cont")
    line = b.vm.wait_for(r"^serror cpu=1 ", 20)
    print(f"after cont the guest printed {line!r}")
    _check_esr(line, iss, lab)
    assert [x for x in b.vm.lines if x.startswith("serror")] == [line]  # one, not two
    _still_running(b, 1)


def test_qemu_exiting_mid_injection_is_a_clear_error(bare: StartBare, lab: env.LabConfig) -> None:
    """QEMU is killed while serrinj holds its vCPU thread (registers borrowed, the ioctl
    not yet run): serrinj ends with a clear error (exit 3, no traceback), the VM's lock
    is free again and the audit log records the failed injection."""
    b = bare(FirmwareOptions(mode="wfi"), 2)
    b.wait_ready()
    with tempfile.TemporaryDirectory(prefix="exit-mid-") as tmp:
        _exit_mid_injection(b, lab, tmp)


def _exit_mid_injection(b: Bare, lab: env.LabConfig, tmp: str) -> None:
    marker = os.path.join(tmp, "pause")
    audit_log = os.path.join(tmp, "audit.jsonl")
    locks = os.path.join(tmp, "locks")
    env_vars = dict(os.environ, SERRINJ_AUDIT_LOG=audit_log, SERRINJ_LOCK_DIR=locks)
    iss = _iss_for(lab)
    args = ["inject", *b.target(), "--vcpu", "0", *([] if iss is None else ["--esr", hex(iss)])]
    # held at `borrowed` by the test-only launcher (the engine's phase observer)
    paused = [sys.executable, "-m", "tests.helpers.paused_serrinj", "--pause-at", "borrowed",
              "--marker", marker, "--"]  # fmt: skip
    proc = subprocess.Popen(
        [*paused, *args],
        env=env_vars, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(marker):
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        os.kill(b.pid, signal.SIGKILL)  # the QEMU this test started
        time.sleep(0.2)
        os.unlink(marker)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()  # the serrinj this test started
            proc.communicate()
    print(f"serrinj with QEMU killed mid-injection: rc={proc.returncode}, {err.strip()!r}")
    assert proc.returncode == 3, (out, err)
    assert err.startswith("error: ") and "exited" in err, err
    assert "Traceback" not in err
    assert b.vm.proc.wait(timeout=10) == -signal.SIGKILL
    # no bad state: the VM's lock is free, and the attempt is in the audit log
    held = [f for f in os.listdir(locks) if f.startswith(f"vm-{b.pid}-")]
    assert len(held) == 1, os.listdir(locks)
    fd = os.open(os.path.join(locks, held[0]), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if still held
    finally:
        os.close(fd)
    records = audit.read(log=audit_log)
    assert [(x["action"], x["outcome"]) for x in records] == [("inject-serror", "failed")]
    rec = records[0]
    assert rec["error"]["kind"] == "target-gone" and rec["vcpu_id"] == 0, rec
    print(f"lock {held[0]} free; audit: {rec['action']} {rec['outcome']} ({rec['error']['kind']})")
