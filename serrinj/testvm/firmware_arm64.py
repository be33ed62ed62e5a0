"""A bare-metal arm64 guest for a real QEMU (``-M virt``), the arm64 counterpart of the x86 stub.

Build it and boot it with::

    python -m serrinj.testvm.firmware_arm64 -o guest.elf [--mode wfi|spin] [--mask-serror]
                                                          [--mmio-probe]
    qemu-system-aarch64 -M virt,gic-version=3 -accel kvm -cpu host -nodefaults \\
        -serial file:LOG -kernel guest.elf [-smp N]

The output is an ELF64 with one PT_LOAD segment at :data:`LOAD_ADDR`. QEMU's
``-kernel`` loads an ELF as a non-Linux image (``hw/arm/boot.c``): every CPU's
PC is set to ``e_entry``, no boot stub is written, and with PSCI enabled the
secondary CPUs start powered off. Under KVM the ``virt`` board's PSCI conduit
is HVC (``virt.c``: SMC only when the guest itself has EL2), so CPU 0 starts the
others with PSCI ``CPU_ON`` through ``hvc #0``, one at a time, until the call
fails for a CPU that does not exist. The image loads 2 MiB into RAM so that the
device tree QEMU places at the start of RAM has room below it.

What it prints on the PL011 UART (0x09000000), one line per event::

    boot mode=<wfi|spin> mask_serror=<0|1> mmio_probe=<0|1> probe=0x<addr>
    ready cpu=<n>                       every CPU, once its vectors are live
    serror cpu=<n> esr=0x<16 hex> elr=0x<16 hex> far=0x<16 hex>
    sync cpu=<n> esr=0x<16 hex> elr=0x<16 hex> far=0x<16 hex>
    unmasked cpu=<n>                    --mask-serror: just before PSTATE.A is cleared
    pong cpu=0 n=<k>                    answer to the k-th byte 'p' received
    exception cpu=<n> vector=<i> esr=0x.. elr=0x.. far=0x..   (unexpected vector)
    halted cpu=<n>                      after an exception the guest cannot resume from

Modes, chosen at build time:

- ``wfi``: the idle loop is ``wfi``. The GIC is set up so that a received UART
  byte (SPI 33, routed to CPU 0) and SGI 0 (sent by CPU 0 to the others) wake
  a waiting CPU, although PSTATE.I stays set: nothing is ever taken as an IRQ.
- ``spin``: the idle loop never waits; it polls the UART (CPU 0) and the
  shared flags about every 1/64 s of the virtual counter, so the vCPU stays in
  guest mode between polls.
- ``--mask-serror``: PSTATE.A stays set until CPU 0 reads a byte ``u``. Each
  CPU then prints ``unmasked`` and clears PSTATE.A, taking any pending SError.
- ``--mmio-probe``: the idle loop of every CPU keeps loading from an
  unassigned address (:data:`PROBE_ADDR`), so the vCPU exits to QEMU with
  KVM_EXIT_MMIO over and over. An external data abort injected right after
  such an exit is reported as ``sync`` and the load is skipped (the ELR is
  moved past it when it still points at it).

The guest runs with the MMU off, so all its memory is Device memory: every
access is naturally aligned, and the print lock is Lamport's bakery (plain
loads and stores) rather than exclusives. Printing masks DAIF, so a handler
never spins on a lock its own CPU holds.
"""

from __future__ import annotations

import argparse
import struct
import sys
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from serrinj.testvm.asm_arm64 import (
    FRAME_SIZE,
    Asm,
    exception_vectors,
    restore_frame_and_eret,
    save_frame,
)

# --- the QEMU virt board (hw/arm/virt.c memory map)
RAM_BASE = 0x40000000
LOAD_ADDR = RAM_BASE + 0x200000
UART_BASE = 0x09000000
GICD_BASE = 0x08000000
GICR_BASE = 0x080A0000
GICR_STRIDE = 0x20000
UART_INTID = 33  # SPI 1
#: an address no device decodes: the platform bus window, empty without dynamic sysbus devices
PROBE_ADDR = 0x0C000000

MAX_CPUS = 8
STACK_SIZE = 0x1000
PSCI_CPU_ON_64 = 0xC4000003

# PL011 registers
_UART_DR = 0x00
_UART_FR = 0x18
_UART_CR = 0x30
_UART_IMSC = 0x38
_FR_RXFE = 4
_FR_TXFF = 5

