"""The arm64 half of the test VM: an EL1 guest that reports the SErrors and aborts it takes.

The VM
------
No in-kernel irqchip: the guest needs no interrupt controller, and KVM then
lets the VMM drive each vCPU's IRQ line itself (``KVM_IRQ_LINE``, type CPU).
Every vCPU is initialised with ``KVM_ARM_VCPU_INIT`` (the preferred target,
PSCI 0.2) and starts running at once: the VMM sets PC, PSTATE (EL1h, DAIF
masked) and x0 (the vCPU's page) through ``KVM_SET_ONE_REG``, so no PSCI
CPU_ON is needed. Guest RAM is 2 MiB at :data:`RAM_GPA`:

- the code at ``RAM_GPA`` (built by :mod:`serrinj.testvm.asm_arm64`);
- a one-level page table at ``RAM_GPA + PT_OFFSET`` that maps the first GiB
  as Device-nGnRnE (the report and probe pages) and the second (RAM) as
  Normal write-back memory. The guest turns its MMU and caches on with it so
  that its memory is cacheable, as the VMM's view of it is: with the MMU off
  every guest access would be non-cacheable, and a host without FEAT_S2FWB
  could then read stale lines;
- per vCPU an 8 KiB page at ``PERCPU_GPA + 0x2000 * index``: the guest's data
  (offsets in :data:`LAYOUT`) and its stack.

The guest
---------
Each vCPU installs VBAR_EL1, clears PSTATE.A unless ``--mask-serror``, reports
``guest-ready`` and runs a self-checking loop (like the x86 guest): x19 counts
up, x20 down, x21 by threes and x22 down, so that ``x19 + x20``,
``x21 - 3 * x19`` and ``x19 ^ x22`` stay constant; a change is reported as
``guest-check-failed`` and re-based. Per mode, one iteration:

- ``halt``: ``wfi`` first (the vCPU thread blocks in KVM_RUN);
- ``spin``: never waits;
- ``futex``: spins, and once per ``--tick-ms`` (measured on CNTVCT_EL0) asks the
  VMM to yield;
- ``--mmio-probe`` (any mode): the iteration starts with a 64-bit load from
  :data:`PROBE_GPA`, an address with no memory behind it, so every iteration is
  a KVM_EXIT_MMIO the VMM answers (the vCPU never waits in ``wfi``). An external
  data abort injected right after such an exit is taken on that load.

Then it looks at its mailbox (the ``unmask`` and ``heartbeat`` requests).

Handlers (VBAR_EL1, current EL with SP_EL1): the SError handler stores ESR_EL1,
ELR_EL1, FAR_EL1 and SPSR_EL1, counts, reports and returns. The synchronous
handler does the same; for a data abort (EC 0x25) on its own probe load it
moves ELR past the load (unless KVM already retired it) and returns, for
anything else it parks the vCPU. Any other vector reports ``exception`` and
parks the vCPU (DAIF masked, ``wfi`` forever).

The report channel (MMIO)
-------------------------
A report is one 64-bit store of an event code (``EV_*``) to
:data:`REPORT_GPA`, an unmapped page: KVM exits with KVM_EXIT_MMIO
(``mmio.phys_addr = REPORT_GPA``, ``is_write``, ``len`` 8, the code in
``mmio.data``). The values belonging to the event are already in the vCPU's
page (a separate area for the main loop, the SError handler, the synchronous
handler and the other vectors, so a handler never overwrites a report in
progress), and the vCPU is stopped in the exit, so the VMM reads a consistent
snapshot. A load from :data:`PROBE_GPA` is answered with the number of probes
so far.

How commands reach the guest, including one waiting in ``wfi``
---------------------------------------------------------------
A vCPU command runs on the vCPU's own thread while it is out of KVM_RUN (the
core kicks it), so the guest is stopped and the VMM may write its page. For
``unmask`` and ``heartbeat`` the VMM sets a request word in the page and then
raises the vCPU's IRQ line (HCR_EL2.VI). The guest keeps PSTATE.I set, so the
interrupt is never taken, but a pending one makes ``wfi`` return (or not wait):
a guest in ``wfi``, or one just about to execute it, always sees the request.
Once the guest has answered every request (its report exit shows them
cleared), the VMM lowers the line again.

Events (JSON lines; ESR values as the guest read them, 64 bits)
---------------------------------------------------------------
``guest-ready``  ``{"vcpu","currentel","sctlr","mpidr","daif","cntfrq","pstate_a"}``
``serror``       ``{"vcpu","esr","ec","iss","elr","far","spsr","count"}``
``sync``         ``{"vcpu","esr","ec","iss","dfsc","elr","far","spsr","count","probe",
                 "resumed"}``: ``probe`` when ELR was the probe load; ``resumed`` false
                 means the vCPU parked.
``exception``    ``{"vcpu","vector","vector_name","esr","elr","far","spsr"}``: the vCPU parks.
``unmasked``     ``{"vcpu","daif_before"}``: the guest is about to clear PSTATE.A.
``heartbeat``    ``{"vcpu","seq","iterations","serror_count","sync_count","ticks","probes",
                 "daif","check_failures","yields"}``
``guest-check-failed``  ``{"vcpu","check":"registers","x19","x20","x21","x22"}``
``ext-dabt-injected``   ``{"vcpu","addr"}``: the ``ext_dabt`` command fired after a probe exit.
``events``       ``{"vcpu","mp_state","events":{...},"pstate","pstate_a","pc"}``
``regs``         ``{"vcpu","regs":{"x0".."x30","sp","sp_el1","pc","pstate"}}``
``exit``         ``{"vcpu","reason","exit_reason",...}``: ``UNEXPECTED_MMIO`` (with
                 ``addr``, ``is_write``, ``len``), ``SYSTEM_EVENT``, ``INTERNAL_ERROR``, ...

Commands (stdin)
----------------
``{"cmd":"serror","vcpu":V,"esr":ISS|null}``  KVM_SET_VCPU_EVENTS with ``serror_pending``
                                 (and ``serror_has_esr`` unless ``esr`` is null or absent);
                                 KVM's errors (EINVAL for bit 25, or for an ESR on a host
                                 without RAS) come back as ``error`` events.
``{"cmd":"ext_dabt","vcpu":V}``  needs ``--mmio-probe``: injects ``ext_dabt_pending`` on the
                                 vCPU's next probe exit (the only moment KVM defines it for).
``{"cmd":"unmask","vcpu":V}``    the guest clears PSTATE.A (and reports ``unmasked``).
``{"cmd":"heartbeat","vcpu":V}`` the guest answers with ``heartbeat``.
``{"cmd":"events","vcpu":V}``    KVM_GET_VCPU_EVENTS, KVM_GET_MP_STATE, PSTATE and PC.
``{"cmd":"regs","vcpu":V}``      the core registers through KVM_GET_ONE_REG.
``{"cmd":"set-regs","vcpu":V,"regs":{"x19":N,...}}``  KVM_SET_ONE_REG (tests use it to prove
                                 that the self-check can fail).

The ``ready`` event adds ``ram_gpa``, ``ram_hva``, ``ram_size``, ``percpu_gpa``,
``report_gpa``, ``probe_gpa``, ``mask_serror``, ``mmio_probe`` and ``caps`` (the
VM's KVM_CAP_ARM_INJECT_SERROR_ESR and KVM_CAP_ARM_INJECT_EXT_DABT).
"""

