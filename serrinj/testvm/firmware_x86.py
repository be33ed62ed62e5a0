"""A firmware-style x86 guest for a real QEMU: it reports NMIs and machine checks on COM1.

Build it and boot it as the BIOS::

    python -m serrinj.testvm.firmware_x86 -o stub.bin
    qemu-system-x86_64 -accel kvm -bios stub.bin -nographic -nic none -smp 2 \\
        -name guest=NAME,debug-threads=on

The 64 KiB image is mapped by QEMU at 0xF0000 and below 4 GiB; the reset vector
(offset 0xFFF0, F000:FFF0) jumps to the BSP's start. It is built from
:func:`firmware_source` by :mod:`serrinj.testvm.asm_x86` (nothing prebuilt).

What it does, on every CPU, all in real mode (a software-nested KVM emulates
non-64-bit guests and cannot emulate a protected-mode IRET, see
``serrinj.testvm.x86_64``):

- enters "unreal" mode (a 4 GiB ES, through a moment in protected mode) to
  reach its local APIC at 0xFEE00000;
- takes a private 8 KiB stack/data page (``0x20000 + 0x2000 * n``, ``n`` from an
  atomic counter), sets CR4.MCE, reads the bank count from MCG_CAP, enables
  the local APIC with a 10 ms periodic timer and with LINT1 as NMI (QEMU's
  ``nmi`` command only reaches a CPU whose LINT1 is programmed so, as a BIOS
  does), and prints ``ready cpu=<apic id>``;
- the BSP fills the IVT, then starts the APs with INIT-SIPI-SIPI (vector 0xF0:
  the APs start at offset 0 of this image);
- every timer tick it polls the MCE banks (corrected errors raise nothing) and
  prints ``mce-poll cpu=.. bank=.. status=0x.. addr=0x.. misc=0x.. mcg_status=0x..``;
- NMI: ``nmi cpu=<apic id> count=<k>``;
- #MC: the valid banks (read, then cleared together with MCG_STATUS, so MCIP is
  clear before anything is printed) as ``mce cpu=.. bank=.. status=0x<16 hex>
  addr=0x.. misc=0x.. mcg_status=0x..``;
- the BSP answers each ``p`` received on COM1 with ``pong cpu=0 n=<k>``;
- any other exception: ``exception cpu=.. vector=.. ip=0x.. cs=0x..``, then the
  CPU parks.

QEMU itself issues KVM_X86_SETUP_MCE at vCPU init (MCG_CTL and every MCi_CTL
all ones). Use QEMU's default CPU model (``-cpu host`` aborts on the
software-nested hosts).
"""

from __future__ import annotations

import argparse
import functools
import sys
from types import MappingProxyType
from typing import Mapping, Optional, Sequence

from serrinj.kvm import x86_64 as kx
from serrinj.testvm import x86_64 as guest
from serrinj.testvm.asm_x86 import assemble

__all__ = ["IMAGE_SIZE", "build_firmware", "firmware_source", "main"]

IMAGE_SIZE = 0x10000
TICK_MS = 10
#: the APs start at the image's first byte: F000:0000
AP_SIPI_VECTOR = 0xF0

_CONSTANTS: Mapping[str, int] = MappingProxyType(
    {
        "COM1": 0x3F8,
        "CHAR_P": ord("p"),
        "G_PRINT_LOCK": 0x500,
        "G_CPU_COUNT": 0x504,
        "G_PONG": 0x508,
        "PERCPU_SEG": 0x2000,
        "PERCPU_SEG_SHIFT": 9,  # 0x2000 bytes = 0x200 paragraphs per CPU
        "PC_APIC_ID": 0x00,
        "PC_NMI_COUNT": 0x04,
        "PC_TICKS": 0x08,
        "PC_TICK_FLAG": 0x0C,
        "PC_NBANKS": 0x10,
        "PC_LOCK_DEPTH": 0x14,
        "PC_MCE_COUNT": 0x18,
        "PC_MCE": 0x100,
        "PC_POLL": 0x600,
        "PC_STACK_TOP": 0x2000,
        **guest.MCE_APIC_EQUATES,
        "APIC_ID": 0x20,
        "APIC_ICR_LO": 0x300,
        "APIC_ICR_HI": 0x310,
        "APIC_LVT1": 0x360,
        "LVT_DM_NMI": 0x400,
        # all-excluding-self shorthand, level assert: INIT, then STARTUP with the vector
        "ICR_INIT_OTHERS": 0x000C4500,
        "ICR_SIPI_OTHERS": 0x000C4600 | AP_SIPI_VECTOR,
        "TIMER_VECTOR": 0x20,
        "TICK_COUNT": TICK_MS * guest.APIC_TIMER_HZ // 1000,
    }
)
_OWN_HANDLERS = (kx.NMI_VECTOR, kx.MC_VECTOR)