# GICv3 registers
_GICD_CTLR = 0x0000
_GICD_IGROUPR = 0x0080
_GICD_ISENABLER = 0x0100
_GICD_IPRIORITYR = 0x0400
_GICD_IROUTER = 0x6000
_GICR_WAKER = 0x0014
_GICR_SGI = 0x10000
_GICR_IGROUPR0 = _GICR_SGI + 0x0080
_GICR_ISENABLER0 = _GICR_SGI + 0x0100
_GICR_IPRIORITYR0 = _GICR_SGI + 0x0400

#: the vectors the guest handles: "current EL with SP_ELx" synchronous (0x200) and SError (0x380)
VECTOR_SYNC = 4
VECTOR_SERROR = 7
#: size of the register frame an exception entry saves (x0-x18, x29, x30)
EXC_FRAME = FRAME_SIZE

MODES = ("wfi", "spin")


@dataclass(frozen=True)
class FirmwareOptions:
    """Build-time choices (see the module docstring)."""

    mode: str = "wfi"
    mask_serror: bool = False
    mmio_probe: bool = False
    probe_addr: int = PROBE_ADDR

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")

    def banner(self) -> str:
        """The first line CPU 0 prints."""
        return (
            f"boot mode={self.mode} mask_serror={int(self.mask_serror)}"
            f" mmio_probe={int(self.mmio_probe)} probe={self.probe_addr:#x}"
        )


@dataclass(frozen=True)
class Firmware:
    """An assembled guest: the loadable bytes plus the layout the ELF describes."""

    options: FirmwareOptions
    base: int
    entry: int
    text: bytes
    rodata: bytes
    bss_size: int
    symbols: Mapping[str, int] = field(default_factory=dict)

    @property
    def image(self) -> bytes:
        """The bytes loaded at :attr:`base` (text, then rodata)."""
        return self.text + self.rodata

    @property
    def instruction_count(self) -> int:
        """Instructions in .text, not counting the nops that pad the vector slots."""
        words = struct.unpack(f"<{len(self.text) // 4}I", self.text)
        return sum(1 for w in words if w != 0xD503201F)

    def elf(self) -> bytes:
        """An ELF64 executable for ``qemu-system-aarch64 -kernel``."""
        return _elf(self)


def build(options: Optional[FirmwareOptions] = None) -> Firmware:
    """Assemble the guest for ``options``."""
    opts = options or FirmwareOptions()
    a = Asm(base=LOAD_ADDR)
    _Guest(a, opts).emit()
    text_size = a.size
    _emit_rodata(a, opts)
    a.align(16, fill_nop=False)
    rodata_end = a.pc
    bss = _layout_bss(a, rodata_end)
    raw = a.assemble()
    return Firmware(
        options=opts,
        base=LOAD_ADDR,
        entry=LOAD_ADDR,
        text=raw[:text_size],
        rodata=raw[text_size:],
        bss_size=bss,
        symbols=MappingProxyType({k: v for k, v in a.labels.items() if not k.startswith(".")}),
    )


# --- data


_STRINGS: Tuple[Tuple[str, str], ...] = (
    ("str_ready", "ready cpu=%c\n"),
    ("str_serror", "serror cpu=%c esr=0x%x elr=0x%x far=0x%x\n"),
    ("str_sync", "sync cpu=%c esr=0x%x elr=0x%x far=0x%x\n"),
    ("str_unmasked", "unmasked cpu=%c\n"),
    ("str_pong", "pong cpu=%c n=%d\n"),
    ("str_exception", "exception cpu=%c vector=%d esr=0x%x elr=0x%x far=0x%x\n"),
    ("str_halted", "halted cpu=%c\n"),
    ("str_timeout", "timeout cpu=%d\n"),
)


def _emit_rodata(a: Asm, opts: FirmwareOptions) -> None:
    a.label("str_banner")
    a.asciz(opts.banner() + "\n")
    for name, text in _STRINGS:
        a.label(name)
        a.asciz(text)


#: zero-initialised variables (8 bytes each), then the per-CPU arrays
_BSS_WORDS = ("unmask_flag", "pong_count", "last_ready", "cpu_count")
_BSS_ARRAYS = ("choosing", "number")