from __future__ import annotations

import functools
import struct
import threading
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from serrinj import _native
from serrinj.kvm import api
from serrinj.kvm import arm64 as ka
from serrinj.kvm.ioctl import _IOW
from serrinj.testvm import vmm
from serrinj.testvm.asm_arm64 import (
    FRAME_SIZE,
    Asm,
    exception_vectors,
    restore_frame_and_eret,
    save_frame,
)
from serrinj.testvm.vmm import ExitAction, GuestBase, Vcpu, Vm

__all__ = ["LAYOUT", "Arm64Guest", "GuestImage", "build_guest"]

# --- guest physical memory
RAM_GPA = 0x40000000
RAM_SIZE = 0x200000
PT_OFFSET = 0xF000
PERCPU_GPA = RAM_GPA + 0x100000
PERCPU_SIZE = 0x2000
#: the unmapped page the guest stores its event codes to
REPORT_GPA = 0x10000000
#: the unmapped address ``--mmio-probe`` keeps loading from
PROBE_GPA = 0x10010000

# --- KVM_IRQ_LINE for a VM without an in-kernel irqchip (include/uapi/linux/kvm.h and
# arch/arm64/include/uapi/asm/kvm.h); tests/test_testvm_arm64.py checks them against
# the arm64 headers
SIZEOF_KVM_IRQ_LEVEL = 8
KVM_IRQ_LINE = _IOW(api.KVMIO, 0x61, SIZEOF_KVM_IRQ_LEVEL)
KVM_ARM_IRQ_TYPE_SHIFT = 24
KVM_ARM_IRQ_VCPU_SHIFT = 16
KVM_ARM_IRQ_VCPU2_SHIFT = 28
KVM_ARM_IRQ_TYPE_CPU = 0
KVM_ARM_IRQ_CPU_IRQ = 0
#: offsetof(struct kvm_regs, sp_el1): right after struct user_pt_regs
REG_SP_EL1 = ka.core_reg_id(34 * 8)

# --- the guest <-> VMM protocol
EV_READY, EV_SERROR, EV_SYNC, EV_HEARTBEAT = 1, 2, 3, 4
EV_YIELD, EV_UNMASKED, EV_CHECK_FAILED, EV_EXCEPTION = 5, 6, 7, 8
MODE_CODES: Mapping[str, int] = MappingProxyType({"halt": 1, "spin": 2, "futex": 3})
FLAG_MASK_SERROR = 1
FLAG_MMIO_PROBE = 2

