"""The bare-metal arm64 guest (``serrinj.testvm.firmware_arm64``) under the inner QEMU with KVM.

Each test builds the guest ELF, boots it with
``qemu-system-aarch64 -M virt,gic-version=3 -accel kvm -cpu host -nodefaults -kernel``
(the UART on a pipe so the test can type to it), and reads its console:
``ready cpu=<n>`` for every CPU (the secondaries come up through PSCI CPU_ON
over HVC), ``pong`` for each ``p``, ``unmasked`` for ``u``. QEMU is always
ended by its pid.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterator, List, Optional, Set

import pytest

from lab.guest import env
from lab.guest.nested import InnerQemu, NestedAssets
from serrinj.testvm.firmware_arm64 import PROBE_ADDR, FirmwareOptions, build

BOOT_TIMEOUT_S = 60
ISS_CE = 0x1811
ISS_KSELFTEST = 0x101D1ED
#: ioctl is syscall 29 on arm64; KVM_RUN is 0xae80 (what /proc/PID/task/TID/syscall shows)
_KVM_RUN_SYSCALL = re.compile(r"^29 0x[0-9a-f]+ 0xae80 ")


def _command(qemu: str, elf: str, smp: int, debug_threads: bool) -> List[str]:
    cmd = [qemu, "-M", "virt,gic-version=3", "-accel", "kvm", "-cpu", "host", "-nodefaults",
           "-display", "none", "-no-reboot", "-m", "64", "-serial", "stdio", "-kernel", elf,
           "-smp", str(smp)]  # fmt: skip
    if debug_threads:
        cmd += ["-name", "bare,debug-threads=on"]
    return cmd


class Bare:
    """One inner QEMU running the bare guest."""

    def __init__(self, vm: InnerQemu, smp: int) -> None:
        self.vm = vm
        self.smp = smp

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
        with open(elf, "wb") as fh:
            fh.write(build(opts).elf())
        proc = subprocess.Popen(
            _command(nested.qemu, elf, smp, debug_threads),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        vm = InnerQemu(proc)
        started.append(vm)
        return Bare(vm, smp)

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


# --- through serrinj: the remote engine injects into the inner QEMU, the guest reports


def _serrinj(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "serrinj", *args, "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _esr(line: str) -> int:
    m = re.search(r" esr=0x([0-9a-f]{16}) ", line)
    assert m, line
    return int(m.group(1), 16)


@pytest.mark.parametrize("mode", ["wfi", "spin"])
def test_serrinj_injects_serror_into_the_bare_guest(
    bare: StartBare, mode: str, lab: env.LabConfig
) -> None:
    b = bare(FirmwareOptions(mode=mode), 2)
    b.wait_ready()
    for vcpu in (1, 0):
        args = ["inject", "--pid", str(b.pid), "--vcpu", str(vcpu), "--wait", "20"]
        if lab.expect_ras:
            args += ["--esr", hex(ISS_CE)]
        t0 = time.monotonic()
        proc = _serrinj(*args)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        line = b.vm.wait_for(rf"^serror cpu={vcpu} ", 20)
        print(
            f"bare {mode}: serrinj inject vcpu={vcpu} -> {line!r} in {time.monotonic() - t0:.2f} s"
        )
        if lab.expect_ras:
            assert _esr(line) == 0xBE000000 | ISS_CE
        else:
            assert _esr(line) >> 26 == 0x2F
    b.type("p")
    b.vm.wait_for(r"^pong cpu=0 n=1$", 20)  # QEMU and its guest carry on
    assert b.problems() == []


def test_serrinj_masked_serror_waits_for_unmask(bare: StartBare, lab: env.LabConfig) -> None:
    if not lab.expect_ras:
        pytest.skip("needs a host with RAS (an ESR is refused otherwise)")
    b = bare(FirmwareOptions(mode="wfi", mask_serror=True), 2)
    b.wait_ready()
    proc = _serrinj("inject", "--pid", str(b.pid), "--vcpu", "1", "--esr", hex(ISS_KSELFTEST))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    b.type("p")
    b.vm.wait_for(r"^pong ", 20)
    assert not [line for line in b.vm.lines if line.startswith("serror")]
    b.type("u")
    line = b.vm.wait_for(r"^serror cpu=1 ", 20)
    assert _esr(line) == 0xBE000000 | ISS_KSELFTEST
    assert b.problems() == []


def test_serrinj_ext_dabt_hits_the_probe(bare: StartBare) -> None:
    b = bare(FirmwareOptions(mode="spin", mmio_probe=True), 2)
    b.wait_ready()
    proc = _serrinj(
        "inject", "--pid", str(b.pid), "--vcpu", "1", "--ext-dabt", "--mmio-addr", hex(PROBE_ADDR)
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = b.vm.wait_for(r"^sync cpu=1 ", 20)
    print(f"bare ext_dabt: {line!r}")
    low = _esr(line) & 0xFFFFFFFF
    assert low >> 26 == 0x25 and low & 0x3F == 0x10
    assert line.endswith(f"far=0x{PROBE_ADDR:016x}")
    b.type("p")
    b.vm.wait_for(r"^pong cpu=0 n=1$", 20)  # the probe load was skipped and the guest runs on
    assert b.problems() == []
