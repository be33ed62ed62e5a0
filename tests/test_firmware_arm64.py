"""The bare-metal arm64 guest: its ELF is what QEMU's ``-kernel`` loads, its code disassembles
cleanly, and (where qemu-system-aarch64 exists) it boots under TCG and answers on its UART.

TCG cannot inject an SError, so the boots here prove the boot path, PSCI, the
GIC wake-ups, the UART protocol and the synchronous handler (under TCG an
unassigned address raises a real external abort). The SError path is proven
inside the arm64 lab (``lab/suite/test_qemu_bare_arm64.py``).
"""

from __future__ import annotations

import os
import pathlib
import re
import select
import struct
import subprocess
import sys
import time
from typing import Callable, Dict, Iterator, List

import pytest

from serrinj.testvm import firmware_arm64 as fwmod
from serrinj.testvm.firmware_arm64 import FirmwareOptions, build
from tests.conftest import need_tool

ALL_OPTIONS = [
    FirmwareOptions(mode=m, mask_serror=mask, mmio_probe=probe)
    for m in fwmod.MODES
    for mask in (False, True)
    for probe in (False, True)
]


def _ids(o: FirmwareOptions) -> str:
    return f"{o.mode}{'-mask' if o.mask_serror else ''}{'-probe' if o.mmio_probe else ''}"


# --- the ELF, parsed independently of the writer


def _parse_elf(raw: bytes) -> Dict[str, object]:
    assert raw[:4] == b"\x7fELF"
    assert raw[4] == 2, "ELFCLASS64"
    assert raw[5] == 1, "little endian"
    fields = struct.unpack_from("<HHIQQQIHHHHHH", raw, 16)
    e_type, e_machine, _ver, e_entry, e_phoff, e_shoff = fields[:6]
    e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx = fields[8:]
    phdrs = [
        struct.unpack_from("<IIQQQQQQ", raw, e_phoff + i * e_phentsize) for i in range(e_phnum)
    ]
    shdrs = [
        struct.unpack_from("<IIQQQQIIQQ", raw, e_shoff + i * e_shentsize) for i in range(e_shnum)
    ]
    strtab_off = shdrs[e_shstrndx][4]

    def name(off: int) -> str:
        end = raw.index(b"\0", strtab_off + off)
        return raw[strtab_off + off : end].decode()

    return {
        "type": e_type,
        "machine": e_machine,
        "entry": e_entry,
        "phdrs": phdrs,
        "sections": {name(s[0]): s for s in shdrs[1:]},
    }


@pytest.mark.parametrize("opts", ALL_OPTIONS, ids=_ids)
def test_elf_is_one_aarch64_load_segment_at_the_load_address(opts: FirmwareOptions) -> None:
    fw = build(opts)
    raw = fw.elf()
    elf = _parse_elf(raw)
    assert elf["type"] == 2  # ET_EXEC
    assert elf["machine"] == 183  # EM_AARCH64
    assert elf["entry"] == fwmod.LOAD_ADDR
    phdrs = elf["phdrs"]
    assert isinstance(phdrs, list) and len(phdrs) == 1
    p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align = phdrs[0]
    assert p_type == 1  # PT_LOAD
    assert p_flags & 0x1  # executable
    # QEMU's ELF loader places segments by physical address
    assert p_paddr == p_vaddr == fwmod.LOAD_ADDR
    assert p_offset % p_align == p_vaddr % p_align
    assert raw[p_offset : p_offset + p_filesz] == fw.image
    assert p_memsz == p_filesz + fw.bss_size
    # inside RAM, clear of the device tree QEMU puts at the start of RAM, and small
    assert p_paddr >= fwmod.RAM_BASE + 0x100000
    assert p_paddr + p_memsz < fwmod.RAM_BASE + 0x800000
    assert p_vaddr <= elf["entry"] < p_vaddr + p_filesz  # type: ignore[operator]


