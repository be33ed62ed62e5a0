"""The resume frames' layouts (serrinj.remote.sigframe) against the real headers.

The kernel's ``struct rt_sigframe`` is not exported, but its parts are: the
ucontext (glibc's ``ucontext_t`` has the kernel's layout up to and including
``uc_mcontext`` and, on x86_64, the kernel's ``uc_sigmask`` right after it),
``struct sigcontext`` and ``struct _fpx_sw_bytes`` (x86) or ``struct
fpsimd_context`` (arm64) from asm/sigcontext.h. Each offset serrinj writes is
checked with a ``_Static_assert`` compiled by gcc (x86_64) and by the arm64
cross compiler, so compiling is the check; a wrong offset is shown to fail.
The arm64 SVE records (``sve_context``, ``extra_context``, the ``SVE_SIG_*`` and
``SVE_PT_*`` blocks) are checked the same way for every vector length, and
the frames serrinj builds with them are walked by the rules of the kernel's
``parse_user_sigframe``.
"""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path
from typing import List

import pytest

from serrinj.remote import sigframe as sf
from serrinj.remote.arch import X86_64, Aarch64, Registers
from tests.conftest import need_tool


def _compile(
    cc: str, tmp: Path, asserts: List[str], headers: List[str]
) -> subprocess.CompletedProcess[str]:
    src = tmp / "frame.c"
    src.write_text(
        "".join(f"#include <{h}>\n" for h in ["stddef.h", *headers])
        + "#define UC ucontext_t\n"
        + "\n".join(asserts)
        + "\n"
    )
    return subprocess.run(
        [cc, "-c", "-o", str(tmp / "frame.o"), str(src)], capture_output=True, text=True
    )


def _x86_asserts() -> List[str]:
    uc = 8  # the ucontext follows pretcode in rt_sigframe
    out = [
        f'_Static_assert({uc} + offsetof(ucontext_t, uc_flags) == 8, "uc_flags");',
        f'_Static_assert({uc} + offsetof(ucontext_t, uc_stack) == {sf.X86_OFF_UC_STACK}, "stack");',
        f'_Static_assert({uc} + offsetof(ucontext_t, uc_mcontext) == {sf.X86_OFF_MCONTEXT}, "mc");',
        f'_Static_assert(sizeof(struct sigcontext) == {sf.X86_SIGCONTEXT_SIZE}, "sigcontext");',
        f"_Static_assert({sf.X86_OFF_MCONTEXT} + offsetof(struct sigcontext, fpstate) =="
        f' {sf.X86_OFF_FPSTATE}, "fpstate");',
        f"_Static_assert({sf.X86_OFF_MCONTEXT} + sizeof(struct sigcontext) == {sf.X86_OFF_SIGMASK},"
        ' "sigmask");',
        # the FXSAVE area's last 12 words (in glibc's __glibc_reserved1[24]) are
        # the kernel's sw_reserved (struct _fpstate_64 in asm/sigcontext.h)
        "_Static_assert(offsetof(struct _fpstate, __glibc_reserved1) + 12 * 4"
        f' == {sf.SW_RESERVED}, "sw");',
        '_Static_assert(sizeof(struct _fpstate) == 512, "fxsave");',
        '_Static_assert(offsetof(struct _fpx_sw_bytes, xstate_size) == 16, "xstate_size");',
        '_Static_assert(sizeof(struct _fpx_sw_bytes) == 48, "sw bytes");',
        f'_Static_assert(FP_XSTATE_MAGIC1 == {sf.FP_XSTATE_MAGIC1:#x}, "magic1");',
        f'_Static_assert(FP_XSTATE_MAGIC2 == {sf.FP_XSTATE_MAGIC2:#x}, "magic2");',
        f'_Static_assert(sizeof(siginfo_t) == {sf.X86_SIGINFO_SIZE}, "siginfo");',
    ]
    for i, name in enumerate(sf.X86_SIGCONTEXT_REGS):
        field = {"eflags": "eflags"}.get(name, name)
        out.append(f'_Static_assert(offsetof(struct sigcontext, {field}) == {8 * i}, "{name}");')
    return out


