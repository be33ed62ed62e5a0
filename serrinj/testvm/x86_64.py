"""The x86_64 half of the test VM: a real-mode guest that reports NMIs and machine checks.

The guest
---------
The guest runs in 16-bit real mode with 32-bit registers ("unreal" segments
for the local APIC), built from :func:`guest_source` by
:mod:`serrinj.testvm.asm_x86`. Real mode is a deliberate choice: on hosts
where KVM runs guests through its instruction emulator (a software-nested
KVM such as this project's CI machines) protected-mode IRET is not
emulated, while real-mode interrupt delivery and IRET are.

The VMM loads it like firmware would have: the code at 0x8000 (CS=0x0800), an
IVT at 0 (NMI, #MC, the timer, exception stubs), and for each vCPU a private
8 KiB page at ``0x20000 + 0x2000 * index`` used as its data and stack segment
(DS = SS). ES is a flat 4 GiB segment so the guest can reach its local APIC at
0xFEE00000. The guest itself sets CR4.MCE, reads the bank count from
MCG_CAP, enables its local APIC and starts a periodic timer (``--tick-ms``).

Every vCPU then runs a self-checking loop. ESI counts up, EDI down, EBP by
threes and EBX down again, each from its own previous value, so that
``ESI + EDI``, ``EBP - 3 * ESI`` and ``EBX ^ ESI`` stay constant; a 128-byte
block of its page holds pseudo-random words whose sum is known. Each
iteration verifies the three relations and the sum. A register or word
changed under the guest (by a buggy injector, say) stays wrong until the next
check, which reports it as ``guest-check-failed`` and then re-bases.
``halt`` mode runs one iteration per wake-up (HLT in between), ``spin``
never halts, ``futex`` spins and asks the VMM to yield once per timer tick.
On every tick the guest polls the MCE banks, which is how corrected errors
(no #MC) are found.

Handlers: NMI counts and reports; #MC reads MCG_STATUS and every bank with
MCi_STATUS.VAL (STATUS, ADDR, MISC), clears those banks and MCG_STATUS (so
MCIP is clear again) *before* it reports, so the next machine check may be
injected as soon as the report is seen. Any other exception is reported and
parks the vCPU (CLI; HLT).

With ``--start-paused`` the guest has not run at all: CR4.MCE is still clear,
so an *uncorrected* machine check injected before the first ``run`` becomes a
triple fault (``exit`` with ``SHUTDOWN``), as KVM does for any such guest. An
NMI or a corrected error is kept and taken or found once it runs.

The stall probe
---------------
While ``PC_PROBE`` is nonzero, the main loop hands over to a probe loop that
does nothing but read the TSC (RDTSC) and record the gap between consecutive
reads: a gap much longer than the loop itself is time the vCPU did not run
(a VM exit, a host thread stopped by ptrace, host scheduling). It keeps the
largest gap ever (``PC_PR_MAX``), the largest in the current window
(``PC_PR_WMAX``; the host starts a window by changing ``PC_PR_WSEQ``, the guest
acknowledges in ``PC_PR_WACK`` and resets the maximum), a sample count and a
histogram by bit length (bucket ``b`` counts gaps in ``[2**b, 2**(b+1))`` ticks;
bucket 11 also counts every shorter gap, so buckets 0-10 stay empty). Gaps
above 2**32-1 ticks count as 2**32-1. The loop
makes no VM exits of its own, so the host can drive it through guest RAM
(``ram_hva`` + ``percpu_gpa``) without disturbing it; the ``probe`` command does the
same through the VMM. ``ready`` reports the TSC rate (``tsc_khz``) to convert
ticks to time. The main loop's registers are saved around the probe. While the
probe is on, the NMI handler only counts (``PC_NMI_COUNT``) and sends no
``nmi`` event: the report's VM exit would otherwise be measured as part of
the injector's stall.

Reports go out as ``out 0x600, al`` with an event code in AL; the VMM reads
the vCPU's page to build the event (the vCPU is stopped in the exit, so the
snapshot is consistent).

Events
------
``guest-ready``  ``{"vcpu","cr4","mcg_cap","banks"}``: the guest finished its set-up.
``nmi``          ``{"vcpu","vector":2,"count"}``: ``count`` NMIs taken so far.
``mce``          ``{"vcpu","vector":18,"count","mcg_status",
                 "banks":[{"bank","status","addr","misc"}]}``
``mce-poll``     ``{"vcpu","count","mcg_status","banks":[...]}``: valid banks found by polling.
``heartbeat``    ``{"vcpu","seq","iterations","ticks","nmi_count","mce_count","poll_count",
                 "check_failures","yields"}`` in answer to the ``heartbeat`` command.
``guest-check-failed``  ``{"vcpu","check":"registers","esi","edi","ebp","ebx"}`` or
                 ``{"vcpu","check":"memory","expected","actual"}``.
``exception``    ``{"vcpu","vector","ip","cs"}``: an unexpected exception; the vCPU parks.
``exit``         ``{"vcpu","reason","exit_reason","rip",...}``: e.g. ``SHUTDOWN`` (triple fault).
``events``       ``{"vcpu","mp_state","events":{...}}``: the answer to the ``events`` command.
``probe``        ``{"vcpu","on","active","samples","max_gap","window_max","hist":[32 counts]}``:
                 the answer to the ``probe`` command (gaps in TSC ticks).

Commands (stdin)
----------------
``{"cmd":"nmi","vcpu":V}``                KVM_NMI
``{"cmd":"mce","vcpu":V,"bank":B,"status":S[,"addr":A][,"misc":M][,"mcg_status":G]}``
                                          KVM_X86_SET_MCE
``{"cmd":"events","vcpu":V}``             KVM_GET_VCPU_EVENTS and KVM_GET_MP_STATE
``{"cmd":"heartbeat","vcpu":V}``          the guest answers with a ``heartbeat`` event
``{"cmd":"regs","vcpu":V}``               KVM_GET_REGS, answered by a ``regs`` event
``{"cmd":"set-regs","vcpu":V,"regs":{"rbx":N,...}}``  KVM_GET_REGS + KVM_SET_REGS (tests use
                                          it to prove that the guest's self-check can fail)
``{"cmd":"probe","vcpu":V[,"on":bool]}``  start (``on``: true) or end (false) the stall probe, or
                                          (no ``on``) just read it; answered by a ``probe`` event

The ``ready`` event adds ``mcg_cap``, ``mce_banks``, ``tick_ms``, and ``ram_hva`` /
``ram_size`` (where guest RAM, guest-physical 0, lives in the VMM) with
``percpu_gpa`` (each vCPU's page; offsets in :data:`LAYOUT`), and ``tsc_khz`` (the
guest's TSC rate from KVM_GET_TSC_KHZ, or null when KVM cannot tell).
"""

