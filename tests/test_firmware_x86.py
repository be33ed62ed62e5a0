"""The x86 firmware guest in a real QEMU (``-accel kvm -bios stub.bin``).

Before serrinj's own engine is involved, QEMU's HMP commands (over QMP)
inject the NMI and the machine checks, and the firmware's handlers must print
exactly what was injected on the serial console (QEMU's stdout).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Iterator, List

import pytest

from serrinj.kvm import x86_64 as kx
from serrinj.testvm.firmware_x86 import AP_SIPI_VECTOR, IMAGE_SIZE, build_firmware
from tests.helpers.qemu import Qemu

pytestmark = [pytest.mark.qemu, pytest.mark.kvm]

UC_STATUS = 0xBE00000000000135  # VAL UC EN MISCV ADDRV PCC
CE_STATUS = 0x9C0000000000009A  # VAL EN MISCV ADDRV


@pytest.fixture
def stub(tmp_path: Path) -> Path:
    """The firmware, built by its command-line entry point."""
    image = tmp_path / "stub.bin"
    subprocess.run(
        [sys.executable, "-m", "serrinj.testvm.firmware_x86", "-o", str(image)], check=True
    )
    return image


@pytest.fixture
def qemu(tmp_path: Path, stub: Path) -> Iterator[Qemu]:
    vm = Qemu(tmp_path, stub, "serrinj-fw-test")
    try:
        yield vm
    finally:
        vm.stop()


def test_image_layout(stub: Path) -> None:
    image = stub.read_bytes()
    assert image == build_firmware()
    assert len(image) == IMAGE_SIZE
    # F000:FFF0 holds a far jump into F000; the APs start at offset 0 (vector 0xF0)
    assert image[0xFFF0] == 0xEA
    assert int.from_bytes(image[0xFFF3:0xFFF5], "little") == 0xF000
    assert AP_SIPI_VECTOR << 12 == 0xF0000
    assert image[0] == 0xFA  # cli


def _thread_names(pid: int) -> List[str]:
    names = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except FileNotFoundError:
            continue
    return names


def test_firmware_reports_what_qemu_injects(qemu: Qemu) -> None:
    qemu.wait_line("ready cpu=0")
    qemu.wait_line("ready cpu=1")  # the AP came up through INIT-SIPI-SIPI
    assert {"CPU 0/KVM", "CPU 1/KVM"} <= set(_thread_names(qemu.proc.pid))

    qemu.send_serial(b"p")
    qemu.wait_line("pong cpu=0 n=1")
    qemu.send_serial(b"p")
    qemu.wait_line("pong cpu=0 n=2")

    # QEMU's `nmi` reaches every CPU (LINT1 programmed as NMI)
    qemu.hmp("nmi")
    qemu.wait_line("nmi cpu=0 count=1")
    qemu.wait_line("nmi cpu=1 count=1")

    # uncorrected: #MC on CPU 1, twice (the handler clears MCIP between them)
    for bank, addr, misc in ((1, 0xDEAD0000, 0x8C), (4, 0xBEEF000, 0x8D)):
        qemu.hmp(f"mce 1 {bank} {UC_STATUS:#x} 0x5 {addr:#x} {misc:#x}")
        qemu.wait_line(
            f"mce cpu=1 bank={bank} status=0x{UC_STATUS:016x} addr=0x{addr:016x} "
            f"misc=0x{misc:016x} mcg_status=0x{kx.MCG_STATUS_RIPV | kx.MCG_STATUS_MCIP:016x}"
        )

    # corrected: no exception; CPU 0 finds it by polling
    qemu.hmp(f"mce 0 2 {CE_STATUS:#x} 0x0 0x1234 0x86")
    qemu.wait_line(
        f"mce-poll cpu=0 bank=2 status=0x{CE_STATUS:016x} addr=0x{0x1234:016x} "
        f"misc=0x{0x86:016x} mcg_status=0x{0:016x}"
    )

    qemu.send_serial(b"p")
    qemu.wait_line("pong cpu=0 n=3")  # still serving after all of it
    assert qemu.proc.poll() is None
    assert not [line for line in qemu.lines if line.startswith("exception")]
    assert sum(line.startswith("ready") for line in qemu.lines) == 2  # no reset happened