#: offsets in each vCPU's page; "VMM" fields are written only while the vCPU is stopped
LAYOUT: Mapping[str, int] = MappingProxyType(
    {
        "PC_VCPU_ID": 0x00,  # VMM
        "PC_MODE": 0x08,  # VMM
        "PC_FLAGS": 0x10,  # VMM
        "PC_TICK_MS": 0x18,  # VMM
        "PC_HB_REQ": 0x20,  # VMM: heartbeat requests so far
        "PC_HB_ACK": 0x28,  # guest: the request count it answered
        "PC_UNMASK_REQ": 0x30,  # VMM sets 1, the guest clears it
        "PC_ITER": 0x38,
        "PC_SERROR_COUNT": 0x40,
        "PC_SYNC_COUNT": 0x48,
        "PC_TICKS": 0x50,
        "PC_PROBES": 0x58,  # probes answered (the guest counts completed loads)
        "PC_CHECK_FAILS": 0x60,
        "PC_MAIN": 0x80,  # main-loop report area, 8 x u64
        "PC_SERR": 0xC0,  # SError: esr, elr, far, spsr, count
        "PC_SYNC": 0x100,  # sync: esr, elr, far, spsr, count, probe, resumed
        "PC_EXC": 0x140,  # other vectors: vector, esr, elr, far, spsr
        "PC_STACK_TOP": PERCPU_SIZE,
    }
)
CHECK_K1 = 0x5A5AA5A5_0F0F0F0F
CHECK_K2 = 0x13579BDF_2468ACE0

VECTOR_NAMES: Tuple[str, ...] = tuple(
    f"{origin} {kind}"
    for origin in ("el1-sp0", "el1-spx", "el0-a64", "el0-a32")
    for kind in ("sync", "irq", "fiq", "serror")
)
VECTOR_SYNC = 4  # current EL, SP_ELx
VECTOR_SERROR = 7

EC_DABT_CUR = 0x25

# MAIR attr0 Device-nGnRnE, attr1 Normal write-back (inner and outer, read/write-allocate)
_MAIR = 0xFF << 8
# T0SZ=25 (a 39-bit space walked from level 1), inner/outer write-back walks, inner
# shareable, 4 KiB granules, no TTBR1 walks, 40-bit physical addresses
_TCR = 25 | (1 << 8) | (1 << 10) | (3 << 12) | (1 << 23) | (2 << 30) | (2 << 32)
_SCTLR_M_C_I = (1 << 0) | (1 << 2) | (1 << 12)
_PT_DEVICE_BLOCK = (1 << 54) | (1 << 53) | (1 << 10) | (0 << 2) | 0b01  # XN, AF, attr0
_PT_NORMAL_BLOCK = (1 << 10) | (3 << 8) | (1 << 2) | 0b01  # AF, inner shareable, attr1


def page_table() -> bytes:
    """The level-1 table: GiB 0 Device (report, probe), GiB 1 Normal (RAM), identity."""
    entries = [0 | _PT_DEVICE_BLOCK, RAM_GPA | _PT_NORMAL_BLOCK] + [0] * 510
    return struct.pack("<512Q", *entries)


@dataclass(frozen=True)
class GuestImage:
    """The assembled guest: its bytes (loaded at :data:`RAM_GPA`) and its labels."""

    code: bytes
    symbols: Mapping[str, int] = field(default_factory=dict)

    @property
    def entry(self) -> int:
        return self.symbols["entry"]

    @property
    def instruction_count(self) -> int:
        """Instructions, not counting the nops that pad the vector slots."""
        words = struct.unpack(f"<{len(self.code) // 4}I", self.code)
        return sum(1 for w in words if w != 0xD503201F)


@functools.lru_cache(maxsize=1)
def build_guest() -> GuestImage:
    """Assemble the guest (one image for every mode; the vCPU page selects the behaviour)."""
    a = Asm(base=RAM_GPA)
    _emit(a)
    code = a.assemble()
    if len(code) > PT_OFFSET:
        raise AssertionError("the guest code overlaps its page table")
    symbols = {k: v for k, v in a.labels.items() if not k.startswith(".")}
    return GuestImage(code, MappingProxyType(symbols))