from __future__ import annotations

import functools
import struct
from types import MappingProxyType
from typing import Any, Dict, List, Mapping, Optional, Tuple

from serrinj import _native
from serrinj.kvm import api
from serrinj.kvm import x86_64 as kx
from serrinj.testvm import vmm
from serrinj.testvm.asm_x86 import Program, assemble
from serrinj.testvm.vmm import ExitAction, GuestBase, Vcpu, Vm

__all__ = ["COLLECT_BANKS", "LAYOUT", "X86Guest", "build_guest", "guest_source"]

# --- guest physical memory
RAM_SIZE = 0x100000
CODE_BASE = 0x8000
PERCPU_BASE = 0x20000
PERCPU_SIZE = 0x2000
TSS_ADDR = 0xFFFBD000  # where QEMU puts it: three pages that must not overlap RAM

# --- the guest <-> VMM protocol
REPORT_PORT = 0x600
EV_READY, EV_NMI, EV_MCE, EV_MCE_POLL = 1, 2, 3, 4
EV_HEARTBEAT, EV_YIELD, EV_CHECK_FAILED, EV_EXCEPTION = 5, 6, 7, 8
MODE_CODES: Mapping[str, int] = MappingProxyType({"halt": 1, "spin": 2, "futex": 3})
TIMER_VECTOR = 0x20
SPURIOUS_VECTOR = 0xFF
#: KVM's local APIC timer counts at 1 GHz; the guest divides by 16
APIC_TIMER_HZ = 1_000_000_000 // 16

#: offsets in each vCPU's page (the guest's DS and SS)
LAYOUT: Mapping[str, int] = MappingProxyType(
    {
        "PC_VCPU_ID": 0x00,  # VMM
        "PC_MODE": 0x04,  # VMM
        "PC_TICK_COUNT": 0x08,  # VMM: APIC timer initial count
        "PC_HB_REQ": 0x0C,  # VMM: heartbeat request sequence
        "PC_HB_ACK": 0x10,  # guest
        "PC_TICK_FLAG": 0x14,
        "PC_TICKS": 0x18,
        "PC_NMI_COUNT": 0x1C,
        "PC_MCE_COUNT": 0x20,
        "PC_POLL_COUNT": 0x24,
        "PC_NBANKS": 0x28,
        "PC_CHECK_FAILS": 0x2C,
        "PC_ITER": 0x30,  # u64
        "PC_CSUM": 0x38,
        "PC_SEED": 0x3C,  # VMM
        "PC_MAIN": 0x40,  # report area of the main loop (0x40 bytes)
        "PC_EXC": 0xA0,  # report area of the exception stubs
        "PC_BLOCK": 0x100,  # the checksummed block
        "PC_MCE": 0x200,  # #MC report: u64 mcg_status, u32 count, pad, 32 x 32-byte banks
        "PC_POLL": 0x700,  # polling report, same layout
        # the stall probe (see "The stall probe" above); the host may read and
        # write these words directly in guest RAM while the guest runs
        "PC_PROBE": 0xB80,  # host: nonzero runs the probe loop, 0 ends it
        "PC_PR_WSEQ": 0xB84,  # host: a new value starts a new window
        "PC_PR_WACK": 0xB88,  # guest: the window sequence it started
        "PC_PR_WMAX": 0xB8C,  # guest: largest gap in the current window (TSC ticks)
        "PC_PR_LAST": 0xB90,  # guest: u64, the last TSC read
        "PC_PR_SAMPLES": 0xB98,  # guest: u64, gaps measured since the guest started
        "PC_PR_MAX": 0xBA0,  # guest: largest gap ever
        "PC_PR_ACTIVE": 0xBA4,  # guest: 1 while in the probe loop
        "PC_PR_HIST": 0xC00,  # guest: 32 x u32, gaps counted by bit length - 1
        "PC_STACK_TOP": PERCPU_SIZE,
    }
)
BLOCK_BYTES = 0x80
CHECK_K1 = 0x5A5AA5A5
CHECK_K2 = 0x13579BDF