def test_layout_invariants() -> None:
    fw = build()
    sym = fw.symbols
    assert sym["vectors"] % 0x800 == 0, "VBAR_EL1 needs 2 KiB alignment"
    assert sym["stacks"] % 16 == 0
    assert (
        sym["stacks"] + fwmod.STACK_SIZE * fwmod.MAX_CPUS == fw.base + len(fw.image) + fw.bss_size
    )
    # the entry is code, and every vector slot starts with the frame allocation
    words = struct.unpack(f"<{len(fw.text) // 4}I", fw.text)
    for slot in range(16):
        first = words[(sym["vectors"] - fw.base) // 4 + slot * 32]
        assert first == 0xD10000 << 8 | (fwmod.EXC_FRAME << 10) | (31 << 5) | 31  # sub sp, sp, #176


def test_banner_names_the_options() -> None:
    fw = build(
        FirmwareOptions(mode="spin", mask_serror=True, mmio_probe=True, probe_addr=0x0C001000)
    )
    assert b"boot mode=spin mask_serror=1 mmio_probe=1 probe=0xc001000\n" in fw.rodata


def test_bad_mode_is_refused() -> None:
    with pytest.raises(ValueError):
        FirmwareOptions(mode="halt")


def test_command_line_writes_the_elf(tmp_path: pathlib.Path) -> None:
    out = os.path.join(str(tmp_path), "guest.elf")
    proc = subprocess.run(
        [sys.executable, "-m", "serrinj.testvm.firmware_arm64", "-o", out, "--mode", "spin",
         "--mask-serror", "--info"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    with open(out, "rb") as f:
        assert f.read() == build(FirmwareOptions(mode="spin", mask_serror=True)).elf()
    assert f"entry {fwmod.LOAD_ADDR:#x}" in proc.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "serrinj.testvm.firmware_arm64", "-o", out, "--mode", "nope"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2


# --- binutils


@pytest.mark.cross
@pytest.mark.parametrize("opts", ALL_OPTIONS, ids=_ids)
def test_readelf_agrees(opts: FirmwareOptions, tmp_path: pathlib.Path) -> None:
    path = os.path.join(str(tmp_path), "guest.elf")
    with open(path, "wb") as f:
        f.write(build(opts).elf())
    out = subprocess.run(
        ["aarch64-linux-gnu-readelf", "-W", "-h", "-l", "-S", "-s", path],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    assert "Machine:                           AArch64" in out
    assert f"Entry point address:               {fwmod.LOAD_ADDR:#x}" in out
    loads = [line.split() for line in out.splitlines() if line.strip().startswith("LOAD")]
    assert len(loads) == 1
    assert int(loads[0][2], 16) == int(loads[0][3], 16) == fwmod.LOAD_ADDR
    assert re.search(r"\bFUNC\s+LOCAL\s+DEFAULT\s+1 vectors$", out, re.M)


@pytest.mark.cross
@pytest.mark.parametrize("opts", ALL_OPTIONS, ids=_ids)
def test_text_disassembles_cleanly(opts: FirmwareOptions, tmp_path: pathlib.Path) -> None:
    fw = build(opts)
    path = os.path.join(str(tmp_path), "guest.elf")
    with open(path, "wb") as f:
        f.write(fw.elf())
    out = subprocess.run(
        ["aarch64-linux-gnu-objdump", "-d", "-j", ".text", path],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    insns = re.findall(r"^\s*([0-9a-f]+):\s+([0-9a-f]{8})\s+(.*)$", out, re.M)
    assert len(insns) == len(fw.text) // 4, "every word of .text is listed"
    bad = [i for i in insns if re.search(r"\.inst|udf|unknown|undefined", i[2])]
    assert bad == []
    mnemonics = {i[2].split()[0] for i in insns}
    # the instructions that make the guest what it is
    assert {"eret", "hvc", "msr", "mrs", "wfi" if opts.mode == "wfi" else "b"} <= mnemonics
    text = "\n".join(i[2] for i in insns)
    assert "msr\tvbar_el1" in text
    assert ("msr\tdaifclr, #0x4" in text) or ("msr\tdaifclr, #4" in text)


# --- boots under TCG


def _qemu_aarch64() -> str:
    return need_tool("qemu-system-aarch64", "qemu-system-arm")


class _Bare:
    """qemu-system-aarch64 (TCG) running the guest, its UART on a pipe."""

    def __init__(self, elf: str, smp: int) -> None:
        self.proc = subprocess.Popen(
            [_qemu_aarch64(), "-M", "virt,gic-version=3", "-cpu", "max", "-nodefaults",
             "-display", "none", "-serial", "stdio", "-kernel", elf, "-smp", str(smp)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        self.out = b""

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def lines(self) -> List[str]:
        return self.out.decode(errors="replace").splitlines()

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 30.0) -> List[str]:
        """Read until ``count`` complete lines match ``pattern``; returns them."""
        assert self.proc.stdout is not None
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            complete = self.out.decode(errors="replace").split("\n")[:-1]
            hits = [line for line in complete if rx.search(line)]
            if len(hits) >= count:
                return hits
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise AssertionError(f"no {count}x {pattern!r} in:\n{self.out.decode()[-2000:]}")
            ready, _, _ = select.select([self.proc.stdout], [], [], min(left, 0.2))
            if ready:
                self.out += os.read(self.proc.stdout.fileno(), 65536)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


Boot = Callable[[FirmwareOptions, int], "_Bare"]


@pytest.fixture
def boot(tmp_path: pathlib.Path) -> Iterator[Boot]:
    started: List[_Bare] = []

    def _boot(opts: FirmwareOptions, smp: int) -> _Bare:
        path = os.path.join(str(tmp_path), f"guest{len(started)}.elf")
        with open(path, "wb") as f:
            f.write(build(opts).elf())
        vm = _Bare(path, smp)
        started.append(vm)
        return vm

    try:
        yield _boot
    finally:
        for vm in started:
            vm.close()


def _ready(vm: _Bare, smp: int) -> None:
    vm.wait_for(r"^boot mode=")
    got = vm.wait_for(r"^ready cpu=\d+$", smp)
    assert sorted(got) == [f"ready cpu={n}" for n in range(smp)]


@pytest.mark.qemu
@pytest.mark.parametrize("mode", fwmod.MODES)
@pytest.mark.parametrize("smp", [1, 2])
def test_boots_and_answers_ping(boot: Boot, mode: str, smp: int) -> None:
    vm = boot(FirmwareOptions(mode=mode), smp)
    _ready(vm, smp)
    vm.send(b"p")
    assert vm.wait_for(r"^pong ") == ["pong cpu=0 n=1"]
    vm.send(b"xpp")  # unknown bytes are ignored
    assert vm.wait_for(r"^pong ", 3)[1:] == ["pong cpu=0 n=2", "pong cpu=0 n=3"]
    assert not [line for line in vm.lines() if line.startswith(("exception", "halted", "timeout"))]


@pytest.mark.qemu
@pytest.mark.parametrize("mode", fwmod.MODES)
def test_mask_serror_until_u_on_every_cpu(boot: Boot, mode: str) -> None:
    smp = 3
    vm = boot(FirmwareOptions(mode=mode, mask_serror=True), smp)
    _ready(vm, smp)
    vm.send(b"p")
    vm.wait_for(r"^pong ")
    assert not [line for line in vm.lines() if line.startswith("unmasked")]
    vm.send(b"u")
    got = vm.wait_for(r"^unmasked cpu=\d+$", smp)
    assert sorted(got) == [f"unmasked cpu={n}" for n in range(smp)]
    vm.send(b"up")  # a second 'u' changes nothing
    vm.wait_for(r"^pong ", 2)
    assert len([line for line in vm.lines() if line.startswith("unmasked")]) == smp


@pytest.mark.qemu
def test_probe_abort_is_reported_and_skipped(boot: Boot) -> None:
    # Under TCG the unassigned probe address raises a real synchronous external abort on every
    # read, so the handler runs again and again; under KVM it only runs for an injected one.
    opts = FirmwareOptions(mode="spin", mmio_probe=True)
    fw = build(opts)
    vm = boot(opts, 1)
    _ready(vm, 1)
    lines = vm.wait_for(r"^sync cpu=0 ", 3)
    m = re.match(r"^sync cpu=0 esr=0x([0-9a-f]{16}) elr=0x([0-9a-f]{16}) far=0x([0-9a-f]{16})$",
                 lines[0])  # fmt: skip
    assert m, lines[0]
    esr, elr, far = (int(g, 16) for g in m.groups())
    assert esr >> 26 == 0x25  # data abort taken without a change in EL
    assert esr & 0x3F == 0x10  # synchronous external abort
    assert elr == fw.symbols["probe_insn"]
    assert far == fwmod.PROBE_ADDR
    assert not [line for line in vm.lines() if line.startswith(("halted", "exception"))]