def test_x86_64_frame_layout(tmp_path: Path) -> None:
    if os.uname().machine != "x86_64":
        pytest.skip("x86_64's glibc headers; the arm64 layout is checked with the cross compiler")
    need_tool("gcc", "gcc")
    headers = ["signal.h", "ucontext.h"]  # glibc's bits/sigcontext.h: the kernel's layout
    res = _compile("gcc", tmp_path, _x86_asserts(), headers)
    assert res.returncode == 0, res.stderr
    bad = _compile(
        "gcc", tmp_path, ['_Static_assert(offsetof(struct sigcontext, rip) == 8, "x");'], headers
    )
    assert bad.returncode != 0


@pytest.mark.cross
def test_aarch64_frame_layout(tmp_path: Path) -> None:
    uc = sf.A64_OFF_UC
    asserts = [
        f'_Static_assert(sizeof(siginfo_t) == {sf.A64_SIGINFO_SIZE}, "siginfo");',
        f'_Static_assert({uc} + offsetof(ucontext_t, uc_stack) == {sf.A64_OFF_UC_STACK}, "stack");',
        f'_Static_assert({uc} + offsetof(ucontext_t, uc_sigmask) == {sf.A64_OFF_SIGMASK}, "mask");',
        f'_Static_assert({uc} + offsetof(ucontext_t, uc_mcontext) == {sf.A64_OFF_MCONTEXT}, "mc");',
        f"_Static_assert({sf.A64_OFF_MCONTEXT} + offsetof(struct sigcontext, __reserved) =="
        f' {sf.A64_OFF_RESERVED}, "reserved");',
        '_Static_assert(offsetof(struct sigcontext, regs) == 8, "regs");',
        '_Static_assert(offsetof(struct sigcontext, sp) == 256, "sp");',
        '_Static_assert(offsetof(struct sigcontext, pc) == 264, "pc");',
        '_Static_assert(offsetof(struct sigcontext, pstate) == 272, "pstate");',
        "_Static_assert(sizeof(((struct sigcontext *)0)->__reserved)"
        f' == {sf.A64_RESERVED_SIZE}, "r");',
        f'_Static_assert(sizeof(struct fpsimd_context) == {sf.FPSIMD_CONTEXT_SIZE}, "fpsimd");',
        '_Static_assert(offsetof(struct fpsimd_context, fpsr) == 8, "fpsr");',
        '_Static_assert(offsetof(struct fpsimd_context, vregs) == 16, "vregs");',
        f'_Static_assert(FPSIMD_MAGIC == {sf.FPSIMD_MAGIC:#x}, "magic");',
        f'_Static_assert(sizeof(struct user_fpsimd_state) == {sf.A64_USER_FPSIMD_SIZE}, "user");',
        '_Static_assert(offsetof(struct user_fpsimd_state, fpsr) == 512, "user fpsr");',
    ]
    headers = ["signal.h", "ucontext.h", "asm/sigcontext.h", "asm/ptrace.h"]
    res = _compile("aarch64-linux-gnu-gcc", tmp_path, asserts, headers)
    assert res.returncode == 0, res.stderr
    bad = _compile(
        "aarch64-linux-gnu-gcc", tmp_path, ['_Static_assert(FPSIMD_MAGIC == 1, "x");'], headers
    )
    assert bad.returncode != 0