#: the machine-check MSRs and local-APIC registers this guest and the QEMU firmware both use
MCE_APIC_EQUATES: Mapping[str, int] = MappingProxyType(
    {
        "CR4_MCE": kx.CR4_MCE,
        "MSR_MCG_CAP": kx.MSR_IA32_MCG_CAP,
        "MSR_MCG_STATUS": kx.MSR_IA32_MCG_STATUS,
        "MSR_MC0_STATUS": kx.mci_msr(0, "status"),
        "LAPIC_BASE": 0xFEE00000,
        "APIC_SVR": 0xF0,
        "APIC_EOI": 0xB0,
        "APIC_LVTT": 0x320,
        "APIC_TMICT": 0x380,
        "APIC_TDCR": 0x3E0,
    }
)

_CONSTANTS: Mapping[str, int] = MappingProxyType(
    {
        **LAYOUT,
        "BLOCK_BYTES": BLOCK_BYTES,
        "REPORT_PORT": REPORT_PORT,
        "EV_READY": EV_READY,
        "EV_NMI": EV_NMI,
        "EV_MCE": EV_MCE,
        "EV_MCE_POLL": EV_MCE_POLL,
        "EV_HEARTBEAT": EV_HEARTBEAT,
        "EV_YIELD": EV_YIELD,
        "EV_CHECK_FAILED": EV_CHECK_FAILED,
        "EV_EXCEPTION": EV_EXCEPTION,
        "MODE_HALT": MODE_CODES["halt"],
        "MODE_FUTEX": MODE_CODES["futex"],
        **MCE_APIC_EQUATES,
        "TIMER_VECTOR": TIMER_VECTOR,
        "SPURIOUS_VECTOR": SPURIOUS_VECTOR,
        "CHECK_K1": CHECK_K1,
        "CHECK_K2": CHECK_K2,
    }
)

#: the bank scan shared by this guest and the QEMU firmware (needs PC_NBANKS,
#: MSR_MCG_STATUS and MSR_MC0_STATUS)
COLLECT_BANKS = """\
# DI = report area (DS): u64 MCG_STATUS, u32 count, then 32 bytes per valid bank
# {u32 bank, pad, u64 status, addr, misc}; each valid bank is cleared.
collect_banks:
    mov ecx, MSR_MCG_STATUS
    rdmsr
    mov [di], eax
    mov [di + 4], edx
    mov dword ptr [di + 8], 0
    lea bx, [di + 16]
    xor esi, esi
bank_next:
    cmp esi, [PC_NBANKS]
    jae banks_done
    lea ecx, [esi * 4 + MSR_MC0_STATUS]
    rdmsr
    test edx, 0x80000000
    jz bank_skip
    mov [bx], esi
    mov [bx + 8], eax
    mov [bx + 12], edx
    inc ecx
    rdmsr
    mov [bx + 16], eax
    mov [bx + 20], edx
    inc ecx
    rdmsr
    mov [bx + 24], eax
    mov [bx + 28], edx
    sub ecx, 2
    xor eax, eax
    xor edx, edx
    wrmsr
    add bx, 32
    inc dword ptr [di + 8]
bank_skip:
    inc esi
    jmp bank_next
banks_done:
    ret
"""

#: exception vectors with a handler of their own (the rest get a reporting stub)
_OWN_HANDLERS = (kx.NMI_VECTOR, kx.MC_VECTOR)

#: the local-APIC timer interrupt, shared with the QEMU firmware: count the tick and flag it for the
#: main loop (needs PC_TICKS, PC_TICK_FLAG, LAPIC_BASE, APIC_EOI)
TIMER_ISR = """\
timer_isr:
    push eax
    push edi
    inc dword ptr ss:[PC_TICKS]
    mov dword ptr ss:[PC_TICK_FLAG], 1
    mov edi, LAPIC_BASE
    mov dword ptr es:[edi + APIC_EOI], 0
    pop edi
    pop eax
    iret
"""

#: where a vCPU parks after an unexpected exception
PARKED = """\
parked:
    cli
    hlt
    jmp parked
"""

#: how this guest reports a polled corrected error and a machine check: an event on the report port
_POLL_REPORT = """\
    inc dword ptr [PC_POLL_COUNT]
    mov al, EV_MCE_POLL
    call report
"""
_MCE_REPORT = """\
    mov al, EV_MCE
    call report
"""


