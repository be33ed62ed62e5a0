"""The resume frames' layouts (serrinj.remote.sigframe) against the real headers.

The kernel's ``struct rt_sigframe`` is not exported, but its parts are: the
ucontext (glibc's ``ucontext_t`` has the kernel's layout up to and including
``uc_mcontext`` and, on x86_64, the kernel's ``uc_sigmask`` right after it),
``struct sigcontext`` and ``struct _fpx_sw_bytes`` (x86) or ``struct
fpsimd_context`` (arm64) from asm/sigcontext.h. Each offset serrinj writes is
checked with a ``_Static_assert`` compiled by gcc (x86_64) and by the arm64
cross compiler, so compiling is the check; a wrong offset is shown to fail.
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
