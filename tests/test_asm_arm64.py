"""The A64 assembler against GNU binutils: every encoding must match ``aarch64-linux-gnu-as``.

Each case pairs a call on :class:`Asm` with the GNU syntax written out by
hand (not generated from the call), so a wrong operand order or a wrong
field shows up as a mismatch.
"""

from __future__ import annotations

import os
import random
import struct
import subprocess
import tempfile
from typing import Callable, List, Tuple

import pytest

from serrinj.testvm.asm_arm64 import Asm, AsmError, encode_logical_imm
from tests.conftest import need_tool

Case = Tuple[Callable[[Asm], None], str]

CASES: List[Case] = [
    # wide moves
    (lambda a: a.movz("x0", 0x1234), "movz x0, #0x1234"),
    (lambda a: a.movz("x7", 0xBEEF, 16), "movz x7, #0xbeef, lsl #16"),
    (lambda a: a.movz("x30", 0xFFFF, 48), "movz x30, #0xffff, lsl #48"),
    (lambda a: a.movz("w3", 0x8000, 16), "movz w3, #0x8000, lsl #16"),
    (lambda a: a.movk("x1", 0xCAFE, 32), "movk x1, #0xcafe, lsl #32"),
    (lambda a: a.movk("w2", 0x1), "movk w2, #0x1"),
    (lambda a: a.movn("x4", 0), "movn x4, #0"),
    (lambda a: a.movn("w4", 0x12, 16), "movn w4, #0x12, lsl #16"),
    (
        lambda a: a.mov_imm("x0", 0x1234_5678_9ABC_DEF0),
        "movz x0, #0xdef0\nmovk x0, #0x9abc, lsl #16\nmovk x0, #0x5678, lsl #32\n"
        "movk x0, #0x1234, lsl #48",
    ),
    (lambda a: a.mov_imm("x2", 0x0900_0000), "movz x2, #0x900, lsl #16"),
    (lambda a: a.mov_imm("x2", 0), "movz x2, #0"),
    (lambda a: a.mov_imm("x5", -2), "movn x5, #1"),
    (lambda a: a.mov_imm("x5", 0xFFFF_FFFF_FFFF_1234), "movn x5, #0xedcb"),
    (lambda a: a.mov_imm("x6", 0xFFFF_0000_FFFF_0001), "movn x6, #0xfffe\nmovk x6, #0x0, lsl #32"),
    (lambda a: a.mov_imm("w9", 0xC4000003), "movz w9, #0x3\nmovk w9, #0xc400, lsl #16"),
    (lambda a: a.mov_imm("x1", 0x1_0000_0002), "movz x1, #0x2\nmovk x1, #0x1, lsl #32"),
    (lambda a: a.mov("x0", "x1"), "mov x0, x1"),
    (lambda a: a.mov("w0", "w29"), "mov w0, w29"),
    (lambda a: a.mov("sp", "x9"), "mov sp, x9"),
    (lambda a: a.mov("x9", "sp"), "mov x9, sp"),
    (lambda a: a.mov("x3", "xzr"), "mov x3, xzr"),
    (lambda a: a.mov("x3", 0x42), "movz x3, #0x42"),
    # add / sub / cmp
    (lambda a: a.add("x0", "x1", 4), "add x0, x1, #4"),
    (lambda a: a.add("sp", "sp", 0x100), "add sp, sp, #0x100"),
    (lambda a: a.add("x2", "x3", 1, 12), "add x2, x3, #1, lsl #12"),
    (lambda a: a.add("w2", "w3", 0xFFF), "add w2, w3, #0xfff"),
    (lambda a: a.add("x0", "x1", "x2"), "add x0, x1, x2"),
    (lambda a: a.add("x0", "x1", "x2", 3), "add x0, x1, x2, lsl #3"),
    (lambda a: a.add("w5", "w6", "w7", 2), "add w5, w6, w7, lsl #2"),
    (lambda a: a.adds("x0", "x0", 1), "adds x0, x0, #1"),
    (lambda a: a.sub("sp", "sp", 272), "sub sp, sp, #272"),
    (lambda a: a.sub("x10", "x11", "x12"), "sub x10, x11, x12"),
    (lambda a: a.sub("x10", "x11", 8, 12), "sub x10, x11, #8, lsl #12"),
    (lambda a: a.subs("x1", "x1", 1), "subs x1, x1, #1"),
    (lambda a: a.subs("w1", "w2", "w3"), "subs w1, w2, w3"),
    (lambda a: a.cmp("x0", 0x70), "cmp x0, #0x70"),
    (lambda a: a.cmp("w0", 9), "cmp w0, #9"),
    (lambda a: a.cmp("x3", "x4"), "cmp x3, x4"),
    (lambda a: a.cmp("sp", 16), "cmp sp, #16"),
    (lambda a: a.cmn("x3", 1), "cmn x3, #1"),
    # logical
    (lambda a: a.and_("x0", "x1", 0xFF), "and x0, x1, #0xff"),
    (lambda a: a.and_("x0", "x1", 0xFFFFFF), "and x0, x1, #0xffffff"),
    (lambda a: a.and_("w0", "w1", 0xF), "and w0, w1, #0xf"),
    (lambda a: a.and_("x2", "x2", 0xFFFF_FFFF_FFFF_FFF0), "and x2, x2, #0xfffffffffffffff0"),
    (lambda a: a.and_("sp", "x2", 0xFFFF_FFFF_FFFF_FFF0), "and sp, x2, #0xfffffffffffffff0"),
    (lambda a: a.and_("x0", "x1", "x2"), "and x0, x1, x2"),
    (lambda a: a.and_("x0", "x1", "x2", "lsr #4"), "and x0, x1, x2, lsr #4"),
    (lambda a: a.orr("x0", "x0", 0x100), "orr x0, x0, #0x100"),
    (lambda a: a.orr("x1", "x1", 0x5555_5555_5555_5555), "orr x1, x1, #0x5555555555555555"),
    (lambda a: a.orr("w1", "w1", 0x80000000), "orr w1, w1, #0x80000000"),
    (lambda a: a.orr("x0", "x1", "x2", "lsl #8"), "orr x0, x1, x2, lsl #8"),
    (lambda a: a.orr("x0", "xzr", 0xFE000000), "orr x0, xzr, #0xfe000000"),
    (lambda a: a.eor("x3", "x3", 1), "eor x3, x3, #1"),
    (lambda a: a.eor("x3", "x4", "x5", "asr #63"), "eor x3, x4, x5, asr #63"),
    (lambda a: a.ands("x3", "x4", 0x3F), "ands x3, x4, #0x3f"),
    (lambda a: a.tst("x4", 0x10), "tst x4, #0x10"),
    (lambda a: a.tst("w4", "w5"), "tst w4, w5"),
    (lambda a: a.bic("x1", "x2", "x3"), "bic x1, x2, x3"),
    (lambda a: a.orn("x1", "x2", "x3"), "orn x1, x2, x3"),
    (lambda a: a.mvn("x22", "x19"), "mvn x22, x19"),
    (lambda a: a.mvn("w2", "w3"), "mvn w2, w3"),
    (lambda a: a.bic("x1", "x2", 0x100), "and x1, x2, #0xfffffffffffffeff"),
    # shifts and bit fields
    (lambda a: a.lsl("x0", "x1", 4), "lsl x0, x1, #4"),
    (lambda a: a.lsl("x0", "x1", 0), "lsl x0, x1, #0"),
    (lambda a: a.lsl("w0", "w1", 31), "lsl w0, w1, #31"),
    (lambda a: a.lsr("x0", "x1", 60), "lsr x0, x1, #60"),
    (lambda a: a.lsr("w9", "w8", 3), "lsr w9, w8, #3"),
    (lambda a: a.lsl("x0", "x1", "x2"), "lsl x0, x1, x2"),
    (lambda a: a.lsr("x0", "x1", "x2"), "lsr x0, x1, x2"),
    (lambda a: a.asr("x7", "x8", 9), "asr x7, x8, #9"),
    (lambda a: a.ubfx("x0", "x1", 26, 6), "ubfx x0, x1, #26, #6"),
    (lambda a: a.ubfx("w0", "w1", 0, 8), "ubfx w0, w1, #0, #8"),
    # multiply / divide / conditional select
    (lambda a: a.mul("x0", "x1", "x2"), "mul x0, x1, x2"),
    (lambda a: a.madd("x0", "x1", "x2", "x3"), "madd x0, x1, x2, x3"),
    (lambda a: a.msub("x0", "x1", "x2", "x3"), "msub x0, x1, x2, x3"),
    (lambda a: a.udiv("x4", "x5", "x6"), "udiv x4, x5, x6"),
    (lambda a: a.udiv("w4", "w5", "w6"), "udiv w4, w5, w6"),
    (lambda a: a.csel("x0", "x1", "x2", "lo"), "csel x0, x1, x2, lo"),
    (lambda a: a.csinc("x0", "x1", "x2", "ge"), "csinc x0, x1, x2, ge"),
    (lambda a: a.cset("x0", "eq"), "cset x0, eq"),
    (lambda a: a.cset("w1", "hi"), "cset w1, hi"),
    # loads and stores
    (lambda a: a.ldr("x0", "x1"), "ldr x0, [x1]"),
    (lambda a: a.ldr("x0", "x1", 8), "ldr x0, [x1, #8]"),
    (lambda a: a.ldr("x0", "sp", 32760), "ldr x0, [sp, #32760]"),
    (lambda a: a.ldr("w0", "x1", 4), "ldr w0, [x1, #4]"),
    (lambda a: a.ldr("x0", "x1", -8), "ldur x0, [x1, #-8]"),
    (lambda a: a.ldr("x0", "x1", 3), "ldur x0, [x1, #3]"),
    (lambda a: a.ldr("x0", "x1", 16, "pre"), "ldr x0, [x1, #16]!"),
    (lambda a: a.ldr("x0", "sp", 16, "post"), "ldr x0, [sp], #16"),
    (lambda a: a.str_("x0", "x1"), "str x0, [x1]"),
    (lambda a: a.str_("xzr", "x1", 0x100), "str xzr, [x1, #0x100]"),
    (lambda a: a.str_("w3", "x2", 0x3FFC), "str w3, [x2, #0x3ffc]"),
    (lambda a: a.str_("x0", "sp", -16, "pre"), "str x0, [sp, #-16]!"),
    (lambda a: a.str_("x0", "x1", -256), "stur x0, [x1, #-256]"),
    (lambda a: a.ldrb("w0", "x1"), "ldrb w0, [x1]"),
    (lambda a: a.ldrb("w0", "x1", 0x18), "ldrb w0, [x1, #0x18]"),
    (lambda a: a.strb("w0", "x1"), "strb w0, [x1]"),
    (lambda a: a.strb("wzr", "x1", 4095), "strb wzr, [x1, #4095]"),
    (lambda a: a.strb("w0", "x1", 1, "post"), "strb w0, [x1], #1"),
    (lambda a: a.ldrh("w0", "x1", 2), "ldrh w0, [x1, #2]"),
    (lambda a: a.strh("w0", "x1", 6), "strh w0, [x1, #6]"),
    (lambda a: a.ldp("x0", "x1", "sp"), "ldp x0, x1, [sp]"),
    (lambda a: a.ldp("x29", "x30", "sp", 16, "post"), "ldp x29, x30, [sp], #16"),
    (lambda a: a.ldp("x2", "x3", "x4", -512), "ldp x2, x3, [x4, #-512]"),
    (lambda a: a.ldp("w2", "w3", "x4", 252), "ldp w2, w3, [x4, #252]"),
    (lambda a: a.stp("x29", "x30", "sp", -16, "pre"), "stp x29, x30, [sp, #-16]!"),
    (lambda a: a.stp("x0", "x1", "sp", 504), "stp x0, x1, [sp, #504]"),
    (lambda a: a.stp("x0", "xzr", "x2", 8, "post"), "stp x0, xzr, [x2], #8"),
    # system
    (lambda a: a.mrs("x0", "esr_el1"), "mrs x0, esr_el1"),
    (lambda a: a.mrs("x1", "far_el1"), "mrs x1, far_el1"),
    (lambda a: a.mrs("x2", "elr_el1"), "mrs x2, elr_el1"),
    (lambda a: a.mrs("x3", "spsr_el1"), "mrs x3, spsr_el1"),
    (lambda a: a.mrs("x4", "vbar_el1"), "mrs x4, vbar_el1"),
    (lambda a: a.mrs("x5", "daif"), "mrs x5, daif"),
    (lambda a: a.mrs("x6", "cntvct_el0"), "mrs x6, cntvct_el0"),
    (lambda a: a.mrs("x7", "cntfrq_el0"), "mrs x7, cntfrq_el0"),
    (lambda a: a.mrs("x8", "mpidr_el1"), "mrs x8, mpidr_el1"),
    (lambda a: a.mrs("x9", "tpidr_el1"), "mrs x9, tpidr_el1"),
    (lambda a: a.mrs("x10", "currentel"), "mrs x10, currentel"),
    (lambda a: a.mrs("x11", "isr_el1"), "mrs x11, isr_el1"),
    (lambda a: a.mrs("x12", "sctlr_el1"), "mrs x12, sctlr_el1"),
    (lambda a: a.mrs("x13", "midr_el1"), "mrs x13, midr_el1"),
    (lambda a: a.mrs("x14", "sp_el0"), "mrs x14, sp_el0"),
    (lambda a: a.mrs("x15", "icc_iar1_el1"), "mrs x15, icc_iar1_el1"),
    (lambda a: a.mrs("x16", "icc_sre_el1"), "mrs x16, icc_sre_el1"),
    (lambda a: a.mrs("x17", "cntv_ctl_el0"), "mrs x17, cntv_ctl_el0"),
    (lambda a: a.mrs("x18", "spsel"), "mrs x18, spsel"),
    (lambda a: a.msr("vbar_el1", "x0"), "msr vbar_el1, x0"),
    (lambda a: a.msr("elr_el1", "x1"), "msr elr_el1, x1"),
    (lambda a: a.msr("spsr_el1", "x2"), "msr spsr_el1, x2"),
    (lambda a: a.msr("esr_el1", "x3"), "msr esr_el1, x3"),
    (lambda a: a.msr("far_el1", "x3"), "msr far_el1, x3"),
    (lambda a: a.msr("daif", "x4"), "msr daif, x4"),
    (lambda a: a.msr("tpidr_el1", "x5"), "msr tpidr_el1, x5"),
    (lambda a: a.msr("sp_el0", "x5"), "msr sp_el0, x5"),
    (lambda a: a.msr("icc_pmr_el1", "x6"), "msr icc_pmr_el1, x6"),
    (lambda a: a.msr("icc_igrpen1_el1", "x6"), "msr icc_igrpen1_el1, x6"),
    (lambda a: a.msr("icc_sre_el1", "x6"), "msr icc_sre_el1, x6"),
    (lambda a: a.msr("icc_eoir1_el1", "x6"), "msr icc_eoir1_el1, x6"),
    (lambda a: a.msr("icc_sgi1r_el1", "x6"), "msr icc_sgi1r_el1, x6"),
    (lambda a: a.msr("cntv_ctl_el0", "x7"), "msr cntv_ctl_el0, x7"),
    (lambda a: a.msr("cntv_tval_el0", "x7"), "msr cntv_tval_el0, x7"),
    (lambda a: a.msr("cntv_cval_el0", "x7"), "msr cntv_cval_el0, x7"),
    (lambda a: a.msr("sctlr_el1", "x8"), "msr sctlr_el1, x8"),
    (lambda a: a.msr("daifclr", 4), "msr daifclr, #4"),
    (lambda a: a.msr("daifset", 4), "msr daifset, #4"),
    (lambda a: a.msr("daifset", 0xF), "msr daifset, #0xf"),
    (lambda a: a.msr("daifclr", 2), "msr daifclr, #2"),
    (lambda a: a.msr("spsel", 1), "msr spsel, #1"),
    (lambda a: a.isb(), "isb"),
    (lambda a: a.tlbi_vmalle1(), "tlbi vmalle1"),
    (lambda a: a.ic_iallu(), "ic iallu"),
    (lambda a: a.mrs("x1", "mair_el1"), "mrs x1, mair_el1"),
    (lambda a: a.msr("mair_el1", "x1"), "msr mair_el1, x1"),
    (lambda a: a.msr("tcr_el1", "x2"), "msr tcr_el1, x2"),
    (lambda a: a.msr("ttbr0_el1", "x3"), "msr ttbr0_el1, x3"),
    (lambda a: a.mrs("x3", "ttbr0_el1"), "mrs x3, ttbr0_el1"),
    (lambda a: a.dsb(), "dsb sy"),
    (lambda a: a.dsb("ish"), "dsb ish"),
    (lambda a: a.dsb("st"), "dsb st"),
    (lambda a: a.dmb("ish"), "dmb ish"),
    (lambda a: a.dmb("ishld"), "dmb ishld"),
    (lambda a: a.wfi(), "wfi"),
    (lambda a: a.wfe(), "wfe"),
    (lambda a: a.sev(), "sev"),
    (lambda a: a.sevl(), "sevl"),
    (lambda a: a.yield_(), "yield"),
    (lambda a: a.esb(), "esb"),
    (lambda a: a.eret(), "eret"),
    (lambda a: a.hvc(0), "hvc #0"),
    (lambda a: a.hvc(0x1234), "hvc #0x1234"),
    (lambda a: a.svc(0), "svc #0"),
    (lambda a: a.smc(0), "smc #0"),
    (lambda a: a.brk(0x3E8), "brk #0x3e8"),
    (lambda a: a.nop(), "nop"),
    (lambda a: a.br("x3"), "br x3"),
    (lambda a: a.blr("x16"), "blr x16"),
    (lambda a: a.ret(), "ret"),
    (lambda a: a.ret("x5"), "ret x5"),
]