def equates(constants: Mapping[str, int]) -> str:
    """``.equ`` lines for ``constants``."""
    return "\n".join(f".equ {name}, {value:#x}" for name, value in constants.items())


def tick_poll(otherwise: str) -> str:
    """If a timer tick came (PC_TICK_FLAG), take the flag and poll the banks; else go to
    ``otherwise``."""
    return f"""\
    cmp dword ptr [PC_TICK_FLAG], 0
    je {otherwise}
    mov dword ptr [PC_TICK_FLAG], 0
    call poll_banks
"""


def poll_banks(report: str) -> str:
    """The timer-tick bank poll: collect into PC_POLL and run ``report`` if a bank was valid."""
    return f"""\
poll_banks:
    pushad
    mov di, PC_POLL
    call collect_banks
    cmp dword ptr [PC_POLL + 8], 0
    je poll_done
{report}poll_done:
    popad
    ret
"""


def mc_isr(report: str) -> str:
    """The #MC handler: count, collect and clear the banks, clear MCG_STATUS, then ``report``."""
    return f"""\
mc_isr:
    pushad
    push ds
    push ss
    pop ds
    inc dword ptr [PC_MCE_COUNT]
    mov di, PC_MCE
    call collect_banks
    xor eax, eax
    xor edx, edx
    mov ecx, MSR_MCG_STATUS
    wrmsr
{report}    pop ds
    popad
    iret
"""


def exception_stubs() -> str:
    """``spurious_isr``, one stub per exception vector without a handler of its own, and the head of
    ``exc_common`` (vector on the stack, DS = this CPU's page); the caller writes the rest."""
    stubs = "\n".join(
        f"exc_{v}:\n    push {v}\n    jmp exc_common" for v in range(32) if v not in _OWN_HANDLERS
    )
    return f"""\
spurious_isr:
    iret

{stubs}
exc_common:
    push ss
    pop ds
"""