def test_x86_64_frame_contents() -> None:
    arch = X86_64()
    values = [0x1000 + i for i in range(len(arch.reg_names))]
    regs = Registers(arch, values).replace(orig_rax=271, rax=-514, rip=0x401002, cs=0x33, ss=0x2B)
    xstate = bytearray(2432)
    struct.pack_into("<Q", xstate, sf.SW_RESERVED, 0xE7)
    top = 0x7FFF0000 - 128
    f = sf.x86_frame(top, sf.x86_resume_registers(regs), bytes(xstate), 0x200, 0x7F0000001234)
    assert f.end <= top and f.base % 16 == 0
    (fp,) = struct.unpack_from("<Q", f.data, sf.X86_OFF_FPSTATE)
    assert fp % 64 == 0 and f.base + sf.X86_RT_SIGFRAME_SIZE <= fp
    off = fp - f.base
    magic1, ext, xfeat, size = struct.unpack_from("<IIQI", f.data, off + sf.SW_RESERVED)
    assert (magic1, ext, xfeat, size) == (sf.FP_XSTATE_MAGIC1, 2436, 0xE7, 2432)
    assert struct.unpack_from("<I", f.data, off + 2432) == (sf.FP_XSTATE_MAGIC2,)
    assert struct.unpack_from("<Q", f.data, 0) == (0x7F0000001234,)  # pretcode
    mc = struct.unpack_from("<18Q", f.data, sf.X86_OFF_MCONTEXT)
    got = dict(zip(sf.X86_SIGCONTEXT_REGS, mc))
    # -ERESTARTNOHAND: the syscall runs again
    assert got["rax"] == 271 and got["rip"] == 0x401000 and got["rsp"] == regs["rsp"]
    assert struct.unpack_from("<Q", f.data, sf.X86_OFF_SIGMASK) == (0x200,)
    assert struct.unpack_from("<i", f.data, sf.X86_OFF_UC_STACK + 8) == (sf.SS_INVALID,)
    # -ERESTART_RESTARTBLOCK: -EINTR (rt_sigreturn resets restart_block)
    nano = sf.x86_resume_registers(regs.replace(orig_rax=35, rax=-516))
    assert nano["rax"] == (-4) & (2**64 - 1) and nano["rip"] == regs["rip"]
    # KVM_RUN's -EINTR and user code stay as they are
    assert sf.x86_resume_registers(regs.replace(orig_rax=16, rax=-4)) == regs.replace(
        orig_rax=16, rax=-4
    )
    assert sf.x86_resume_registers(regs.replace(orig_rax=-1)) == regs.replace(orig_rax=-1)


def test_aarch64_frame_contents() -> None:
    arch = Aarch64()
    regs = Registers(arch, [0x10 + i for i in range(len(arch.reg_names))])
    fpsimd = bytes(range(256)) * 2 + struct.pack("<IIQ", 0x11, 0x22, 0)
    f = sf.a64_frame(0x7FFF0000 - 128, regs, fpsimd, 0x4000)
    assert f.base % 16 == 0 and f.end <= 0x7FFF0000 - 128
    assert struct.unpack_from("<Q", f.data, sf.A64_OFF_SIGMASK) == (0x4000,)
    got = struct.unpack_from("<Q31QQQQ", f.data, sf.A64_OFF_MCONTEXT)
    assert list(got[1:]) == [regs[n] for n in arch.reg_names]
    head = struct.unpack_from("<IIII", f.data, sf.A64_OFF_RESERVED)
    assert head == (sf.FPSIMD_MAGIC, sf.FPSIMD_CONTEXT_SIZE, 0x11, 0x22)
    vregs = f.data[sf.A64_OFF_RESERVED + 16 : sf.A64_OFF_RESERVED + 528]
    assert vregs == fpsimd[:512]
    end = sf.A64_OFF_RESERVED + sf.FPSIMD_CONTEXT_SIZE
    assert f.data[end : end + 8] == bytes(8)  # the null record


