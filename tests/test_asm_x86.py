"""The x86 mini-assembler against GNU binutils: the same source text must give the same bytes.

The guests (the test VM's and the QEMU firmware) are written in a subset of
GNU ``as`` Intel syntax, so each one is assembled twice, by
:mod:`serrinj.testvm.asm_x86` and by ``as``/``ld``, and the images and the
symbol tables must be identical. A corpus exercises every mnemonic the
assembler accepts with every operand form, in 16- and 32-bit code.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, Iterator, Tuple

import pytest

from serrinj.testvm import asm_x86
from serrinj.testvm.asm_x86 import AsmError, assemble
from tests.conftest import missing as resource_missing

TOOLS = ("as", "ld", "objdump", "nm")


@pytest.fixture(scope="module")
def gnu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A work directory, once GNU binutils are known to be there."""
    missing = [t for t in TOOLS if not shutil.which(t)]
    if missing:
        resource_missing(f"GNU binutils ({', '.join(missing)}) missing; apt-get install binutils")
    yield tmp_path_factory.mktemp("gas")


def gnu_assemble(
    workdir: Path, name: str, source: str, origin: int = 0
) -> Tuple[bytes, Dict[str, int]]:
    """``source`` through ``as`` and ``ld`` to a flat binary; returns it and ``nm``'s symbols."""
    src = workdir / f"{name}.s"
    obj = workdir / f"{name}.o"
    out = workdir / f"{name}.bin"
    # x86-64 objects use RELA, so `label - constant` fits a 16-bit field until
    # ld resolves it (i386 REL would have to store the addend in the field).
    src.write_text(".intel_syntax noprefix\n.code16\n" + source + "\n")
    subprocess.run(["as", "--64", "-o", str(obj), str(src)], check=True, capture_output=True)
    subprocess.run(
        ["ld", "-m", "elf_x86_64", "-e", "0", f"-Ttext={origin:#x}", "--oformat", "binary",
         "-o", str(out), str(obj)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    nm = subprocess.run(["nm", str(obj)], check=True, capture_output=True, text=True).stdout
    symbols = {}
    for line in nm.splitlines():
        value, _kind, sym = line.split()
        symbols[sym] = int(value, 16)
    return out.read_bytes(), symbols


def _disasm(workdir: Path, code: bytes, start: int, origin: int) -> str:
    blob = workdir / "diff.bin"
    blob.write_bytes(code)
    lo = max(start - 24, 0)
    result = subprocess.run(
        ["objdump", "-D", "-b", "binary", "-m", "i8086", "-M", "intel",
         f"--adjust-vma={origin:#x}", f"--start-address={origin + lo:#x}",
         f"--stop-address={origin + min(start + 24, len(code)):#x}", str(blob)],
        capture_output=True,
        text=True,
    )  # fmt: skip
    return "\n".join(result.stdout.splitlines()[7:])


def assert_same_as_gnu(workdir: Path, name: str, source: str, origin: int = 0) -> None:
    expected, gnu_symbols = gnu_assemble(workdir, name, source, origin)
    program = assemble(source, origin=origin)
    ours = program.code
    if ours != expected:
        at = next(
            (i for i, (a, b) in enumerate(zip(ours, expected)) if a != b),
            min(len(ours), len(expected)),
        )
        pytest.fail(
            f"{name}: first difference at offset {at:#x} (ours {len(ours)} bytes, "
            f"GNU as {len(expected)} bytes)\n--- GNU as:\n{_disasm(workdir, expected, at, origin)}"
            f"\n--- serrinj:\n{_disasm(workdir, ours, at, origin)}"
        )
    # every label and equate has the value GNU as gave it (labels are section-relative there)
    for sym, value in gnu_symbols.items():
        ours_value = program.symbols[sym]
        if sym in asm_symbols_that_are_labels(source):
            ours_value -= origin
        assert ours_value & 0xFFFFFFFFFFFFFFFF == value, sym


def asm_symbols_that_are_labels(source: str) -> set[str]:
    return set(re.findall(r"^\s*([A-Za-z_.$][\w.$]*):", source, re.M))


# ------------------------------------------------------------------ the guests


def test_test_vm_guest_matches_gnu_as(gnu: Path) -> None:
    from serrinj.testvm.x86_64 import guest_source

    assert_same_as_gnu(gnu, "testvm_guest", guest_source())


def test_firmware_matches_gnu_as(gnu: Path) -> None:
    from serrinj.testvm.firmware_x86 import firmware_source

    assert_same_as_gnu(gnu, "firmware", firmware_source())


# ------------------------------------------------------------------ the corpus

_CC = sorted(asm_x86._CC)  # every condition-code spelling the assembler accepts

CORPUS = (
    """
.equ SMALL, 0x40
.equ BIG, 0x12345
.equ NEG, -3
start:
    hlt
    cli
    sti
    cld
    std
    clc
    stc
    nop
    pause
    rdmsr
    wrmsr
    rdtsc
    cpuid
    int3
    int 3
    int 0x10
    lodsb
    stosb
    rep stosb
    lodsd
    stosd
    iret
    iretd
    pusha
    pushad
    popa
    popad
    pushf
    pushfd
    popf
    popfd
    ret
# moves
    mov al, 1
    mov ah, 0xff
    mov ax, -1
    mov eax, 0xffffffff
    mov bh, cl
    mov cx, dx
    mov esi, edi
    mov ebp, esp
    mov ax, [bx]
    mov ax, [bp]
    mov ax, [bp + 2]
    mov ax, [bx + si]
    mov ax, [bx + di + 0x7f]
    mov ax, [bp + si - 0x80]
    mov ax, [bp + di + 0x80]
    mov ax, [si + 0x1234]
    mov ax, [di - 1]
    mov [bx + SMALL], eax
    mov eax, [0x40]
    mov ax, [SMALL]
    mov al, [0x1234]
    mov [0x20], ax
    mov [SMALL + 4], al
    mov cs:[0x20], ax
    mov al, es:[0x10]
    mov ecx, [0x40]
    mov [0x40], ecx
    mov eax, [ebx]
    mov eax, [ebp]
    mov eax, [esp]
    mov eax, [esp + 8]
    mov eax, [ebp - 4]
    mov eax, [ebx + BIG]
    mov eax, [eax + ecx*2]
    mov eax, [ebx + esi*4 + 8]
    mov eax, [esi*8 + 0x401]
    mov eax, [ebp + edi]
    mov eax, [esp + ebx*1]
    mov byte ptr [bx], 0x41
    mov word ptr [bx], 0x4142
    mov dword ptr [bx], 0x41424344
    mov dword ptr es:[edi + 0xf0], 0x1ff
    mov dword ptr ss:[0x18], 1
    mov word ptr fs:[8], offset start
    mov si, offset msg
    mov esi, offset msg
    mov ds, ax
    mov es, bx
    mov ss, [bx]
    mov ax, ds
    mov eax, fs
    mov [bx], gs
    mov eax, cr0
    mov cr0, eax
    mov ebx, cr4
    mov cr4, ebx
    mov edx, cr3
    mov cr2, eax
    mov ax, ss:[bp]
    mov ax, ds:[bp]
    mov ax, ds:[bx]
    mov al, cs:[bx + msg]
    movzx eax, al
    movzx ecx, byte ptr [si]
    movzx edx, word ptr [bp + 2]
    movzx ax, bl
    lea bx, [di + 16]
    lea ecx, [esi*4 + 0x401]
    lea eax, [esi + BIG]
    lea ebp, [ebx + ecx*8 - 8]
# arithmetic and logic
"""
    + "\n".join(
        f"""    {op} al, 0x70
    {op} ax, 0x7f
    {op} ax, 0x80
    {op} eax, -1
    {op} eax, 0xffffe000
    {op} ebx, 0xffffe000
    {op} ecx, 5
    {op} bl, 0xfe
    {op} eax, ebx
    {op} ax, [bx]
    {op} [bx + 2], cx
    {op} dword ptr [SMALL], 1
    {op} word ptr [SMALL], BIG & 0xffff
    {op} byte ptr es:[edi], 7"""
        for op in ("add", "or", "adc", "sbb", "and", "sub", "xor", "cmp")
    )
    + """
    test al, 1
    test ax, 0x100
    test eax, 0x80000000
    test edx, 0x80000000
    test cl, 3
    test byte ptr [bx], 1
    test dword ptr [0x20], 0x80000000
    test eax, ebx
    test [bx], ax
    test ax, [bx]
"""
    + "\n".join(
        f"""    {op} eax, 1
    {op} eax, 4
    {op} ax, cl
    {op} byte ptr [bx], 1
    {op} dword ptr [bx], 13"""
        for op in ("rol", "ror", "rcl", "rcr", "shl", "sal", "shr", "sar")
    )
    + """
    not eax
    neg ax
    mul ebx
    div byte ptr [bx]
    inc eax
    inc ax
    inc cl
    inc dword ptr [0x10]
    dec esi
    dec word ptr [bp]
    dec byte ptr [bx]
    push ax
    push eax
    push ds
    push es
    push ss
    push cs
    push fs
    push gs
    push 5
    push -1
    push 0x1234
    push offset start
    push word ptr [bx]
    push dword ptr [bx]
    pop ax
    pop eax
    pop ds
    pop es
    pop ss
    pop fs
    pop gs
    pop word ptr [bx]
    xchg eax, ebx
    xchg ebx, eax
    xchg cx, dx
    xchg al, bl
    xchg [bx], ax
    xchg ax, [bx]
    xadd [bx], eax
    lock xadd dword ptr es:[edi], eax
    cmpxchg [bx], cl
    lock cmpxchg dword ptr fs:[0x100], edx
    in al, dx
    in ax, dx
    in eax, dx
    in al, 0x60
    out dx, al
    out dx, ax
    out dx, eax
    out 0x80, al
    out 0x80, eax
    lgdt [0x100]
    lgdt cs:[gdtr]
    lidt [bx]
# branches, short and near, backwards and forwards
    call later
    jmp later
"""
    + "\n".join(f"    j{cc} later" for cc in _CC)
    + """
    jmp 0xf000:start
back:
    .space 100, 0x90
"""
    + "\n".join(f"    j{cc} back" for cc in _CC)
    + """
    .space 70, 0x90
    jmp back
    jmp later
later:
    jmp start
# data
msg: .asciz "ok\\r\\n"
    .ascii "a\\"b\\\\c\\t\\0"
    .byte 1, 0xff, -1, SMALL
    .word 0x1234, later, start + 2, later - back
    .long BIG, msg
    .quad 0x00cf9b000000ffff
    .balign 16, 0
gdtr:
    .word 23
    .long gdtr
    .space 5, 0xcc
    .org 0x800, 0xaa
.code32
mode32:
    mov eax, [ebx]
    mov eax, [0x1234]
    mov al, [0x20]
    mov ax, [ebx + 4]
    mov eax, [bx]
    add eax, 0x12345
    add ax, 0x1234
    push 5
    push ax
    push eax
    push 0x12345
    pushad
    pushad
    pusha
    iret
    iretd
    inc eax
    inc ax
    lea eax, [ebx + ecx*4 + 0x100]
    mov esi, offset msg
    call mode32
    jmp mode32
    je start
    jmp 0x8:mode32
.code16
tail:
    jne tail
"""
)


def test_corpus_covers_every_mnemonic() -> None:
    used = {
        line.split()[0].lower()
        for line in CORPUS.splitlines()
        if line.strip() and not line.strip().startswith(("#", ".")) and ":" not in line.split()[0]
    }
    used |= {"xadd", "cmpxchg", "stosb"}  # behind a lock/rep prefix in the corpus
    assert used >= asm_x86.MNEMONICS, sorted(asm_x86.MNEMONICS - used)


def test_corpus_matches_gnu_as(gnu: Path) -> None:
    assert_same_as_gnu(gnu, "corpus", CORPUS)


@pytest.mark.parametrize("gap", [120, 121, 122, 123, 124, 125, 126, 127, 128, 129, 130])
def test_relaxation_at_the_edges_matches_gnu_as(gnu: Path, gap: int) -> None:
    # forward and backward jumps right at the rel8 limits, and a chain where
    # growing one jump pushes another out of range
    source = f"""
top:
    je fwd
    jmp fwd2
    .space {gap}, 0x90
fwd:
    jne top
    .space {gap - 2}, 0x90
fwd2:
    jmp top
    jz top
"""
    assert_same_as_gnu(gnu, f"edge{gap}", source)


# ------------------------------------------------------------------ no tools needed


def test_short_and_near_jumps_by_hand() -> None:
    assert assemble("a: jmp a").code == b"\xeb\xfe"
    assert assemble(".space 126, 0\na: .space 1, 0\njmp b\n.space 127, 0\nb:").code[127:129] == (
        b"\xeb\x7f"
    )
    near = assemble("jmp b\n.space 128, 0\nb:").code
    assert near[:3] == b"\xe9\x80\x00"
    assert assemble("jz b\n.space 200, 0\nb:").code[:4] == b"\x0f\x84\xc8\x00"
    assert assemble("x: call x", bits=32).code == b"\xe8\xfb\xff\xff\xff"


def test_symbols_and_origin() -> None:
    program = assemble(".equ K, 3 << 4 | 1\nnop\nhere:\nmov ax, offset here", origin=0x7C00)
    assert program["here"] == 0x7C01
    assert program["K"] == 0x31
    assert program.code == b"\x90\xb8\x01\x7c"


def test_gnu_precedence() -> None:
    # `+` binds looser than `&` and `<<` in GNU as (unlike C)
    assert assemble("mov ax, 1 + 2 & 3").code == b"\xb8\x03\x00"
    assert assemble("mov ax, 2 << 3 + 1").code == b"\xb8\x11\x00"
    assert assemble("mov ax, (2 << 3) * 2 - ~0").code == b"\xb8\x21\x00"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("mov eax, label\nlabel:", "write `offset LABEL`"),
        ("mov eax, offset nowhere", "undefined symbol"),
        ("mov [bx], 1", "ambiguous"),
        ("mov ax, bl", "disagree"),
        ("mov ax, [0x12345]", "does not fit"),
        ("mov al, 0x100", "does not fit"),
        ("jmp 0x1234", "label"),
        ("a:\na:", "defined twice"),
        (".equ A, B\n.equ B, 1", "not an equate defined before it"),
        (".balign 4", "explicit fill"),
        ("nop\n.org 0, 0", "backwards"),
        ("frob eax", "unknown instruction"),
        ("mov ax, [bx + cx]", "invalid 16-bit address"),
        ("mov eax, [esp*2]", "esp cannot be an index"),
        ("mov ax, [ax + ebx]", "mixed 16- and 32-bit"),
        ("nop; nop", "separates statements"),
        ("pop cs", "does not exist"),
        ("mov cr0, ax", "32-bit register"),
        ("mov eax, [bx*2]", "no scale"),
    ],
)
def test_errors(source: str, message: str) -> None:
    with pytest.raises(AsmError, match=re.escape(message)):
        assemble(source)


def test_error_names_the_line() -> None:
    with pytest.raises(AsmError) as info:
        assemble("nop\nnop\nmov [bx], 1\n")
    assert info.value.line == 3
    assert "mov [bx], 1" in str(info.value)