def guest_source() -> str:
    """The guest's assembly text (GNU as Intel syntax; constants included as .equ)."""
    return f"""\
# serrinj test VM guest (x86, real mode). Built by serrinj.testvm.asm_x86;
# tests/test_asm_x86.py assembles this same text with GNU as and compares.
.intel_syntax noprefix
.code16
{equates(_CONSTANTS)}

# ---- entry: CS=0x0800, DS=SS=this vCPU's page, ES=flat 4 GiB, SP=top, IF=0
entry:
    cli
    mov eax, cr4                    # the guest's own job: without CR4.MCE a UC
    or eax, CR4_MCE                 # machine check is a triple fault
    mov cr4, eax
    mov ecx, MSR_MCG_CAP
    rdmsr
    mov [PC_MAIN + 4], eax
    mov [PC_MAIN + 8], edx
    movzx eax, al
    mov [PC_NBANKS], eax
    call block_fill
    mov edi, LAPIC_BASE
    mov dword ptr es:[edi + APIC_SVR], 0x100 | SPURIOUS_VECTOR
    mov dword ptr es:[edi + APIC_TDCR], 3
    mov dword ptr es:[edi + APIC_LVTT], 0x20000 | TIMER_VECTOR
    mov eax, [PC_TICK_COUNT]
    mov es:[edi + APIC_TMICT], eax
    mov eax, cr4
    mov [PC_MAIN], eax
    mov al, EV_READY
    call report
    xor esi, esi
    mov edi, CHECK_K1
    mov ebp, CHECK_K2
    mov ebx, 0xffffffff
    sti

# ---- the self-checking main loop (ESI, EDI, EBP, EBX and the block are checked)
main_loop:
    cmp dword ptr [PC_MODE], MODE_HALT
    jne awake
    hlt
awake:
    mov eax, esi
    add eax, edi
    cmp eax, CHECK_K1
    jne bad_registers
    lea eax, [esi + esi * 2 + CHECK_K2]
    cmp eax, ebp
    jne bad_registers
    mov eax, esi
    not eax
    cmp eax, ebx
    jne bad_registers
    call block_sum
    cmp eax, [PC_CSUM]
    jne bad_memory
advance:
    inc esi
    dec edi
    add ebp, 3
    dec ebx
    add dword ptr [PC_ITER], 1
    adc dword ptr [PC_ITER + 4], 0
    mov eax, [PC_HB_REQ]
    cmp eax, [PC_HB_ACK]
    je no_heartbeat
    mov [PC_HB_ACK], eax
    mov al, EV_HEARTBEAT
    call report
no_heartbeat:
    cmp dword ptr [PC_PROBE], 0
    je no_probe
    call probe
no_probe:
{tick_poll("main_loop")}    cmp dword ptr [PC_MODE], MODE_FUTEX
    jne main_loop
    mov al, EV_YIELD
    call report
    jmp main_loop

bad_registers:
    mov [PC_MAIN + 4], esi
    mov [PC_MAIN + 8], edi
    mov [PC_MAIN + 12], ebp
    mov [PC_MAIN + 16], ebx
    mov dword ptr [PC_MAIN], 1
    jmp check_failed
bad_memory:
    mov [PC_MAIN + 8], eax
    mov edx, [PC_CSUM]
    mov [PC_MAIN + 4], edx
    mov [PC_CSUM], eax
    mov dword ptr [PC_MAIN], 2
check_failed:
    inc dword ptr [PC_CHECK_FAILS]
    mov al, EV_CHECK_FAILED
    call report
    mov edi, CHECK_K1
    sub edi, esi
    lea ebp, [esi + esi * 2 + CHECK_K2]
    mov ebx, esi
    not ebx
    jmp advance

# ---- helpers (main loop: they keep ESI, EDI, EBP, EBX)
report:
    mov dx, REPORT_PORT
    out dx, al
    ret

block_fill:
    mov eax, [PC_SEED]
    xor edx, edx
    xor ebx, ebx
fill_next:
    mov ecx, eax
    shl ecx, 13
    xor eax, ecx
    mov ecx, eax
    shr ecx, 17
    xor eax, ecx
    mov ecx, eax
    shl ecx, 5
    xor eax, ecx
    mov [ebx + PC_BLOCK], eax
    add edx, eax
    add ebx, 4
    cmp ebx, BLOCK_BYTES
    jb fill_next
    mov [PC_CSUM], edx
    ret

block_sum:
    xor eax, eax
    xor ecx, ecx
sum_next:
    add eax, [ecx + PC_BLOCK]
    add ecx, 4
    cmp ecx, BLOCK_BYTES
    jb sum_next
    ret

{poll_banks(_POLL_REPORT)}
# ---- the stall probe: the largest gaps between consecutive TSC reads
probe:
    pushad
    mov dword ptr [PC_PR_ACTIVE], 1
    rdtsc
    mov [PC_PR_LAST], eax
    mov [PC_PR_LAST + 4], edx
probe_loop:
    rdtsc
    mov ecx, eax
    mov ebx, edx
    sub eax, [PC_PR_LAST]
    sbb edx, [PC_PR_LAST + 4]
    mov [PC_PR_LAST], ecx
    mov [PC_PR_LAST + 4], ebx
    test edx, edx
    jz probe_gap
    mov eax, 0xffffffff
probe_gap:
    mov ecx, [PC_PR_WSEQ]
    cmp ecx, [PC_PR_WACK]
    je probe_window
    mov dword ptr [PC_PR_WMAX], 0
    mov [PC_PR_WACK], ecx
probe_window:
    cmp eax, [PC_PR_WMAX]
    jbe probe_max
    mov [PC_PR_WMAX], eax
probe_max:
    cmp eax, [PC_PR_MAX]
    jbe probe_hist
    mov [PC_PR_MAX], eax
probe_hist:
    mov ecx, 11                     # gaps below 2**12 ticks all count in bucket 11:
    shr eax, 12                     # a short loop keeps the sampling period short
    jz probe_count
probe_bits:
    inc ecx
    shr eax, 1
    jnz probe_bits
probe_count:
    inc dword ptr [ecx * 4 + PC_PR_HIST]
    add dword ptr [PC_PR_SAMPLES], 1
    adc dword ptr [PC_PR_SAMPLES + 4], 0
    cmp dword ptr [PC_PROBE], 0
    jne probe_loop
    mov dword ptr [PC_PR_ACTIVE], 0
    popad
    ret

{COLLECT_BANKS}
# ---- interrupt handlers (SS is always this vCPU's page)
{TIMER_ISR}
nmi_isr:
    push eax
    push edx
    inc dword ptr ss:[PC_NMI_COUNT]
    cmp dword ptr ss:[PC_PROBE], 0  # while probing, only count: a report is a VM
    jne nmi_quiet                   # exit, which the probe would measure as a stall
    mov al, EV_NMI
    mov dx, REPORT_PORT
    out dx, al
nmi_quiet:
    pop edx
    pop eax
    iret

{mc_isr(_MCE_REPORT)}
{exception_stubs()}
    pop ax
    movzx eax, ax
    mov [PC_EXC], eax
    mov bp, sp
    movzx eax, word ptr [bp]
    mov [PC_EXC + 4], eax
    movzx eax, word ptr [bp + 2]
    mov [PC_EXC + 8], eax
    mov al, EV_EXCEPTION
    call report
{PARKED}"""


@functools.lru_cache(maxsize=1)
def build_guest() -> Program:
    """The assembled guest (offsets are relative to CS = CODE_BASE >> 4)."""
    return assemble(guest_source(), origin=0, bits=16)


def ivt(program: Program) -> bytes:
    """The real-mode interrupt vector table pointing at the guest's handlers."""
    seg = CODE_BASE >> 4
    entries: List[int] = []
    for vector in range(256):
        if vector == kx.NMI_VECTOR:
            handler = "nmi_isr"
        elif vector == kx.MC_VECTOR:
            handler = "mc_isr"
        elif vector == TIMER_VECTOR:
            handler = "timer_isr"
        elif vector < 32:
            handler = f"exc_{vector}"
        else:
            handler = "spurious_isr"
        entries.append(program[handler])
    return b"".join(struct.pack("<HH", off, seg) for off in entries)