@pytest.mark.cross
def test_aarch64_sve_records_layout(tmp_path: Path) -> None:
    """sve_context, extra_context, the SVE_SIG_* block and NT_ARM_SVE's, per vector length."""
    asserts = [
        '_Static_assert(sizeof(struct sve_context) == 16, "sve_context");',
        '_Static_assert(offsetof(struct sve_context, vl) == 8, "vl");',
        '_Static_assert(offsetof(struct sve_context, flags) == 10, "flags");',
        f'_Static_assert(SVE_MAGIC == {sf.SVE_MAGIC:#x}, "sve magic");',
        f'_Static_assert(SVE_SIG_FLAG_SM == {sf.SVE_SIG_FLAG_SM}, "sm");',
        f'_Static_assert(EXTRA_MAGIC == {sf.EXTRA_MAGIC:#x}, "extra magic");',
        f'_Static_assert(sizeof(struct extra_context) == {sf.EXTRA_CONTEXT_SIZE}, "extra");',
        '_Static_assert(offsetof(struct extra_context, datap) == 8, "datap");',
        '_Static_assert(offsetof(struct extra_context, size) == 16, "size");',
        f'_Static_assert(sizeof(struct _aarch64_ctx) <= {sf.TERMINATOR_SIZE}, "terminator");',
        f'_Static_assert(SVE_SIG_REGS_OFFSET == {sf.SVE_SIG_REGS_OFFSET}, "regs");',
        f'_Static_assert(SVE_VQ_BYTES == {sf.SVE_VQ_BYTES}, "vq bytes");',
        f'_Static_assert(sizeof(struct user_sve_header) == {sf.SVE_PT_HEADER_SIZE}, "header");',
        '_Static_assert(offsetof(struct user_sve_header, vl) == 8, "hvl");',
        '_Static_assert(offsetof(struct user_sve_header, flags) == 12, "hflags");',
        f'_Static_assert(SVE_PT_REGS_OFFSET == {sf.SVE_PT_REGS_OFFSET}, "pt regs");',
        f'_Static_assert(SVE_PT_REGS_SVE == {sf.SVE_PT_REGS_SVE}, "pt sve");',
        f'_Static_assert(ZA_PT_ZA_OFFSET == {sf.ZA_PT_ZA_OFFSET}, "za");',
        f'_Static_assert(NT_ARM_SVE == {sf.NT_ARM_SVE:#x}, "nt sve");',
        f'_Static_assert(NT_ARM_SSVE == {sf.NT_ARM_SSVE:#x}, "nt ssve");',
        f'_Static_assert(NT_ARM_ZA == {sf.NT_ARM_ZA:#x}, "nt za");',
        f"_Static_assert(SVE_PT_SIZE({sf.SVE_VL_MAX_ARCH // 16}, SVE_PT_REGS_SVE)"
        f' <= {sf.SVE_PT_MAX_SIZE}, "pt max");',
        f'_Static_assert(sve_vl_valid({sf.SVE_VL_MAX_ARCH}), "vl max");',
    ]
    for vq in range(1, 17):
        asserts += [
            f'_Static_assert(SVE_SIG_CONTEXT_SIZE({vq}) == {sf.sve_context_size(vq)}, "ctx{vq}");',
            f'_Static_assert(SVE_SIG_REGS_SIZE({vq}) == {sf.sve_regs_size(vq)}, "regs{vq}");',
            # the regset's Z/P/FFR block is the record's, byte for byte
            f"_Static_assert(SVE_PT_SVE_FFR_OFFSET({vq}) - SVE_PT_REGS_OFFSET =="
            f' SVE_SIG_FFR_OFFSET({vq}) - SVE_SIG_REGS_OFFSET, "ffr{vq}");',
            f"_Static_assert(SVE_PT_SVE_PREGS_OFFSET({vq}) - SVE_PT_REGS_OFFSET =="
            f' SVE_SIG_PREGS_OFFSET({vq}) - SVE_SIG_REGS_OFFSET, "p{vq}");',
            f"_Static_assert(SVE_PT_SVE_FFR_OFFSET({vq}) + SVE_PT_SVE_FFR_SIZE({vq}) =="
            f' SVE_PT_REGS_OFFSET + {sf.sve_regs_size(vq)}, "end{vq}");',
        ]
    headers = ["signal.h", "asm/sigcontext.h", "asm/ptrace.h", "linux/elf.h"]
    res = _compile("aarch64-linux-gnu-gcc", tmp_path, asserts, headers)
    assert res.returncode == 0, res.stderr
    wrong = '_Static_assert(SVE_SIG_CONTEXT_SIZE(4) == 2208, "x");'
    bad = _compile("aarch64-linux-gnu-gcc", tmp_path, [wrong], headers)
    assert bad.returncode != 0  # 2200: the record's size is rounded up, the macro is not


def _sve_regset(vl: int, fill: int = 0) -> bytes:
    vq = vl // 16
    body = bytes((fill + i) % 251 for i in range(sf.sve_regs_size(vq)))
    head = struct.pack("<IIHHHH", 0, 0, vl, 256, sf.SVE_PT_REGS_SVE, 0)
    tail = bytes(-(16 + len(body)) % 16) + struct.pack("<II", 0x11, 0x22)
    return head + body + tail