def _emit(a: Asm) -> None:
    L = LAYOUT
    # ---- entry: x0 = this vCPU's page; EL1h, DAIF masked, MMU off
    a.label("entry")
    a.b("start")
    exception_vectors(a, "exc_common", FRAME_SIZE)
    a.label("exc_common")
    save_frame(a)
    a.mrs("x9", "tpidr_el1")
    a.cmp("x0", VECTOR_SERROR)
    a.b_cond("eq", "exc_serror")
    a.cmp("x0", VECTOR_SYNC)
    a.b_cond("eq", "exc_sync")
    # any other vector: report and park
    a.str_("x0", "x9", L["PC_EXC"])
    a.mrs("x1", "esr_el1")
    a.str_("x1", "x9", L["PC_EXC"] + 8)
    a.mrs("x1", "elr_el1")
    a.str_("x1", "x9", L["PC_EXC"] + 16)
    a.mrs("x1", "far_el1")
    a.str_("x1", "x9", L["PC_EXC"] + 24)
    a.mrs("x1", "spsr_el1")
    a.str_("x1", "x9", L["PC_EXC"] + 32)
    a.mov("x0", EV_EXCEPTION)
    a.bl("report")
    a.label("park")
    a.msr("daifset", 0xF)
    a.wfi()
    a.b("park")

    a.label("exc_serror")
    _store_syndrome(a, L["PC_SERR"], L["PC_SERROR_COUNT"])
    a.mov("x0", EV_SERROR)
    a.bl("report")
    a.b("exc_return")

    a.label("exc_sync")
    _store_syndrome(a, L["PC_SYNC"], L["PC_SYNC_COUNT"])
    a.str_("xzr", "x9", L["PC_SYNC"] + 40)  # probe
    a.str_("xzr", "x9", L["PC_SYNC"] + 48)  # resumed
    a.mrs("x1", "esr_el1")
    a.ubfx("x1", "x1", 26, 6)
    a.cmp("x1", EC_DABT_CUR)
    a.b_cond("ne", "sync_report")
    a.mrs("x2", "elr_el1")
    a.adr("x3", "probe_insn")
    a.mov("x4", 1)
    a.cmp("x2", "x3")
    a.b_cond("eq", "sync_skip")
    a.add("x3", "x3", 4)
    a.cmp("x2", "x3")
    a.b_cond("ne", "sync_report")
    # KVM already retired the load: resume where ELR points
    a.str_("x4", "x9", L["PC_SYNC"] + 40)
    a.str_("x4", "x9", L["PC_SYNC"] + 48)
    a.b("sync_report")
    a.label("sync_skip")
    a.add("x2", "x2", 4)
    a.msr("elr_el1", "x2")
    a.str_("x4", "x9", L["PC_SYNC"] + 40)
    a.str_("x4", "x9", L["PC_SYNC"] + 48)
    a.label("sync_report")
    a.mov("x0", EV_SYNC)
    a.bl("report")
    a.ldr("x1", "x9", L["PC_SYNC"] + 48)
    a.cbz("x1", "park")
    a.label("exc_return")
    restore_frame_and_eret(a)

    # report(x0 = event code): one MMIO exit; clobbers x10
    a.label("report")
    a.dsb("sy")
    a.mov_imm("x10", REPORT_GPA)
    a.str_("x0", "x10")
    a.ret()

    # ---- set-up
    a.label("start")
    a.mov("x28", "x0")
    a.msr("tpidr_el1", "x0")
    a.add("x1", "x0", PERCPU_SIZE >> 12, 12)
    a.mov("sp", "x1")
    a.adr("x1", "vectors")
    a.msr("vbar_el1", "x1")
    # identity map with caches on (see the module docstring)
    a.mov_imm("x1", _MAIR)
    a.msr("mair_el1", "x1")
    a.mov_imm("x1", _TCR)
    a.msr("tcr_el1", "x1")
    a.mov_imm("x1", RAM_GPA + PT_OFFSET)
    a.msr("ttbr0_el1", "x1")
    a.isb()
    a.tlbi_vmalle1()
    a.dsb("nsh")
    a.isb()
    a.mrs("x1", "sctlr_el1")
    a.mov_imm("x2", _SCTLR_M_C_I)
    a.orr("x1", "x1", "x2")
    a.msr("sctlr_el1", "x1")
    a.isb()
    a.ic_iallu()
    a.dsb("nsh")
    a.isb()
    a.ldr("x24", "x28", L["PC_FLAGS"])
    a.ldr("x25", "x28", L["PC_MODE"])
    a.tbnz("x24", 0, "keep_masked")  # FLAG_MASK_SERROR
    a.msr("daifclr", 4)
    a.isb()
    a.label("keep_masked")
    # x27 = counter ticks per --tick-ms, x26 = the counter at the last tick
    a.mrs("x1", "cntfrq_el0")
    a.ldr("x2", "x28", L["PC_TICK_MS"])
    a.mul("x1", "x1", "x2")
    a.mov("x2", 1000)
    a.udiv("x27", "x1", "x2")
    a.mrs("x26", "cntvct_el0")
    for i, reg in enumerate(("currentel", "sctlr_el1", "mpidr_el1", "daif", "cntfrq_el0")):
        a.mrs("x1", reg)
        a.str_("x1", "x28", L["PC_MAIN"] + 8 * i)
    a.mov("x0", EV_READY)
    a.bl("report")
    a.mov("x19", 0)
    a.mov_imm("x20", CHECK_K1)
    a.mov_imm("x21", CHECK_K2)
    a.mov_imm("x22", -1)
    a.mov_imm("x23", PROBE_GPA)

    # ---- the main loop (x19-x22 checked; x23-x28 fixed)
    a.label("main_loop")
    a.tbz("x24", 1, "no_probe")  # FLAG_MMIO_PROBE
    a.label("probe_insn")
    a.ldr("x0", "x23")
    a.ldr("x1", "x28", L["PC_PROBES"])
    a.add("x1", "x1", 1)
    a.str_("x1", "x28", L["PC_PROBES"])
    a.b("awake")
    a.label("no_probe")
    a.cmp("x25", MODE_CODES["halt"])
    a.b_cond("ne", "awake")
    a.wfi()
    a.label("awake")
    a.add("x0", "x19", "x20")
    a.mov_imm("x1", CHECK_K1)
    a.cmp("x0", "x1")
    a.b_cond("ne", "bad_registers")
    a.add("x0", "x19", "x19", 1)  # 3 * x19
    a.mov_imm("x1", CHECK_K2)
    a.add("x0", "x0", "x1")
    a.cmp("x0", "x21")
    a.b_cond("ne", "bad_registers")
    a.eor("x0", "x19", "x22")
    a.cmn("x0", 1)
    a.b_cond("ne", "bad_registers")
    a.label("advance")
    a.add("x19", "x19", 1)
    a.sub("x20", "x20", 1)
    a.add("x21", "x21", 3)
    a.sub("x22", "x22", 1)
    a.ldr("x0", "x28", L["PC_ITER"])
    a.add("x0", "x0", 1)
    a.str_("x0", "x28", L["PC_ITER"])
    # mailbox
    a.ldr("x0", "x28", L["PC_UNMASK_REQ"])
    a.cbz("x0", "no_unmask")
    a.str_("xzr", "x28", L["PC_UNMASK_REQ"])
    a.mrs("x1", "daif")
    a.str_("x1", "x28", L["PC_MAIN"])
    a.mov("x0", EV_UNMASKED)
    a.bl("report")  # first, so the VMM has the line before any SError it releases
    a.msr("daifclr", 4)
    a.isb()
    a.label("no_unmask")
    a.ldr("x0", "x28", L["PC_HB_REQ"])
    a.ldr("x1", "x28", L["PC_HB_ACK"])
    a.cmp("x0", "x1")
    a.b_cond("eq", "no_heartbeat")
    a.str_("x0", "x28", L["PC_HB_ACK"])
    fields = ("PC_HB_REQ", "PC_ITER", "PC_SERROR_COUNT", "PC_SYNC_COUNT", "PC_TICKS", "PC_PROBES")
    for i, name in enumerate(fields):
        a.ldr("x1", "x28", L[name])
        a.str_("x1", "x28", L["PC_MAIN"] + 8 * i)
    a.mrs("x1", "daif")
    a.str_("x1", "x28", L["PC_MAIN"] + 48)
    a.ldr("x1", "x28", L["PC_CHECK_FAILS"])
    a.str_("x1", "x28", L["PC_MAIN"] + 56)
    a.mov("x0", EV_HEARTBEAT)
    a.bl("report")
    a.label("no_heartbeat")
    # ticks: futex mode yields once per tick
    a.mrs("x0", "cntvct_el0")
    a.sub("x1", "x0", "x26")
    a.cmp("x1", "x27")
    a.b_cond("lo", "main_loop")
    a.mov("x26", "x0")
    a.ldr("x1", "x28", L["PC_TICKS"])
    a.add("x1", "x1", 1)
    a.str_("x1", "x28", L["PC_TICKS"])
    a.cmp("x25", MODE_CODES["futex"])
    a.b_cond("ne", "main_loop")
    a.mov("x0", EV_YIELD)
    a.bl("report")
    a.b("main_loop")

    a.label("bad_registers")
    for i, reg in enumerate(("x19", "x20", "x21", "x22")):
        a.str_(reg, "x28", L["PC_MAIN"] + 8 * i)
    a.ldr("x0", "x28", L["PC_CHECK_FAILS"])
    a.add("x0", "x0", 1)
    a.str_("x0", "x28", L["PC_CHECK_FAILS"])
    a.mov("x0", EV_CHECK_FAILED)
    a.bl("report")
    a.mov_imm("x20", CHECK_K1)
    a.sub("x20", "x20", "x19")
    a.add("x21", "x19", "x19", 1)
    a.mov_imm("x0", CHECK_K2)
    a.add("x21", "x21", "x0")
    a.mvn("x22", "x19")
    a.b("advance")