def _real_segment(base: int, limit: int = 0xFFFF, code: bool = False) -> kx.Segment:
    return kx.Segment(
        base=base,
        limit=limit,
        selector=(base >> 4) & 0xFFFF,
        type=11 if code else 3,
        g=1 if limit > 0xFFFFF else 0,
    )


def _u32(mem: _native.Memory, addr: int) -> int:
    return int(struct.unpack_from("<I", mem.view, addr)[0])


class X86Guest(GuestBase):
    """The x86_64 :class:`serrinj.testvm.vmm.GuestArch`."""

    def __init__(self) -> None:
        super().__init__(
            "x86_64", ("nmi", "mce", "events", "heartbeat", "regs", "set-regs", "probe")
        )
        self.program = build_guest()
        self.cpuid: Tuple[kx.CpuidEntry, ...] = ()
        self.mcg_cap = 0
        self.tsc_khz: Optional[int] = None

    # ----------------------------------------------------------------- set-up

    def setup_vm(self, vm: Vm) -> None:
        ex = vm.executor
        # Real mode needs a TSS region on VMX hosts without unrestricted guest;
        # elsewhere the call is harmless. QEMU uses the same address.
        ex.ioctl_int(vm.fd, kx.KVM_SET_TSS_ADDR, TSS_ADDR)
        # The in-kernel irqchip makes HLT block inside KVM_RUN and gives each
        # vCPU a local APIC (timer, NMI delivery) like QEMU's default.
        ex.ioctl_int(vm.fd, api.KVM_CREATE_IRQCHIP, 0)
        ram = vm.add_memory(0, 0, RAM_SIZE)
        self.ram = ram
        code = self.program.code
        ram.view[CODE_BASE : CODE_BASE + len(code)] = code
        table = ivt(self.program)
        ram.view[0 : len(table)] = table
        self.cpuid = self._supported_cpuid(vm)
        if not 1 <= vm.options.mce_banks <= kx.KVM_MAX_MCE_BANKS:
            raise ValueError(f"--mce-banks must be between 1 and {kx.KVM_MAX_MCE_BANKS}")
        supported = struct.unpack(
            "<Q", ex.ioctl_buf(vm.kvm_fd, kx.KVM_X86_GET_MCE_CAP_SUPPORTED, bytes(8))
        )[0]
        self.mcg_cap = (supported & ~kx.MCG_CAP_COUNT_MASK) | vm.options.mce_banks

    def _supported_cpuid(self, vm: Vm) -> Tuple[kx.CpuidEntry, ...]:
        capacity = 64
        while True:
            try:
                raw = vm.executor.ioctl_buf(
                    vm.kvm_fd, kx.KVM_GET_SUPPORTED_CPUID, kx.cpuid2_request(capacity)
                )
            except OSError as err:
                if err.errno == 7 and capacity < 4096:  # E2BIG: more entries than room
                    capacity *= 2
                    continue
                raise
            return kx.unpack_cpuid2(raw)

    def setup_vcpu(self, vm: Vm, vcpu: Vcpu) -> None:
        ex = vm.executor
        index = vm.vcpus.index(vcpu)
        page = PERCPU_BASE + PERCPU_SIZE * index
        if page + PERCPU_SIZE > 0xA0000:
            raise ValueError("too many vCPUs for the guest's memory layout")
        # CR4.MCE is reserved unless CPUID says MCE, so the guest needs a CPUID.
        entries = tuple(
            kx.CpuidEntry(
                e.function, e.index, e.flags, e.eax,
                (e.ebx & 0x00FFFFFF) | (vcpu.vcpu_id << 24), e.ecx, e.edx,
            )
            if e.function == 1
            else e
            for e in self.cpuid
        )  # fmt: skip
        ex.ioctl_buf(vcpu.fd, kx.KVM_SET_CPUID2, kx.pack_cpuid2(entries))
        if self.tsc_khz is None:
            try:
                self.tsc_khz = ex.ioctl_int(vcpu.fd, kx.KVM_GET_TSC_KHZ) or None
            except OSError:
                self.tsc_khz = None  # KVM cannot tell (no stable TSC rate)
        # as QEMU does at vCPU init: MCG_CTL and every MCi_CTL become all ones
        ex.ioctl_buf(vcpu.fd, kx.KVM_X86_SETUP_MCE, struct.pack("<Q", self.mcg_cap))

        ram = self.memory()
        ram.view[page : page + PERCPU_SIZE] = bytes(PERCPU_SIZE)
        tick_count = max(1, vm.options.tick_ms * APIC_TIMER_HZ // 1000)
        for name, value in (
            ("PC_VCPU_ID", vcpu.vcpu_id),
            ("PC_MODE", MODE_CODES[vm.options.mode_of(vcpu.vcpu_id)]),
            ("PC_TICK_COUNT", tick_count),
            ("PC_SEED", 0x2545F491 ^ (vcpu.vcpu_id * 0x9E3779B9 & 0xFFFFFFFF) or 1),
        ):
            struct.pack_into("<I", ram.view, page + LAYOUT[name], value)

        # read-modify-write: the sregs also carry apic_base, which must stay enabled
        sregs = bytearray(ex.ioctl_buf(vcpu.fd, kx.KVM_GET_SREGS, bytes(kx.SIZEOF_KVM_SREGS)))
        kx.sregs_set_segment(sregs, "cs", _real_segment(CODE_BASE, code=True))
        kx.sregs_set_segment(sregs, "ds", _real_segment(page))
        kx.sregs_set_segment(sregs, "ss", _real_segment(page))
        kx.sregs_set_segment(sregs, "es", _real_segment(0, limit=0xFFFFFFFF))
        kx.sregs_set_segment(sregs, "fs", _real_segment(0))
        kx.sregs_set_segment(sregs, "gs", _real_segment(0))
        kx.sregs_set_dtable(sregs, "idt", 0, 0x3FF)
        ex.ioctl_buf(vcpu.fd, kx.KVM_SET_SREGS, bytes(sregs))
        regs = {"rip": self.program["entry"], "rsp": LAYOUT["PC_STACK_TOP"], "rflags": 0x2}
        ex.ioctl_buf(vcpu.fd, kx.KVM_SET_REGS, kx.pack_regs(regs))
        if vcpu.vcpu_id != 0:
            # with an in-kernel irqchip an AP waits for INIT/SIPI; start it directly
            ex.ioctl_buf(
                vcpu.fd, api.KVM_SET_MP_STATE, struct.pack("<I", api.KVM_MP_STATE_RUNNABLE)
            )

    def ready_info(self, vm: Vm) -> Dict[str, Any]:
        ram = self.memory()
        return {
            "mcg_cap": self.mcg_cap,
            "mce_banks": self.mcg_cap & kx.MCG_CAP_COUNT_MASK,
            "tick_ms": vm.options.tick_ms,
            "ram_hva": ram.address,
            "ram_size": RAM_SIZE,
            "percpu_gpa": [self._page(vm, v) for v in vm.vcpus],
            "tsc_khz": self.tsc_khz,
        }

    # ----------------------------------------------------------------- exits

    def _page(self, vm: Vm, vcpu: Vcpu) -> int:
        return PERCPU_BASE + PERCPU_SIZE * vm.vcpus.index(vcpu)

    def handle_exit(self, vm: Vm, vcpu: Vcpu) -> ExitAction:
        page, head, reason = vmm.exit_head(vcpu)
        if reason == api.KVM_EXIT_IO:
            io = api.ExitIo.unpack_from(head)
            if io.port == REPORT_PORT and io.direction == api.KVM_EXIT_IO_OUT and io.size == 1:
                return self._report(vm, vcpu, page.view[io.data_offset])
            vmm.emit_exit(
                vm,
                vcpu,
                "UNEXPECTED_IO",
                reason,
                self._rip,
                port=io.port,
                direction="out" if io.direction == api.KVM_EXIT_IO_OUT else "in",
                size=io.size,
            )
            return ExitAction.STOP
        return vmm.stop_on_exit(vm, vcpu, head, reason, self._rip)

    @staticmethod
    def _rip(vm: Vm, vcpu: Vcpu) -> Dict[str, int]:
        regs = kx.unpack_regs(
            vm.executor.ioctl_buf(vcpu.fd, kx.KVM_GET_REGS, bytes(kx.SIZEOF_KVM_REGS))
        )
        return {"rip": regs["rip"]}

    def _report(self, vm: Vm, vcpu: Vcpu, code: int) -> ExitAction:
        if code == EV_YIELD:
            return ExitAction.YIELD
        event = self._decode(vm, vcpu, code)
        return vmm.guest_report(vm, vcpu, event, self._rip, reason=api.KVM_EXIT_IO, code=code)

    def _decode(self, vm: Vm, vcpu: Vcpu, code: int) -> Optional[Dict[str, Any]]:
        """The event for report ``code`` (None: not a report this guest makes)."""
        ram = self.memory()
        base = self._page(vm, vcpu)

        def field(name: str, offset: int = 0) -> int:
            return _u32(ram, base + LAYOUT[name] + offset)

        event: Dict[str, Any] = {}
        if code == EV_READY:
            event.update(
                event="guest-ready",
                cr4=field("PC_MAIN"),
                mcg_cap=field("PC_MAIN", 4) | field("PC_MAIN", 8) << 32,
                banks=field("PC_NBANKS"),
            )
        elif code == EV_NMI:
            event.update(event="nmi", vector=kx.NMI_VECTOR, count=field("PC_NMI_COUNT"))
        elif code in (EV_MCE, EV_MCE_POLL):
            area = base + LAYOUT["PC_MCE" if code == EV_MCE else "PC_POLL"]
            banks = []
            for i in range(min(_u32(ram, area + 8), kx.KVM_MAX_MCE_BANKS)):
                entry = area + 16 + 32 * i
                banks.append(
                    {
                        "bank": _u32(ram, entry),
                        "status": vmm.mem_u64(ram, entry + 8),
                        "addr": vmm.mem_u64(ram, entry + 16),
                        "misc": vmm.mem_u64(ram, entry + 24),
                    }
                )
            if code == EV_MCE:
                event.update(event="mce", vector=kx.MC_VECTOR, count=field("PC_MCE_COUNT"))
            else:
                event.update(event="mce-poll", count=field("PC_POLL_COUNT"))
            event.update(mcg_status=vmm.mem_u64(ram, area), banks=banks)
        elif code == EV_HEARTBEAT:
            event.update(
                event="heartbeat",
                seq=field("PC_HB_ACK"),
                iterations=vmm.mem_u64(ram, base + LAYOUT["PC_ITER"]),
                ticks=field("PC_TICKS"),
                nmi_count=field("PC_NMI_COUNT"),
                mce_count=field("PC_MCE_COUNT"),
                poll_count=field("PC_POLL_COUNT"),
                check_failures=field("PC_CHECK_FAILS"),
                yields=vcpu.yields,
            )
        elif code == EV_CHECK_FAILED:
            if field("PC_MAIN") == 1:
                event.update(
                    event="guest-check-failed",
                    check="registers",
                    esi=field("PC_MAIN", 4),
                    edi=field("PC_MAIN", 8),
                    ebp=field("PC_MAIN", 12),
                    ebx=field("PC_MAIN", 16),
                )
            else:
                event.update(
                    event="guest-check-failed",
                    check="memory",
                    expected=field("PC_MAIN", 4),
                    actual=field("PC_MAIN", 8),
                )
        elif code == EV_EXCEPTION:
            event.update(
                event="exception",
                vector=field("PC_EXC"),
                ip=field("PC_EXC", 4),
                cs=field("PC_EXC", 8),
            )
        else:
            return None
        return event

    # ----------------------------------------------------------------- commands

    def apply_command(self, vm: Vm, vcpu: Vcpu, cmd: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
        ex = vm.executor
        name = cmd["cmd"]
        if name == "nmi":
            ex.ioctl_int(vcpu.fd, kx.KVM_NMI)
            return None
        if name == "mce":
            mce = kx.Mce(
                status=vmm.int_field(cmd, "status"),
                bank=vmm.int_field(cmd, "bank"),
                addr=vmm.int_field(cmd, "addr", 0),
                misc=vmm.int_field(cmd, "misc", 0),
                mcg_status=vmm.int_field(cmd, "mcg_status", 0),
            )
            if mce.bank > 0xFF:
                raise ValueError("'bank' must fit in a byte")
            ex.ioctl_buf(vcpu.fd, kx.KVM_X86_SET_MCE, mce.pack())
            return None
        if name == "events":
            return vmm.events_reply(vm, vcpu, api.SIZEOF_KVM_VCPU_EVENTS, kx.VcpuEvents.unpack)
        if name == "heartbeat":
            ram = self.memory()
            addr = self._page(vm, vcpu) + LAYOUT["PC_HB_REQ"]
            struct.pack_into("<I", ram.view, addr, (_u32(ram, addr) + 1) & 0xFFFFFFFF)
            return None
        if name == "probe":
            return self._probe(vm, vcpu, cmd)
        if name in ("regs", "set-regs"):
            regs = kx.unpack_regs(ex.ioctl_buf(vcpu.fd, kx.KVM_GET_REGS, bytes(kx.SIZEOF_KVM_REGS)))
            if name == "regs":
                return {"event": "regs", "vcpu": vcpu.vcpu_id, "regs": regs}
            regs.update(vmm.reg_changes(cmd, kx.REGS_NAMES))
            ex.ioctl_buf(vcpu.fd, kx.KVM_SET_REGS, kx.pack_regs(regs))
            return None
        raise ValueError(f"unknown command {name!r}")

    def _probe(self, vm: Vm, vcpu: Vcpu, cmd: Mapping[str, Any]) -> Dict[str, Any]:
        ram = self.memory()
        base = self._page(vm, vcpu)
        on = cmd.get("on")
        if on is not None:
            if not isinstance(on, bool):
                raise ValueError("'on' must be true or false")
            struct.pack_into("<I", ram.view, base + LAYOUT["PC_PROBE"], int(on))
        hist = base + LAYOUT["PC_PR_HIST"]
        return {
            "event": "probe",
            "vcpu": vcpu.vcpu_id,
            "on": bool(_u32(ram, base + LAYOUT["PC_PROBE"])),
            "active": bool(_u32(ram, base + LAYOUT["PC_PR_ACTIVE"])),
            "samples": vmm.mem_u64(ram, base + LAYOUT["PC_PR_SAMPLES"]),
            "max_gap": _u32(ram, base + LAYOUT["PC_PR_MAX"]),
            "window_max": _u32(ram, base + LAYOUT["PC_PR_WMAX"]),
            "hist": [_u32(ram, hist + 4 * i) for i in range(32)],
        }