def _kernel_parse(frame: sf.Frame) -> dict:  # type: ignore[type-arg]
    """The records rt_sigreturn finds, by the rules of parse_user_sigframe."""
    mem, base = frame.data, frame.base
    off, limit, at = 0, sf.A64_RESERVED_SIZE, sf.A64_OFF_RESERVED
    found: dict = {}  # type: ignore[type-arg]
    extra_seen = False
    while True:
        assert limit - off >= 8 and off % 16 == 0
        magic, size = struct.unpack_from("<II", mem, at + off)
        assert limit - off >= size
        if magic == 0:
            assert size == 0
            return found
        if magic == sf.EXTRA_MAGIC:
            assert not extra_seen and size >= 32
            datap, extra_size = struct.unpack_from("<QI", mem, at + off + 8)
            assert limit - off - size >= sf.TERMINATOR_SIZE
            assert mem[at + off + size : at + off + size + 8] == bytes(8)  # the terminator
            after = base + at + off + size + sf.TERMINATOR_SIZE
            assert datap % 16 == 0 and extra_size % 16 == 0 and datap == after
            assert extra_size <= base + sf.SIGFRAME_MAXSZ - after
            assert datap - base + extra_size <= len(mem)
            extra_seen = True
            found["extra"] = (off, extra_size)
            off, limit, at = 0, extra_size, datap - base
            continue
        assert magic not in found and size >= 16 and size % 16 == 0
        found[magic] = (at + off, size)
        off += size


def test_aarch64_sve_frame_in_reserved_and_behind_extra_context() -> None:
    arch = Aarch64()
    regs = Registers(arch, [0x10 + i for i in range(len(arch.reg_names))])
    fpsimd = bytes(range(256)) * 2 + struct.pack("<IIQ", 0x11, 0x22, 0)
    top = 0x7FFF0000 - 128
    plain = _kernel_parse(sf.a64_frame(top, regs, fpsimd, 0))
    assert list(plain) == [sf.FPSIMD_MAGIC]
    for vl, extra in ((16, False), (64, False), (96, False), (128, True), (256, True)):
        sve = _sve_regset(vl, fill=vl)
        f = sf.a64_frame(top, regs, fpsimd, 0x4000, sve)
        assert f.base % 16 == 0 and f.end <= top and len(f.data) % 16 == 0
        recs = _kernel_parse(f)
        assert ("extra" in recs) is extra, vl
        assert recs[sf.FPSIMD_MAGIC] == (sf.A64_OFF_RESERVED, sf.FPSIMD_CONTEXT_SIZE)
        at, size = recs[sf.SVE_MAGIC]
        vq = vl // 16
        # restore_sve_fpsimd_context: vl as the thread's, a size that holds the registers
        assert size == (sf.sve_context_size(vq) + 15) & ~15 >= sf.sve_context_size(vq)
        assert struct.unpack_from("<HH", f.data, at + 8) == (vl, 0)
        block = f.data[at + 16 : at + 16 + sf.sve_regs_size(vq)]
        assert block == sve[16 : 16 + sf.sve_regs_size(vq)]
        if not extra:  # in __reserved, right after fpsimd_context, as the kernel puts it
            assert at == sf.A64_OFF_RESERVED + sf.FPSIMD_CONTEXT_SIZE
            assert len(f.data) == sf.A64_RT_SIGFRAME_SIZE
        else:  # extra_context right after fpsimd_context, its data after its terminator
            assert recs["extra"][0] == sf.FPSIMD_CONTEXT_SIZE
            assert at == sf.A64_OFF_RESERVED + sf.FPSIMD_CONTEXT_SIZE + 32 + 16
            assert recs["extra"][1] == size + sf.TERMINATOR_SIZE
            assert len(f.data) == at + size + sf.TERMINATOR_SIZE
    # an image that is not live SVE state, or cut short, is refused
    with pytest.raises(ValueError):
        sf.a64_frame(top, regs, fpsimd, 0, _sve_regset(64)[:1000])
    fpsimd_view = struct.pack("<IIHHHH", 0, 0, 64, 256, 0, 0) + fpsimd
    assert "FPSIMD view" in sf.a64_sve_problem(fpsimd_view)
    odd_vl = struct.pack("<IIHHHH", 0, 0, 40, 256, sf.SVE_PT_REGS_SVE, 0) + bytes(3000)
    assert "vector length 40" in sf.a64_sve_problem(odd_vl)