def _store_syndrome(a: Asm, area: int, counter: int) -> None:
    """ESR, ELR, FAR, SPSR into the report area at ``area`` of the page in x9; count the exception
    in the u64 at ``counter`` and store the new count at ``area + 32``."""
    for i, reg in enumerate(("esr_el1", "elr_el1", "far_el1", "spsr_el1")):
        a.mrs("x1", reg)
        a.str_("x1", "x9", area + 8 * i)
    a.ldr("x1", "x9", counter)
    a.add("x1", "x1", 1)
    a.str_("x1", "x9", counter)
    a.str_("x1", "x9", area + 32)


# --- the VMM side


def _put_u64(mem: _native.Memory, addr: int, value: int) -> None:
    struct.pack_into("<Q", mem.view, addr, value & 0xFFFFFFFFFFFFFFFF)


def _esr_fields(esr: int) -> Dict[str, int]:
    return {"ec": (esr >> 26) & 0x3F, "iss": esr & 0x1FFFFFF}


#: the core registers the ``regs`` command reads and ``set-regs`` writes
REG_IDS: Mapping[str, int] = MappingProxyType(
    {
        **{f"x{n}": ka.reg_x(n) for n in range(31)},
        "sp": ka.REG_SP,
        "sp_el1": REG_SP_EL1,
        "pc": ka.REG_PC,
        "pstate": ka.REG_PSTATE,
    }
)