#: how the firmware reports a polled corrected error and a machine check: lines on COM1
_POLL_PRINT = """\
    call print_lock
    mov si, offset s_mce_poll
    call print_banks
    call print_unlock
"""
_MCE_PRINT = """\
    call print_lock
    mov si, offset s_mce
    call print_banks
    call print_unlock
"""

# Entering unreal mode: protected mode just long enough to load ES from a flat
# 4 GiB descriptor; back in real mode ES keeps that limit. No stack is needed,
# so the APs can run it before they have one.
_UNREAL = """\
    lgdt cs:[gdt_desc]
    mov eax, cr0
    or al, 1
    mov cr0, eax
    mov bx, 8
    mov es, bx
    and al, 0xfe
    mov cr0, eax
    xor bx, bx
    mov es, bx
    mov fs, bx
"""


def firmware_source() -> str:
    """The firmware's assembly text (GNU as Intel syntax; constants included as .equ)."""
    # status, addr and misc of one bank entry (see COLLECT_BANKS), each as " name=0x<16 hex>"
    bank_fields = "".join(
        f"    mov si, offset s_{name}\n    call puts\n"
        f"    mov eax, [bx + {offset}]\n    mov edx, [bx + {offset + 4}]\n    call put_hex64\n"
        for name, offset in (("status", 8), ("addr", 16), ("misc", 24))
    )
    ivt = "\n".join(
        f"    mov word ptr fs:[{v * 4}], offset exc_{v}"
        for v in range(32)
        if v not in _OWN_HANDLERS
    )
    return f"""\
# serrinj firmware for QEMU (x86, real mode). Built by serrinj.testvm.asm_x86;
# tests/test_asm_x86.py assembles this same text with GNU as and compares.
.intel_syntax noprefix
.code16
{guest.equates(_CONSTANTS)}

# ---- offset 0 = F000:0000: where the APs start (SIPI vector 0xF0)
ap_start:
    cli
    cld
{_UNREAL}
    jmp cpu_setup

# ---- the BSP, from the reset vector
bsp_start:
    cli
    cld
{_UNREAL}
    mov dword ptr fs:[G_PRINT_LOCK], 0
    mov dword ptr fs:[G_CPU_COUNT], 0
    mov dword ptr fs:[G_PONG], 0
    xor bx, bx
ivt_fill:
    mov word ptr fs:[bx], offset spurious_isr
    mov word ptr fs:[bx + 2], 0xf000
    add bx, 4
    cmp bx, 0x400
    jb ivt_fill
{ivt}
    mov word ptr fs:[{kx.NMI_VECTOR * 4}], offset nmi_isr
    mov word ptr fs:[{kx.MC_VECTOR * 4}], offset mc_isr
    mov word ptr fs:[TIMER_VECTOR * 4], offset timer_isr
    mov dx, COM1 + 1
    mov al, 0
    out dx, al
    mov dx, COM1 + 3
    mov al, 3
    out dx, al

# ---- every CPU: a page of its own, CR4.MCE, the banks, the local APIC timer
cpu_setup:
    mov eax, 1
    lock xadd fs:[G_CPU_COUNT], eax
    shl ax, PERCPU_SEG_SHIFT
    add ax, PERCPU_SEG
    mov ss, ax
    mov sp, PC_STACK_TOP
    mov ds, ax
    mov edi, LAPIC_BASE
    mov eax, es:[edi + APIC_ID]
    shr eax, 24
    mov [PC_APIC_ID], eax
    mov eax, cr4
    or eax, CR4_MCE
    mov cr4, eax
    mov ecx, MSR_MCG_CAP
    rdmsr
    movzx eax, al
    mov [PC_NBANKS], eax
    mov dword ptr es:[edi + APIC_SVR], 0x1ff
    mov dword ptr es:[edi + APIC_LVT1], LVT_DM_NMI
    mov dword ptr es:[edi + APIC_TDCR], 3
    mov dword ptr es:[edi + APIC_LVTT], 0x20000 | TIMER_VECTOR
    mov dword ptr es:[edi + APIC_TMICT], TICK_COUNT
    call print_lock
    mov si, offset s_ready
    call puts
    mov eax, [PC_APIC_ID]
    call put_dec
    call put_crlf
    call print_unlock
    sti
    mov eax, [PC_APIC_ID]
    test eax, eax
    jnz ap_loop

# ---- the BSP starts the APs, then serves COM1
    mov dword ptr es:[edi + APIC_ICR_HI], 0
    mov dword ptr es:[edi + APIC_ICR_LO], ICR_INIT_OTHERS
    mov ecx, 2
    call wait_ticks
    mov dword ptr es:[edi + APIC_ICR_LO], ICR_SIPI_OTHERS
    mov ecx, 1
    call wait_ticks
    mov dword ptr es:[edi + APIC_ICR_LO], ICR_SIPI_OTHERS
bsp_loop:
    mov dx, COM1 + 5
    in al, dx
    test al, 1
    jz bsp_idle
    mov dx, COM1
    in al, dx
    cmp al, CHAR_P
    jne bsp_loop
    inc dword ptr fs:[G_PONG]
    call print_lock
    mov si, offset s_pong
    call puts
    mov eax, [PC_APIC_ID]
    call put_dec
    mov si, offset s_n
    call puts
    mov eax, fs:[G_PONG]
    call put_dec
    call put_crlf
    call print_unlock
    jmp bsp_loop
bsp_idle:
    call tick_work
    hlt
    jmp bsp_loop

ap_loop:
    call tick_work
    hlt
    jmp ap_loop

tick_work:
{guest.tick_poll("tick_done")}tick_done:
    ret

wait_ticks:
    mov eax, [PC_TICKS]
    add eax, ecx
wait_more:
    hlt
    cmp [PC_TICKS], eax
    jb wait_more
    ret

{guest.poll_banks(_POLL_PRINT)}
{guest.COLLECT_BANKS}

# DI = a collect_banks area, SI = the line prefix
print_banks:
    pushad
    mov cx, [di + 8]
    lea bx, [di + 16]
banks_line:
    test cx, cx
    jz banks_printed
    call puts
    push si
    mov eax, [PC_APIC_ID]
    call put_dec
    mov si, offset s_bank
    call puts
    mov eax, [bx]
    call put_dec
{bank_fields}    mov si, offset s_mcg
    call puts
    mov eax, [di]
    mov edx, [di + 4]
    call put_hex64
    call put_crlf
    pop si
    add bx, 32
    dec cx
    jmp banks_line
banks_printed:
    popad
    ret

# ---- serial output, serialised by a lock the owning CPU may re-enter (an NMI
# in the middle of a line must not deadlock it)
print_lock:
    push eax
    push ecx
    mov ecx, [PC_APIC_ID]
    inc ecx
    cmp fs:[G_PRINT_LOCK], ecx
    je lock_held
lock_spin:
    xor eax, eax
    lock cmpxchg fs:[G_PRINT_LOCK], ecx
    je lock_held
    pause
    jmp lock_spin
lock_held:
    inc dword ptr [PC_LOCK_DEPTH]
    pop ecx
    pop eax
    ret

print_unlock:
    dec dword ptr [PC_LOCK_DEPTH]
    jnz unlock_done
    mov dword ptr fs:[G_PRINT_LOCK], 0
unlock_done:
    ret

putc:
    push dx
    push ax
putc_wait:
    mov dx, COM1 + 5
    in al, dx
    test al, 0x20
    jz putc_wait
    pop ax
    mov dx, COM1
    out dx, al
    pop dx
    ret

puts:
    push ax
    push si
puts_next:
    mov al, cs:[si]
    inc si
    test al, al
    jz puts_done
    call putc
    jmp puts_next
puts_done:
    pop si
    pop ax
    ret

put_crlf:
    push si
    mov si, offset s_crlf
    call puts
    pop si
    ret

put_hex64:
    push eax
    mov eax, edx
    call put_hex32
    pop eax
put_hex32:
    push eax
    push bx
    push cx
    mov cx, 8
hex_digit:
    rol eax, 4
    push ax
    mov bx, ax
    and bx, 0xf
    mov al, cs:[bx + hex_digits]
    call putc
    pop ax
    dec cx
    jnz hex_digit
    pop cx
    pop bx
    pop eax
    ret

put_dec:
    pushad
    mov ecx, 10
    xor bx, bx
dec_digit:
    xor edx, edx
    div ecx
    push dx
    inc bx
    test eax, eax
    jnz dec_digit
dec_print:
    pop ax
    add al, 0x30
    call putc
    dec bx
    jnz dec_print
    popad
    ret

# ---- interrupt handlers (SS is always this CPU's page)
{guest.TIMER_ISR}
nmi_isr:
    pushad
    push ds
    push ss
    pop ds
    inc dword ptr [PC_NMI_COUNT]
    call print_lock
    mov si, offset s_nmi
    call puts
    mov eax, [PC_APIC_ID]
    call put_dec
    mov si, offset s_count
    call puts
    mov eax, [PC_NMI_COUNT]
    call put_dec
    call put_crlf
    call print_unlock
    pop ds
    popad
    iret

{guest.mc_isr(_MCE_PRINT)}
{guest.exception_stubs()}
    call print_lock
    mov si, offset s_exception
    call puts
    mov eax, [PC_APIC_ID]
    call put_dec
    mov si, offset s_vector
    call puts
    pop ax
    movzx eax, ax
    call put_dec
    mov si, offset s_ip
    call puts
    mov bp, sp
    movzx eax, word ptr [bp]
    call put_hex32
    mov si, offset s_cs
    call puts
    movzx eax, word ptr [bp + 2]
    call put_hex32
    call put_crlf
    call print_unlock
{guest.PARKED}
# ---- read-only data (the GDT's descriptor is marked accessed: the CPU never
# has to write to this ROM)
gdt:
    .quad 0
    .quad 0x008f93000000ffff
gdt_desc:
    .word 15
    .long gdt + 0xf0000
hex_digits: .ascii "0123456789abcdef"
s_ready: .asciz "ready cpu="
s_pong: .asciz "pong cpu="
s_n: .asciz " n="
s_nmi: .asciz "nmi cpu="
s_count: .asciz " count="
s_mce: .asciz "mce cpu="
s_mce_poll: .asciz "mce-poll cpu="
s_bank: .asciz " bank="
s_status: .asciz " status=0x"
s_addr: .asciz " addr=0x"
s_misc: .asciz " misc=0x"
s_mcg: .asciz " mcg_status=0x"
s_exception: .asciz "exception cpu="
s_vector: .asciz " vector="
s_ip: .asciz " ip=0x"
s_cs: .asciz " cs=0x"
s_crlf: .asciz "\\r\\n"

# ---- the reset vector: F000:FFF0
    .org 0xfff0, 0xff
reset_vector:
    jmp 0xf000:bsp_start
    .org {IMAGE_SIZE:#x}, 0xff
"""


@functools.lru_cache(maxsize=1)
def build_firmware() -> bytes:
    """The 64 KiB firmware image."""
    image = assemble(firmware_source(), origin=0, bits=16).code
    if len(image) != IMAGE_SIZE:
        raise AssertionError(f"the firmware is {len(image)} bytes, not {IMAGE_SIZE}")
    return image


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m serrinj.testvm.firmware_x86 -o stub.bin``."""
    parser = argparse.ArgumentParser(
        prog="python -m serrinj.testvm.firmware_x86",
        description="Build serrinj's x86 firmware guest for qemu-system-x86_64 -bios.",
    )
    parser.add_argument("-o", "--output", required=True, help="where to write the image")
    ns = parser.parse_args(argv)
    with open(ns.output, "wb") as f:
        f.write(build_firmware())
    return 0


if __name__ == "__main__":
    sys.exit(main())