_CONDS = ("eq", "ne", "hs", "lo", "mi", "pl", "vs", "vc", "hi", "ls", "ge", "lt", "gt", "le")


def _program(a: Asm) -> str:
    """A program with backward and forward branches, literals and data; returns the GNU source."""
    a.label("start")
    a.adr("x0", "data")
    a.adr("x1", "start")
    a.ldr_literal("x2", "lit")
    a.ldr_literal("w3", "lit")
    a.ldr_const("x4", 0xDEAD_BEEF_0BAD_F00D)
    a.ldr_const("x5", 0xDEAD_BEEF_0BAD_F00D)  # shares the pool slot
    a.b("fwd")
    a.label("back")
    a.cbz("x0", "start")
    a.cbnz("w1", "back")
    a.tbz("x2", 3, "fwd")
    a.tbnz("x2", 40, "back")
    a.tbnz("w2", 31, "back")
    for cond in _CONDS:
        a.b_cond(cond, "fwd")
    a.b_cond("al", "back")
    a.bl("func")
    a.label("fwd")
    a.b("back")
    a.label("func")
    a.ret()
    a.align(16)
    a.label("lit")
    a.quad(0x1122_3344_5566_7788)
    a.label("data")
    a.quad("func")
    a.literal_pool()
    return "\n".join(
        [
            "start:",
            "adr x0, data",
            "adr x1, start",
            "ldr x2, lit",
            "ldr w3, lit",
            "ldr x4, pool",
            "ldr x5, pool",
            "b fwd",
            "back:",
            "cbz x0, start",
            "cbnz w1, back",
            "tbz x2, #3, fwd",
            "tbnz x2, #40, back",
            "tbnz w2, #31, back",
            *[f"b.{c} fwd" for c in _CONDS],
            "b.al back",
            "bl func",
            "fwd:",
            "b back",
            "func:",
            "ret",
            ".p2align 4",
            "lit:",
            ".quad 0x1122334455667788",
            "data:",
            # the image is linked at BASE: the absolute address of func
            f".quad {BASE:#x} + (func - start)",
            "pool:",
            ".quad 0xdeadbeef0badf00d",
        ]
    )