def _layout_bss(a: Asm, start: int) -> int:
    addr = start
    for name in _BSS_WORDS:
        a.define(name, addr)
        addr += 8
    for name in _BSS_ARRAYS:
        a.define(name, addr)
        addr += 8 * MAX_CPUS
    addr = (addr + 15) & ~15
    a.define("stacks", addr)
    addr += STACK_SIZE * MAX_CPUS
    return addr - start


# --- code


class _Guest:
    """Emits the guest's code. Register roles in the per-CPU main loop:

    x19 cpu index, x20 UART base, x21 probe address, x22 1 once PSTATE.A is
    clear, x23 counter value at the last poll, x24 poll interval in ticks.
    """

    def __init__(self, a: Asm, opts: FirmwareOptions) -> None:
        self.a = a
        self.o = opts

    # --- idioms

    def _print(self, fmt: str) -> None:
        """printf(the string at label ``fmt``, x1..x5)."""
        self.a.adr("x0", fmt)
        self.a.bl("printf")

    def _load(self, reg: str, var: str) -> None:
        """``reg`` = the u64 at label ``var``."""
        self.a.adr(reg, var)
        self.a.ldr(reg, reg)

    def _enter(self, frame: int) -> None:
        """Push a ``frame``-byte stack frame holding x29 and x30 at its base."""
        self.a.stp("x29", "x30", "sp", -frame, "pre")

    def _leave(self, frame: int) -> None:
        """Pop what :meth:`_enter` pushed."""
        self.a.ldp("x29", "x30", "sp", frame, "post")

    def _before(self, dst: str, since: str, ticks: str, again: str) -> None:
        """Branch to ``again`` while fewer than ``ticks`` counter ticks have passed since ``since``
        (x0 = the counter, ``dst`` = the ticks passed)."""
        a = self.a
        a.mrs("x0", "cntvct_el0")
        a.sub(dst, "x0", since)
        a.cmp(dst, ticks)
        a.b_cond("lo", again)

    def emit(self) -> None:
        a = self.a
        a.label("_start")
        a.mov("x0", 0)
        a.b("cpu_init")
        self.vectors()
        self.cpu_init()
        self.primary()
        self.secondary()
        self.main_loop()
        self.uart_poll()
        self.check_unmask()
        self.gic_init_cpu()
        self.gic_ack_all()
        self.handlers()
        self.printf()
        self.put_hex()
        self.put_dec()
        self.putc()
        self.lock()

    # --- exception entry

    def vectors(self) -> None:
        a = self.a
        exception_vectors(a, "exc_common", FRAME_SIZE)
        a.label("exc_common")
        save_frame(a)
        a.cmp("x0", VECTOR_SYNC)
        a.b_cond("eq", "exc_sync")
        a.cmp("x0", VECTOR_SERROR)
        a.b_cond("eq", "exc_serror")
        a.bl("unexpected")  # does not return
        a.label("exc_sync")
        a.bl("sync_handler")
        a.b("exc_return")
        a.label("exc_serror")
        a.bl("serror_handler")
        a.label("exc_return")
        restore_frame_and_eret(a)

    def handlers(self) -> None:
        a = self.a
        self._syndrome_line("serror_handler", "str_serror")
        self._leave(16)
        a.ret()

        self._syndrome_line("sync_handler", "str_sync")
        if self.o.mmio_probe:
            # an external abort on our own probe load: resume after it
            a.mrs("x1", "esr_el1")
            a.ubfx("x1", "x1", 26, 6)
            a.cmp("x1", 0x25)
            a.b_cond("ne", "halt")
            a.mrs("x2", "elr_el1")
            a.adr("x3", "probe_insn")
            a.cmp("x2", "x3")
            a.b_cond("eq", "sync_skip")
            a.add("x3", "x3", 4)
            a.cmp("x2", "x3")
            a.b_cond("ne", "halt")
            a.b("sync_done")  # the load was already retired
            a.label("sync_skip")
            a.add("x2", "x2", 4)
            a.msr("elr_el1", "x2")
            a.label("sync_done")
            self._leave(16)
            a.ret()
        a.b("halt")

        a.label("unexpected")
        a.mov("x1", "x0")
        a.mrs("x2", "esr_el1")
        a.mrs("x3", "elr_el1")
        a.mrs("x4", "far_el1")
        self._print("str_exception")
        a.label("halt")
        self._print("str_halted")
        a.msr("daifset", 0xF)
        a.label("halt_loop")
        a.wfi()
        a.b("halt_loop")

    # --- boot

    def _unmask_serror(self) -> None:
        """Clear PSTATE.A and note it in x22."""
        a = self.a
        a.mov("x22", 1)
        a.msr("daifclr", 4)
        a.isb()

    def _syndrome_line(self, label: str, fmt: str) -> None:
        """At ``label``: push a frame, print ``fmt`` with ESR, ELR and FAR."""
        a = self.a
        a.label(label)
        self._enter(16)
        for reg, sysreg in (("x1", "esr_el1"), ("x2", "elr_el1"), ("x3", "far_el1")):
            a.mrs(reg, sysreg)
        self._print(fmt)

    def cpu_init(self) -> None:
        """x0 = cpu index: per-CPU id, stack, vectors."""
        a = self.a
        a.label("cpu_init")
        a.msr("daifset", 0xF)
        a.msr("tpidr_el1", "x0")
        a.mov("x19", "x0")
        a.adr("x1", "stacks")
        a.add("x2", "x0", 1)
        a.add("x1", "x1", "x2", 12)  # STACK_SIZE = 1 << 12
        a.mov("sp", "x1")
        a.adr("x1", "vectors")
        a.msr("vbar_el1", "x1")
        a.isb()
        a.mov_imm("x20", UART_BASE)
        a.mov_imm("x21", self.o.probe_addr)
        a.mov("x22", 0)
        a.mrs("x24", "cntfrq_el0")
        a.lsr("x24", "x24", 6)
        a.mrs("x23", "cntvct_el0")
        a.cbnz("x19", "secondary")

    def primary(self) -> None:
        a = self.a
        a.label("primary")
        # the loader zero-fills the bss, but a reset re-entry must start clean too
        a.adr("x0", "unmask_flag")
        a.adr("x1", "stacks")
        a.label("clear_bss")
        a.str_("xzr", "x0", 8, "post")
        a.cmp("x0", "x1")
        a.b_cond("lo", "clear_bss")
        a.dsb("sy")
        # PL011: receive interrupt on, UART enabled
        a.mov("w0", (1 << 4) | (1 << 6))
        a.str_("w0", "x20", _UART_IMSC)
        a.mov("w0", 0x301)
        a.str_("w0", "x20", _UART_CR)
        # distributor: group 1 on, the UART's SPI enabled, routed to CPU 0
        a.mov_imm("x1", GICD_BASE)
        a.mov("w0", 0x12)  # ARE | EnableGrp1
        a.str_("w0", "x1", _GICD_CTLR)
        a.label("gicd_rwp")
        a.ldr("w0", "x1", _GICD_CTLR)
        a.tbnz("w0", 31, "gicd_rwp")
        a.mov("w0", -1)
        a.str_("w0", "x1", _GICD_IGROUPR + 4 * (UART_INTID // 32))
        a.mov("w0", 0x80)
        a.strb("w0", "x1", _GICD_IPRIORITYR + UART_INTID)
        a.mov_imm("x2", GICD_BASE + _GICD_IROUTER + 8 * UART_INTID)
        a.str_("xzr", "x2")
        a.mov("w0", 1 << (UART_INTID % 32))
        a.str_("w0", "x1", _GICD_ISENABLER + 4 * (UART_INTID // 32))
        a.bl("gic_init_cpu")
        self._print("str_banner")
        self._ready()
        # start the secondaries one by one, so that their ready lines come in order
        a.mov("x25", 1)
        a.label("start_next")
        a.cmp("x25", MAX_CPUS)
        a.b_cond("hs", "started")
        a.mov_imm("x0", PSCI_CPU_ON_64)
        a.mov("x1", "x25")  # MPIDR: virt gives CPU n (< 16) affinity 0.0.0.n
        a.adr("x2", "secondary_entry")
        a.mov("x3", "x25")
        a.hvc(0)
        a.cbnz("x0", "started")
        a.mrs("x26", "cntvct_el0")
        a.mrs("x27", "cntfrq_el0")
        # eight seconds: under emulation (the arm64 lab, two boots on two CPUs) a
        # secondary took more than one second to report ready
        a.lsl("x27", "x27", 3)
        a.label("wait_ready")
        self._load("x0", "last_ready")
        a.cmp("x0", "x25")
        a.b_cond("eq", "secondary_up")
        self._before("x0", "x26", "x27", "wait_ready")
        a.mov("x1", "x25")
        self._print("str_timeout")
        a.label("secondary_up")
        a.add("x25", "x25", 1)
        a.b("start_next")
        a.label("started")
        a.adr("x0", "cpu_count")
        a.str_("x25", "x0")
        a.b("main_loop")

    def secondary(self) -> None:
        a = self.a
        a.label("secondary_entry")  # PSCI CPU_ON: x0 = context id = cpu index
        a.b("cpu_init")
        a.label("secondary")
        a.bl("gic_init_cpu")
        self._ready()
        a.adr("x0", "last_ready")
        a.str_("x19", "x0")
        a.b("main_loop")

    def _ready(self) -> None:
        if not self.o.mask_serror:
            self._unmask_serror()
        self._print("str_ready")

    def main_loop(self) -> None:
        a = self.a
        o = self.o
        a.label("main_loop")
        if o.mmio_probe:
            a.label("probe_insn")
            a.ldr("w0", "x21")
        elif o.mode == "wfi":
            a.wfi()
        if o.mmio_probe or o.mode == "spin":
            # poll about 64 times a second; stay in the guest in between
            self._before("x1", "x23", "x24", "main_loop")
            a.mov("x23", "x0")
        a.cbnz("x19", "main_not_cpu0")
        a.bl("uart_poll")
        a.label("main_not_cpu0")
        if o.mask_serror:
            a.bl("check_unmask")
        if o.mode == "wfi" and not o.mmio_probe:
            a.bl("gic_ack_all")
        a.b("main_loop")

    def uart_poll(self) -> None:
        """CPU 0: handle every byte waiting in the UART."""
        a = self.a
        a.label("uart_poll")
        self._enter(16)
        a.label("uart_poll_next")
        a.ldr("w0", "x20", _UART_FR)
        a.tbnz("w0", _FR_RXFE, "uart_poll_done")
        a.ldr("w0", "x20", _UART_DR)
        a.and_("w0", "w0", 0xFF)
        a.cmp("w0", ord("p"))
        a.b_cond("ne", "uart_not_p")
        a.adr("x1", "pong_count")
        a.ldr("x2", "x1")
        a.add("x2", "x2", 1)
        a.str_("x2", "x1")
        a.mov("x1", "x2")
        self._print("str_pong")
        a.b("uart_poll_next")
        a.label("uart_not_p")
        a.cmp("w0", ord("u"))
        a.b_cond("ne", "uart_poll_next")
        a.adr("x1", "unmask_flag")
        a.mov("x2", 1)
        a.str_("x2", "x1")
        a.dsb("sy")
        # SGI 0 to every other CPU (IRM): wakes them from wfi
        a.mov_imm("x0", 1 << 40)
        a.msr("icc_sgi1r_el1", "x0")
        a.isb()
        a.b("uart_poll_next")
        a.label("uart_poll_done")
        self._leave(16)
        a.ret()

    def check_unmask(self) -> None:
        a = self.a
        a.label("check_unmask")
        a.cbnz("x22", "check_unmask_ret")
        self._load("x0", "unmask_flag")
        a.cbz("x0", "check_unmask_ret")
        self._enter(16)
        self._print("str_unmasked")
        self._leave(16)
        self._unmask_serror()
        a.label("check_unmask_ret")
        a.ret()

    # --- GIC

    def gic_init_cpu(self) -> None:
        """This CPU's redistributor (index = cpu index on virt) and CPU interface."""
        a = self.a
        a.label("gic_init_cpu")
        a.mov_imm("x1", GICR_BASE)
        a.mov_imm("x2", GICR_STRIDE)
        a.madd("x1", "x19", "x2", "x1")
        a.ldr("w0", "x1", _GICR_WAKER)
        a.and_("w0", "w0", ~2 & 0xFFFFFFFF)  # ProcessorSleep off
        a.str_("w0", "x1", _GICR_WAKER)
        a.label("gicr_wake")
        a.ldr("w0", "x1", _GICR_WAKER)
        a.tbnz("w0", 2, "gicr_wake")  # ChildrenAsleep
        a.add("x1", "x1", _GICR_SGI >> 12, 12)
        a.mov("w0", -1)
        a.str_("w0", "x1", _GICR_IGROUPR0 - _GICR_SGI)
        a.mov("w0", 0x80)
        a.strb("w0", "x1", _GICR_IPRIORITYR0 - _GICR_SGI)
        a.mov("w0", 1)  # SGI 0
        a.str_("w0", "x1", _GICR_ISENABLER0 - _GICR_SGI)
        a.mrs("x0", "icc_sre_el1")
        a.orr("x0", "x0", 1)
        a.msr("icc_sre_el1", "x0")
        a.isb()
        a.mov("x0", 0xFF)
        a.msr("icc_pmr_el1", "x0")
        a.mov("x0", 1)
        a.msr("icc_igrpen1_el1", "x0")
        a.isb()
        a.ret()

    def gic_ack_all(self) -> None:
        """Acknowledge and end what is pending, so that the next wfi waits again.

        The UART's interrupt is a level: it is pending again after the EOI
        until CPU 0 has read the byte. The main loop polls the UART before
        calling this, and the number of acknowledges is bounded, so a byte
        that arrives in between makes the next wfi return at once instead of
        looping here.
        """
        a = self.a
        a.label("gic_ack_all")
        a.mov("x1", 8)
        a.label("gic_ack_next")
        a.mrs("x0", "icc_iar1_el1")
        a.and_("x0", "x0", 0xFFFFFF)
        a.cmp("x0", 1020)
        a.b_cond("hs", "gic_ack_done")
        a.msr("icc_eoir1_el1", "x0")
        a.subs("x1", "x1", 1)
        a.b_cond("ne", "gic_ack_next")
        a.label("gic_ack_done")
        a.ret()

    # --- output

    def printf(self) -> None:
        """printf(x0 = fmt, x1..x5): %x 16 hex digits, %d decimal, %c this CPU's index."""
        a = self.a
        a.label("printf")
        self._enter(96)
        a.mov("x29", "sp")
        a.stp("x19", "x20", "sp", 16)
        a.stp("x21", "x22", "sp", 32)
        a.stp("x1", "x2", "sp", 48)
        a.stp("x3", "x4", "sp", 64)
        a.str_("x5", "sp", 80)
        a.mov("x19", "x0")
        a.add("x20", "sp", 48)
        a.mrs("x21", "daif")
        a.msr("daifset", 0xF)
        a.bl("lock")
        a.label("printf_next")
        a.ldrb("w0", "x19", 1, "post")
        a.cbz("w0", "printf_end")
        a.cmp("w0", ord("%"))
        a.b_cond("ne", "printf_char")
        a.ldrb("w0", "x19", 1, "post")
        # each conversion: its letter, its printer, where to look on when the letter differs (the
        # last one falls through to printing the character itself)
        for letter, printer, other in (
            ("x", "put_hex", "printf_not_x"),
            ("d", "put_dec", "printf_not_d"),
            ("c", "put_dec", "printf_char"),
        ):
            a.cmp("w0", ord(letter))
            a.b_cond("ne", other)
            if letter == "c":
                a.mrs("x0", "tpidr_el1")
            else:
                a.ldr("x0", "x20", 8, "post")
            a.bl(printer)
            a.b("printf_next")
            a.label(other)
        a.bl("putc")
        a.b("printf_next")
        a.label("printf_end")
        a.bl("unlock")
        a.msr("daif", "x21")
        a.ldp("x19", "x20", "sp", 16)
        a.ldp("x21", "x22", "sp", 32)
        self._leave(96)
        a.ret()

    def put_hex(self) -> None:
        """16 hex digits of x0 (clobbers x0, x9-x15)."""
        a = self.a
        a.label("put_hex")
        a.mov("x11", "x0")
        a.mov("x12", 60)
        a.mov("x13", "x30")
        a.label("put_hex_next")
        a.lsr("x0", "x11", "x12")
        a.and_("x0", "x0", 0xF)
        a.add("x14", "x0", ord("0"))
        a.add("x15", "x0", ord("a") - 10)
        a.cmp("x0", 10)
        a.csel("x0", "x14", "x15", "lo")
        a.bl("putc")
        a.subs("x12", "x12", 4)
        a.b_cond("ge", "put_hex_next")
        a.ret("x13")

    def put_dec(self) -> None:
        """x0 in decimal (clobbers x0, x9-x15)."""
        a = self.a
        a.label("put_dec")
        self._enter(48)
        a.add("x11", "sp", 48)
        a.mov("x12", 10)
        a.label("put_dec_div")
        a.udiv("x13", "x0", "x12")
        a.msub("x14", "x13", "x12", "x0")
        a.add("x14", "x14", ord("0"))
        a.strb("w14", "x11", -1, "pre")
        a.mov("x0", "x13")
        a.cbnz("x0", "put_dec_div")
        a.label("put_dec_out")
        a.ldrb("w0", "x11", 1, "post")
        a.bl("putc")
        a.add("x15", "sp", 48)
        a.cmp("x11", "x15")
        a.b_cond("lo", "put_dec_out")
        self._leave(48)
        a.ret()

    def putc(self) -> None:
        """w0 to the UART (clobbers x9, x10)."""
        a = self.a
        a.label("putc")
        a.mov_imm("x9", UART_BASE)
        a.label("putc_wait")
        a.ldr("w10", "x9", _UART_FR)
        a.tbnz("w10", _FR_TXFF, "putc_wait")
        a.str_("w0", "x9", _UART_DR)
        a.ret()

    def lock(self) -> None:
        """Lamport's bakery over ``choosing[]``/``number[]`` (clobbers x9-x17)."""
        a = self.a
        a.label("lock")
        a.mrs("x9", "tpidr_el1")
        a.adr("x10", "choosing")
        a.adr("x11", "number")
        a.add("x13", "x10", "x9", 3)
        a.mov("x12", 1)
        a.str_("x12", "x13")
        a.dmb("sy")
        a.mov("x14", 0)
        a.mov("x15", 0)
        a.label("lock_max")
        a.add("x16", "x11", "x15", 3)
        a.ldr("x16", "x16")
        a.cmp("x16", "x14")
        a.csel("x14", "x16", "x14", "hi")
        a.add("x15", "x15", 1)
        a.cmp("x15", MAX_CPUS)
        a.b_cond("lo", "lock_max")
        a.add("x14", "x14", 1)
        a.add("x16", "x11", "x9", 3)
        a.str_("x14", "x16")
        a.dmb("sy")
        a.str_("xzr", "x13")
        a.dmb("sy")
        a.mov("x15", 0)
        a.label("lock_each")
        a.cmp("x15", "x9")
        a.b_cond("eq", "lock_skip")
        a.add("x16", "x10", "x15", 3)
        a.label("lock_choosing")
        a.ldr("x17", "x16")
        a.cbnz("x17", "lock_choosing")
        a.dmb("sy")
        a.add("x16", "x11", "x15", 3)
        a.label("lock_number")
        a.ldr("x17", "x16")
        a.cbz("x17", "lock_skip")
        a.cmp("x17", "x14")
        a.b_cond("lo", "lock_number")
        a.b_cond("hi", "lock_skip")
        a.cmp("x15", "x9")  # equal tickets: the lower index goes first
        a.b_cond("lo", "lock_number")
        a.label("lock_skip")
        a.add("x15", "x15", 1)
        a.cmp("x15", MAX_CPUS)
        a.b_cond("lo", "lock_each")
        a.dmb("sy")
        a.ret()

        a.label("unlock")
        a.dmb("sy")
        a.mrs("x9", "tpidr_el1")
        a.adr("x11", "number")
        a.add("x16", "x11", "x9", 3)
        a.str_("xzr", "x16")
        a.dmb("sy")
        a.ret()


# --- ELF

_EM_AARCH64 = 183
_PT_LOAD = 1
_SEGMENT_OFFSET = 0x1000


def _elf(fw: Firmware) -> bytes:
    text_addr = fw.base
    rodata_addr = fw.base + len(fw.text)
    bss_addr = fw.base + len(fw.image)
    image = fw.image

    shstr = _StrTab()
    strtab = _StrTab()
    syms = [struct.pack("<IBBHQQ", 0, 0, 0, 0, 0, 0)]
    for name, addr in sorted(fw.symbols.items(), key=lambda kv: kv[1]):
        if text_addr <= addr < rodata_addr:
            shndx, stt = 1, 2  # .text, STT_FUNC
        elif rodata_addr <= addr < bss_addr:
            shndx, stt = 2, 1  # .rodata, STT_OBJECT
        else:
            shndx, stt = 3, 1  # .bss
        syms.append(struct.pack("<IBBHQQ", strtab.add(name), stt, 0, shndx, addr, 0))
    symtab = b"".join(syms)

    off = _SEGMENT_OFFSET + len(image)
    symtab_off = _align(off, 8)
    strtab_off = symtab_off + len(symtab)
    names = [".text", ".rodata", ".bss", ".symtab", ".strtab", ".shstrtab"]
    name_idx = {n: shstr.add(n) for n in names}
    shstr_off = strtab_off + len(strtab.data)
    shoff = _align(shstr_off + len(shstr.data), 8)

    def shdr(
        name: str, typ: int, flags: int, addr: int, offset: int, size: int, link: int = 0,
        info: int = 0, align: int = 1, entsize: int = 0,
    ) -> bytes:  # fmt: skip
        idx = name_idx[name] if name else 0
        return struct.pack(
            "<IIQQQQIIQQ", idx, typ, flags, addr, offset, size, link, info, align, entsize
        )

    sections = [
        bytes(64),
        shdr(".text", 1, 0x6, text_addr, _SEGMENT_OFFSET, len(fw.text), align=4),
        shdr(".rodata", 1, 0x2, rodata_addr, _SEGMENT_OFFSET + len(fw.text), len(fw.rodata)),
        shdr(".bss", 8, 0x3, bss_addr, off, fw.bss_size, align=16),
        shdr(".symtab", 2, 0, 0, symtab_off, len(symtab), link=5, info=len(syms), align=8,
             entsize=24),
        shdr(".strtab", 3, 0, 0, strtab_off, len(strtab.data)),
        shdr(".shstrtab", 3, 0, 0, shstr_off, len(shstr.data)),
    ]  # fmt: skip

    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    ehdr = ident + struct.pack(
        "<HHIQQQIHHHHHH",
        2,  # ET_EXEC
        _EM_AARCH64,
        1,
        fw.entry,
        64,  # e_phoff
        shoff,
        0,
        64,
        56,
        1,
        64,
        len(sections),
        len(sections) - 1,
    )
    phdr = struct.pack(
        "<IIQQQQQQ",
        _PT_LOAD,
        0x7,  # RWX
        _SEGMENT_OFFSET,
        fw.base,
        fw.base,
        len(image),
        len(image) + fw.bss_size,
        0x1000,
    )
    out = bytearray(ehdr + phdr)
    out += bytes(_SEGMENT_OFFSET - len(out))
    out += image
    out += bytes(symtab_off - len(out))
    out += symtab + strtab.data + shstr.data
    out += bytes(shoff - len(out))
    out += b"".join(sections)
    return bytes(out)


class _StrTab:
    def __init__(self) -> None:
        self.data = bytearray(b"\0")
        self._index: Dict[str, int] = {}

    def add(self, name: str) -> int:
        if name not in self._index:
            self._index[name] = len(self.data)
            self.data += name.encode() + b"\0"
        return self._index[name]


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


# --- command line


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m serrinj.testvm.firmware_arm64 -o guest.elf [options]``."""
    parser = argparse.ArgumentParser(
        prog="python -m serrinj.testvm.firmware_arm64",
        description="Build a bare-metal arm64 guest (ELF) for qemu-system-aarch64 -M virt -kernel.",
    )
    parser.add_argument("-o", "--output", required=True, help="where to write the ELF")
    parser.add_argument("--mode", choices=MODES, default="wfi", help="idle loop (default: wfi)")
    parser.add_argument(
        "--mask-serror",
        action="store_true",
        help="keep PSTATE.A set until the guest reads a byte 'u' on its UART",
    )
    parser.add_argument(
        "--mmio-probe",
        action="store_true",
        help="make the idle loop keep reading an unassigned MMIO address",
    )
    parser.add_argument(
        "--probe-addr",
        type=lambda s: int(s, 0),
        default=PROBE_ADDR,
        help=f"the address --mmio-probe reads (default: {PROBE_ADDR:#x})",
    )
    parser.add_argument("--info", action="store_true", help="print the layout to stdout")
    args = parser.parse_args(argv)
    fw = build(
        FirmwareOptions(
            mode=args.mode,
            mask_serror=args.mask_serror,
            mmio_probe=args.mmio_probe,
            probe_addr=args.probe_addr,
        )
    )
    with open(args.output, "wb") as f:
        f.write(fw.elf())
    if args.info:
        lines: List[str] = [
            f"entry {fw.entry:#x}",
            f"load {fw.base:#x} size {len(fw.image):#x} bss {fw.bss_size:#x}",
            f"instructions {fw.instruction_count}",
        ]
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