@dataclass
class _VcpuState:
    """What the VMM keeps per vCPU (touched only on that vCPU's thread)."""

    index: int
    irq_raised: bool = False
    ext_dabt_armed: bool = False


class Arm64Guest(GuestBase):
    """The arm64 :class:`serrinj.testvm.vmm.GuestArch`."""

    def __init__(self) -> None:
        commands = ("serror", "ext_dabt", "unmask", "heartbeat", "events", "regs", "set-regs")
        super().__init__("arm64", commands)
        self.image = build_guest()
        self.init: Optional[ka.VcpuInit] = None
        self.caps: Dict[str, int] = {}
        self._state: Dict[int, _VcpuState] = {}
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- set-up

    def setup_vm(self, vm: Vm) -> None:
        ex = vm.executor
        if vm.options.vcpus * PERCPU_SIZE > RAM_GPA + RAM_SIZE - PERCPU_GPA:
            raise ValueError("too many vCPUs for the guest's memory layout")
        raw = ex.ioctl_buf(vm.fd, ka.KVM_ARM_PREFERRED_TARGET, bytes(ka.VcpuInit.SIZE))
        self.init = ka.VcpuInit.unpack(raw).with_feature(ka.KVM_ARM_VCPU_PSCI_0_2)
        ram = vm.add_memory(0, RAM_GPA, RAM_SIZE)
        self.ram = ram
        ram.view[0 : len(self.image.code)] = self.image.code
        table = page_table()
        ram.view[PT_OFFSET : PT_OFFSET + len(table)] = table
        for name, cap in (
            ("inject_serror_esr", api.KVM_CAP_ARM_INJECT_SERROR_ESR),
            ("inject_ext_dabt", api.KVM_CAP_ARM_INJECT_EXT_DABT),
        ):
            try:
                self.caps[name] = ex.ioctl_int(vm.fd, api.KVM_CHECK_EXTENSION, cap)
            except OSError:
                self.caps[name] = ex.ioctl_int(vm.kvm_fd, api.KVM_CHECK_EXTENSION, cap)

    def setup_vcpu(self, vm: Vm, vcpu: Vcpu) -> None:
        ex = vm.executor
        init = self.init
        ram = self.memory()
        assert init is not None
        index = vm.vcpus.index(vcpu)
        with self._lock:
            self._state[vcpu.vcpu_id] = _VcpuState(index)
        ex.ioctl_buf(vcpu.fd, ka.KVM_ARM_VCPU_INIT, init.pack())
        page = PERCPU_GPA + PERCPU_SIZE * index
        off = page - RAM_GPA
        ram.view[off : off + PERCPU_SIZE] = bytes(PERCPU_SIZE)
        flags = (FLAG_MASK_SERROR if vm.options.mask_serror else 0) | (
            FLAG_MMIO_PROBE if vm.options.mmio_probe else 0
        )
        for name, value in (
            ("PC_VCPU_ID", vcpu.vcpu_id),
            ("PC_MODE", MODE_CODES[vm.options.mode_of(vcpu.vcpu_id)]),
            ("PC_FLAGS", flags),
            ("PC_TICK_MS", vm.options.tick_ms),
        ):
            _put_u64(ram, off + LAYOUT[name], value)
        for reg, value in (
            (ka.reg_x(0), page),
            (ka.REG_PC, self.image.entry),
            (ka.REG_PSTATE, ka.PSTATE_RESET_EL1H),
        ):
            self._set_reg(vm, vcpu, reg, value)

    def ready_info(self, vm: Vm) -> Dict[str, Any]:
        ram = self.memory()
        return {
            "ram_gpa": RAM_GPA,
            "ram_hva": ram.address,
            "ram_size": RAM_SIZE,
            "percpu_gpa": [self._page(v) for v in vm.vcpus],
            "report_gpa": REPORT_GPA,
            "probe_gpa": PROBE_GPA,
            "mask_serror": bool(vm.options.mask_serror),
            "mmio_probe": bool(vm.options.mmio_probe),
            "tick_ms": vm.options.tick_ms,
            "caps": dict(self.caps),
        }

    # ----------------------------------------------------------------- helpers

    def _page(self, vcpu: Vcpu) -> int:
        return PERCPU_GPA + PERCPU_SIZE * self._state[vcpu.vcpu_id].index

    def _field(self, vcpu: Vcpu, name: str, offset: int = 0) -> int:
        ram = self.memory()
        return vmm.mem_u64(ram, self._page(vcpu) - RAM_GPA + LAYOUT[name] + offset)

    def _set_field(self, vcpu: Vcpu, name: str, value: int) -> None:
        ram = self.memory()
        _put_u64(ram, self._page(vcpu) - RAM_GPA + LAYOUT[name], value)

    def _get_reg(self, vm: Vm, vcpu: Vcpu, reg_id: int) -> int:
        def build(addr: int) -> bytes:
            return api.one_reg(reg_id, addr + api.SIZEOF_KVM_ONE_REG) + bytes(8)

        raw = vm.executor.ioctl_buf(vcpu.fd, api.KVM_GET_ONE_REG, build)
        return int(struct.unpack_from("<Q", raw, api.SIZEOF_KVM_ONE_REG)[0])

    def _set_reg(self, vm: Vm, vcpu: Vcpu, reg_id: int, value: int) -> None:
        def build(addr: int) -> bytes:
            return api.one_reg(reg_id, addr + api.SIZEOF_KVM_ONE_REG) + struct.pack("<Q", value)

        vm.executor.ioctl_buf(vcpu.fd, api.KVM_SET_ONE_REG, build)

    def _irq_line(self, vm: Vm, vcpu: Vcpu, level: int) -> None:
        irq = (
            ((vcpu.vcpu_id >> 8) << KVM_ARM_IRQ_VCPU2_SHIFT)
            | (KVM_ARM_IRQ_TYPE_CPU << KVM_ARM_IRQ_TYPE_SHIFT)
            | ((vcpu.vcpu_id & 0xFF) << KVM_ARM_IRQ_VCPU_SHIFT)
            | KVM_ARM_IRQ_CPU_IRQ
        )
        vm.executor.ioctl_buf(vm.fd, KVM_IRQ_LINE, struct.pack("<II", irq, level))

    def _wake(self, vm: Vm, vcpu: Vcpu) -> None:
        state = self._state[vcpu.vcpu_id]
        if not state.irq_raised:
            self._irq_line(vm, vcpu, 1)
            state.irq_raised = True

    def _maybe_lower(self, vm: Vm, vcpu: Vcpu) -> None:
        state = self._state[vcpu.vcpu_id]
        if not state.irq_raised:
            return
        answered = self._field(vcpu, "PC_HB_REQ") == self._field(vcpu, "PC_HB_ACK")
        if answered and self._field(vcpu, "PC_UNMASK_REQ") == 0:
            self._irq_line(vm, vcpu, 0)
            state.irq_raised = False

    # ----------------------------------------------------------------- exits

    def handle_exit(self, vm: Vm, vcpu: Vcpu) -> ExitAction:
        page, head, reason = vmm.exit_head(vcpu)
        if reason == api.KVM_EXIT_MMIO:
            mmio = api.ExitMmio.unpack_from(head)
            if mmio.phys_addr == REPORT_GPA and mmio.is_write and mmio.length == 8:
                code = int(struct.unpack_from("<Q", mmio.data)[0])
                return self._report(vm, vcpu, code)
            if mmio.phys_addr == PROBE_GPA and not mmio.is_write and mmio.length == 8:
                return self._probe(vm, vcpu, page)
            vmm.emit_exit(
                vm,
                vcpu,
                "UNEXPECTED_MMIO",
                reason,
                self._pc,
                addr=mmio.phys_addr,
                is_write=mmio.is_write,
                len=mmio.length,
            )
            return ExitAction.STOP
        return vmm.stop_on_exit(vm, vcpu, head, reason, self._pc)

    def _pc(self, vm: Vm, vcpu: Vcpu) -> Dict[str, int]:
        return {"pc": self._get_reg(vm, vcpu, ka.REG_PC)}

    def _probe(self, vm: Vm, vcpu: Vcpu, page: _native.Memory) -> ExitAction:
        answer = self._field(vcpu, "PC_PROBES") + 1
        off = api.ExitMmio.DATA_OFFSET
        page.view[off : off + 8] = struct.pack("<Q", answer)
        state = self._state[vcpu.vcpu_id]
        if state.ext_dabt_armed:
            # right after this vCPU's MMIO exit: what KVM defines ext_dabt for
            state.ext_dabt_armed = False
            vm.executor.ioctl_buf(vcpu.fd, api.KVM_SET_VCPU_EVENTS, ka.VcpuEvents.ext_dabt().pack())
            vm.emit({"event": "ext-dabt-injected", "vcpu": vcpu.vcpu_id, "addr": PROBE_GPA})
        return ExitAction.CONTINUE

    def _report(self, vm: Vm, vcpu: Vcpu, code: int) -> ExitAction:
        if code == EV_YIELD:
            return ExitAction.YIELD
        event = self._decode(vcpu, code)
        if event is not None:
            self._maybe_lower(vm, vcpu)
        return vmm.guest_report(vm, vcpu, event, self._pc, reason=api.KVM_EXIT_MMIO, code=code)

    def _fields(self, vcpu: Vcpu, area: str, names: Sequence[str]) -> Dict[str, int]:
        """The u64s the guest stored at ``area`` of its page, one per name."""
        return {name: self._field(vcpu, area, 8 * i) for i, name in enumerate(names)}

    def _syndrome(self, vcpu: Vcpu, area: str) -> Dict[str, int]:
        """ESR (with its EC and ISS), ELR, FAR, SPSR and the count, as the handler stored them."""
        regs = self._fields(vcpu, area, ("esr", "elr", "far", "spsr", "count"))
        return {"esr": regs["esr"], **_esr_fields(regs["esr"]), **regs}

    def _decode(self, vcpu: Vcpu, code: int) -> Optional[Dict[str, Any]]:
        """The event for report ``code`` (None: not a report this guest makes)."""
        if code == EV_READY:
            main = self._fields(vcpu, "PC_MAIN", ("currentel", "sctlr", "mpidr", "daif", "cntfrq"))
            return {"event": "guest-ready", **main, "pstate_a": bool(main["daif"] & ka.PSTATE_A)}
        if code == EV_SERROR:
            return {"event": "serror", **self._syndrome(vcpu, "PC_SERR")}
        if code == EV_SYNC:
            syndrome = self._syndrome(vcpu, "PC_SYNC")
            return {
                "event": "sync",
                **syndrome,
                "dfsc": syndrome["esr"] & 0x3F,
                "probe": bool(self._field(vcpu, "PC_SYNC", 40)),
                "resumed": bool(self._field(vcpu, "PC_SYNC", 48)),
            }
        if code == EV_EXCEPTION:
            exc = self._fields(vcpu, "PC_EXC", ("vector", "esr", "elr", "far", "spsr"))
            vector = exc["vector"]
            name = VECTOR_NAMES[vector] if vector < 16 else str(vector)
            return {"event": "exception", **exc, "vector_name": name}
        if code == EV_UNMASKED:
            return {"event": "unmasked", "daif_before": self._field(vcpu, "PC_MAIN")}
        if code == EV_HEARTBEAT:
            counts = self._fields(
                vcpu,
                "PC_MAIN",
                ("seq", "iterations", "serror_count", "sync_count", "ticks", "probes", "daif",
                 "check_failures"),
            )  # fmt: skip
            return {"event": "heartbeat", **counts, "yields": vcpu.yields}
        if code == EV_CHECK_FAILED:
            regs = self._fields(vcpu, "PC_MAIN", ("x19", "x20", "x21", "x22"))
            return {"event": "guest-check-failed", "check": "registers", **regs}
        return None

    # ----------------------------------------------------------------- commands

    def apply_command(self, vm: Vm, vcpu: Vcpu, cmd: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
        ex = vm.executor
        name = cmd["cmd"]
        if name == "serror":
            esr = cmd.get("esr")
            if esr is not None:
                esr = vmm.int_field(cmd, "esr")
            ex.ioctl_buf(vcpu.fd, api.KVM_SET_VCPU_EVENTS, ka.VcpuEvents.serror(esr).pack())
            return None
        if name == "ext_dabt":
            if not vm.options.mmio_probe:
                raise ValueError(
                    "ext_dabt needs --mmio-probe: KVM defines it only right after an MMIO exit"
                )
            self._state[vcpu.vcpu_id].ext_dabt_armed = True
            return None
        if name == "unmask":
            self._set_field(vcpu, "PC_UNMASK_REQ", 1)
            self._wake(vm, vcpu)
            return None
        if name == "heartbeat":
            self._set_field(vcpu, "PC_HB_REQ", self._field(vcpu, "PC_HB_REQ") + 1)
            self._wake(vm, vcpu)
            return None
        if name == "events":
            reply = vmm.events_reply(vm, vcpu, ka.VcpuEvents.SIZE, ka.VcpuEvents.unpack)
            pstate = self._get_reg(vm, vcpu, ka.REG_PSTATE)
            return {
                **reply,
                "pstate": pstate,
                "pstate_a": bool(pstate & ka.PSTATE_A),
                "pc": self._get_reg(vm, vcpu, ka.REG_PC),
            }
        if name == "regs":
            regs = {reg: self._get_reg(vm, vcpu, rid) for reg, rid in REG_IDS.items()}
            return {"event": "regs", "vcpu": vcpu.vcpu_id, "regs": regs}
        if name == "set-regs":
            for reg, value in vmm.reg_changes(cmd, REG_IDS).items():
                self._set_reg(vm, vcpu, REG_IDS[reg], value)
            return None
        raise ValueError(f"unknown command {name!r}")