BASE = 0x40080000


def _gnu_assemble(source: str) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "t.s")
        obj = os.path.join(tmp, "t.o")
        binf = os.path.join(tmp, "t.bin")
        with open(src, "w") as f:
            f.write(".text\n" + source + "\n")
        proc = subprocess.run(
            ["aarch64-linux-gnu-as", "-march=armv8.2-a+ras", "-o", obj, src],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
        subprocess.run(
            ["aarch64-linux-gnu-objcopy", "-O", "binary", "-j", ".text", obj, binf],
            check=True,
            capture_output=True,
        )
        with open(binf, "rb") as f:
            return f.read()


def _words(raw: bytes) -> List[int]:
    return list(struct.unpack(f"<{len(raw) // 4}I", raw))


@pytest.fixture(scope="module")
def gnu_words() -> List[List[int]]:
    """The GNU encoding of every case, assembled in one run, split back per case."""
    need_tool("aarch64-linux-gnu-as", "binutils-aarch64-linux-gnu")
    # a marker word between cases (udf #0xabcd) keeps the split unambiguous
    sep = "\n.inst 0x0000abcd\n"
    raw = _words(_gnu_assemble(sep.join(text for _, text in CASES)))
    groups: List[List[int]] = [[]]
    for w in raw:
        if w == 0x0000ABCD:
            groups.append([])
        else:
            groups[-1].append(w)
    assert len(groups) == len(CASES)
    return groups


@pytest.mark.cross
@pytest.mark.parametrize("index", range(len(CASES)), ids=[t.split("\n")[0] for _, t in CASES])
def test_encoding_matches_gnu_as(index: int, gnu_words: List[List[int]]) -> None:
    emit, text = CASES[index]
    a = Asm()
    emit(a)
    ours = _words(a.assemble())
    assert [f"{w:08x}" for w in ours] == [f"{w:08x}" for w in gnu_words[index]], text


@pytest.mark.cross
def test_program_with_labels_matches_gnu_as() -> None:
    a = Asm(base=BASE)
    source = _program(a)
    ours = a.assemble()
    gnu = _gnu_assemble(source)
    assert len(ours) == len(gnu)
    diff = [
        (i * 4, f"{x:08x}", f"{y:08x}")
        for i, (x, y) in enumerate(zip(_words(ours), _words(gnu)))
        if x != y
    ]
    assert diff == []
    assert a.address("func") == BASE + gnu.index(struct.pack("<I", 0xD65F03C0))


@pytest.mark.cross
def test_logical_immediates_match_gnu_as() -> None:
    rng = random.Random(1234)
    values: List[Tuple[int, int]] = []
    for width in (32, 64):
        size = 2
        while size <= width:
            for _ in range(12):
                ones = rng.randrange(1, size)
                rot = rng.randrange(size)
                run = (1 << ones) - 1
                elem = ((run >> rot) | (run << (size - rot))) & ((1 << size) - 1)
                value = 0
                for i in range(width // size):
                    value |= elem << (i * size)
                values.append((width, value))
            size *= 2
    a = Asm()
    lines = []
    for width, value in values:
        reg = "x" if width == 64 else "w"
        a.orr(f"{reg}1", f"{reg}2", value)
        lines.append(f"orr {reg}1, {reg}2, #{value:#x}")
    assert _words(a.assemble()) == _words(_gnu_assemble("\n".join(lines)))


@pytest.mark.parametrize(
    "value,width",
    [(0, 64), ((1 << 64) - 1, 64), (0x1234, 64), (0xFFFFFFFF, 32), (5, 32), (0xBE000000, 64)],
)
def test_unencodable_logical_immediates_are_refused(value: int, width: int) -> None:
    with pytest.raises(AsmError):
        encode_logical_imm(value, width)


@pytest.mark.parametrize(
    "emit",
    [
        lambda a: a.add("x0", "x1", 0x1000),  # immediate too wide
        lambda a: a.add("x0", "w1", 1),  # mixed widths
        lambda a: a.add("xzr", "x1", 1),  # Rd 31 is sp here
        lambda a: a.add("x0", "xzr", 1),  # Rn 31 is sp here
        lambda a: a.add("x0", "sp", "x1"),  # shifted-register form has no sp
        lambda a: a.orr("xzr", "x1", 1),  # Rd 31 is sp for orr immediate
        lambda a: a.ldr("x0", "xzr"),  # no zero-register base
        lambda a: a.ldr("x0", "x1", 40000),
        lambda a: a.ldr("x1", "x1", 8, "post"),
        lambda a: a.ldp("x0", "x1", "x0", 16, "pre"),
        lambda a: a.ldp("x0", "x0", "sp"),
        lambda a: a.stp("x0", "x1", "sp", 4),
        lambda a: a.movz("x0", 0x10000),
        lambda a: a.movz("w0", 1, 32),
        lambda a: a.mrs("x0", "no_such_reg"),
        lambda a: a.msr("daifclr", 16),
        lambda a: a.b_cond("xx", 0),
        lambda a: a.strb("x0", "x1"),
        lambda a: a.lsl("x0", "x1", 64),
        lambda a: a.b(0x1000_0000),  # beyond +-128 MiB from 0
        lambda a: a.b(2),  # not a multiple of 4
        lambda a: parse_label_twice(a),
    ],
)
def test_bad_operands_are_refused(emit: Callable[[Asm], None]) -> None:
    with pytest.raises(AsmError):
        emit(Asm())


def parse_label_twice(a: Asm) -> None:
    a.label("x")
    a.label("x")


def test_undefined_label_is_reported_at_assembly() -> None:
    a = Asm()
    a.b("nowhere")
    with pytest.raises(AsmError, match="nowhere"):
        a.assemble()


def test_branch_out_of_range_is_reported_at_assembly() -> None:
    a = Asm()
    a.cbz("x0", "far")
    a.skip_to(1 << 20)
    a.label("far")
    with pytest.raises(AsmError, match="out of range"):
        a.assemble()


def test_absolute_targets_are_pc_relative() -> None:
    a = Asm(base=0x1000)
    a.nop()
    a.b(0x1000)  # back one instruction
    a.bl(0x2000)
    assert _words(a.assemble()) == [0xD503201F, 0x17FFFFFF, 0x94000000 | (0x1000 - 8) // 4]
