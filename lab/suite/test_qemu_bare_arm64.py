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
import tempfile
import time
from typing import Callable, Iterator, List, Optional, Set

import pytest

from lab.guest import env
from lab.guest.cli import serrinj
from lab.guest.nested import InnerQemu, NestedAssets
from lab.guest.qmp import Qmp
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
#: (smp, debug-threads, mode, the ISS): every pair of vCPU count, thread naming and
#: idle/busy guest occurs once, and so does every syndrome (CE, UER, IDS, the CPU's own)
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
    b.vm.wait_for(rf"^pong cpu=0 n={pongs}$", 20)
    assert b.proc_alive()
    assert b.problems() == []


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
    b = bare(FirmwareOptions(mode=mode), smp, debug_threads)
    b.wait_ready()
    with b.qmp() as q:
        threads = q.cpu_threads()  # QEMU's own cpu-index -> thread id
    assert sorted(threads) == list(range(smp))
    if not lab.expect_ras:
        iss = CPU  # an ESR needs RAS (refused with exit 5: test_cli_arm64)
    vcpu = smp - 1
    args = ["inject", *b.target(), "--vcpu", str(vcpu), "--wait", "20"]
    if iss is not None:
        args += ["--esr", hex(iss)]
    r = serrinj(*args)
    assert r.rc == 0, r
    inj = r.data["injections"][0]
    assert inj["tid"] == threads[vcpu], "serrinj stopped another thread than QEMU's vCPU"
    assert inj["registers_restored"] is True and inj["delivery"]["delivered"] is True
    line = b.vm.wait_for(rf"^serror cpu={vcpu} ", 20)
    print(f"bare {mode} smp={smp} {b.target()[0]}: {iss} -> {line!r}")
    if iss is not None:
        assert _esr(line) == ESR_SERROR | iss
    elif lab.expect_ras:
        assert _esr(line) == ESR_SERROR | IDS  # KVM's own syndrome on a RAS host
    else:
        assert _esr(line) >> 26 == 0x2F  # chosen by a CPU without RAS
    assert not [x for x in b.vm.lines if x.startswith("serror") and x != line]  # only one
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
