"""Signal frames that let a borrowed thread put itself back if serrinj dies.

Before the engine changes a register it writes, into the scratch memory below
the thread's stack pointer, the arch's ``struct rt_sigframe`` holding the
exact context the thread must resume with (CRIU's parasite does the same,
``compel/plugins/std/infect.c``). The borrowed registers run the ioctl through
a ``syscall; ret`` sequence already in the VMM, with the return address on the
stack pointing at an ``rt_sigreturn`` sequence already in the VMM (libc's
``__restore_rt``). If serrinj is killed, the kernel detaches the thread, which
finishes (or never starts) the ioctl and then restores itself with
``rt_sigreturn``. While serrinj lives the frame is never used: the engine
stops the thread at the syscall exit and restores everything itself.

Pure: builds bytes from values; no I/O.

x86_64 layout (arch/x86/kernel/signal_64.c, arch/x86/include/uapi/asm/sigcontext.h,
include/uapi/asm-generic/ucontext.h)::

    struct rt_sigframe { char *pretcode; struct ucontext uc; struct siginfo info; }
    struct ucontext    { u64 uc_flags; u64 uc_link; stack_t uc_stack;
                         struct sigcontext uc_mcontext; sigset_t uc_sigmask; }

``rt_sigreturn`` finds the frame at ``sp - 8`` (the ``ret`` popped
``pretcode``), sets the blocked mask from ``uc_sigmask``, restores the
general registers (``orig_rax`` becomes -1, ``restart_block`` is reset so a
pending ``restart_syscall`` would return -EINTR), restores the FP state with
XRSTOR from ``uc_mcontext.fpstate`` after checking ``sw_reserved``
(``FP_XSTATE_MAGIC1``, ``xstate_size`` no larger than the task's user size
and ``extended_size``, ``FP_XSTATE_MAGIC2`` right after the XSAVE area; a
failed check silently restores the legacy FXSAVE part only, so the builder
always writes them), and ``restore_altstack`` ignores every error but EFAULT,
so ``ss_flags`` = ``SS_ONSTACK | SS_DISABLE`` (EINVAL) leaves the thread's
sigaltstack as it is.
"""

from __future__ import annotations

import struct
from types import MappingProxyType
from typing import Mapping, NamedTuple

from serrinj.remote.arch import Registers, to_signed

_U64 = (1 << 64) - 1

# ---------------------------------------------------------------- x86_64 facts
FP_XSTATE_MAGIC1 = 0x46505853
FP_XSTATE_MAGIC2 = 0x46505845
FP_XSTATE_MAGIC2_SIZE = 4
UC_FP_XSTATE = 0x1
UC_SIGCONTEXT_SS = 0x2
UC_STRICT_RESTORE_SS = 0x4
#: ``ss_flags`` that ``do_sigaltstack`` rejects with EINVAL (not a mode)
SS_INVALID = 0x3
#: offset of ``sw_reserved`` (struct _fpx_sw_bytes) in the FXSAVE legacy area;
#: the ptrace regset (NT_X86_XSTATE) keeps XCR0 in its first 8 bytes
SW_RESERVED = 464
XSAVE_HEADER = 512
XSAVE_ALIGN = 64
#: AMX tile state is a dynamic feature: its size depends on a per-process
#: permission serrinj cannot read from outside, so a frame could mis-size it
XFEATURE_MASK_XTILE = (1 << 17) | (1 << 18)

X86_SIGCONTEXT_REGS = (
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
    "rdi", "rsi", "rbp", "rbx", "rdx", "rax", "rcx", "rsp", "rip", "eflags",
)  # fmt: skip
X86_SIGCONTEXT_SIZE = 256
X86_UCONTEXT_SIZE = 8 + 8 + 24 + X86_SIGCONTEXT_SIZE + 8
X86_SIGINFO_SIZE = 128
X86_RT_SIGFRAME_SIZE = 8 + X86_UCONTEXT_SIZE + X86_SIGINFO_SIZE  # 440
#: offsets inside struct rt_sigframe
X86_OFF_UC_FLAGS = 8
X86_OFF_UC_STACK = 24
X86_OFF_MCONTEXT = 48
X86_OFF_FPSTATE = X86_OFF_MCONTEXT + 18 * 8 + 8 + 4 * 8  # 232
X86_OFF_SIGMASK = X86_OFF_MCONTEXT + X86_SIGCONTEXT_SIZE  # 304

ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK = 512, 513, 514, 516
EINTR = 4
ENOSYS = 38


def x86_resume_registers(saved: Registers, syscall_entry: bool = False) -> Registers:
    """The registers the thread must resume with, as the kernel would leave them.

    At a stop inside an interrupted syscall the kernel rewinds it only after
    the stop, in its signal path (arch_do_signal_or_restart, no handler):
    -ERESTARTSYS/-ERESTARTNOINTR/-ERESTARTNOHAND become ``rax = orig_rax``,
    ``rip -= 2`` (the syscall runs again). -ERESTART_RESTARTBLOCK would run
    ``restart_syscall``, but ``rt_sigreturn`` resets the thread's
    ``restart_block`` (do_no_restart_syscall), so it is -EINTR here: an
    interrupted ``nanosleep`` returns EINTR with the time left, which the
    caller sees as a signal would show it. At a syscall-entry stop the syscall
    has not run yet: the frame runs it again from its instruction.
    """
    nr = to_signed(saved["orig_rax"])
    if nr < 0:
        return saved
    ret = to_signed(saved["rax"])
    if syscall_entry or -ret in (ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND):
        return saved.replace(rax=saved["orig_rax"], rip=saved["rip"] - 2)
    if -ret == ERESTART_RESTARTBLOCK:
        return saved.replace(rax=-EINTR)
    return saved


class Frame(NamedTuple):
    """A frame to write at ``base``: the borrowed stack pointer is ``sp``."""

    base: int
    sp: int
    data: bytes

    @property
    def end(self) -> int:
        return self.base + len(self.data)


def x86_xstate_problem(xstate: bytes) -> str:
    """Why an NT_X86_XSTATE image cannot go into a frame ('' when it can)."""
    if len(xstate) < XSAVE_HEADER + 64:
        return f"the XSAVE area read is {len(xstate)} bytes"
    (xcr0,) = struct.unpack_from("<Q", xstate, SW_RESERVED)
    if xcr0 & XFEATURE_MASK_XTILE:
        return "the thread's FP state has AMX tiles (a dynamic XSAVE feature)"
    (xcomp_bv,) = struct.unpack_from("<Q", xstate, XSAVE_HEADER + 8)
    if xcomp_bv:
        return "the XSAVE area read is in the compacted format"
    return ""


def x86_frame_size(xstate_len: int) -> int:
    """The most room a frame takes, alignment included."""
    return X86_RT_SIGFRAME_SIZE + XSAVE_ALIGN + xstate_len + FP_XSTATE_MAGIC2_SIZE + 16


def x86_frame(top: int, resume: Registers, xstate: bytes, sigmask: int, restorer: int) -> Frame:
    """An x86_64 ``rt_sigframe`` ending at or below ``top``, XSAVE area included.

    ``resume``: the registers to resume with (see :func:`x86_resume_registers`);
    ``xstate``: the thread's NT_X86_XSTATE regset (standard format);
    ``sigmask``: its blocked signals (PTRACE_GETSIGMASK); ``restorer``: the
    address of an ``rt_sigreturn`` sequence in the process (``pretcode``).
    """
    fp_len = len(xstate) + FP_XSTATE_MAGIC2_SIZE
    fp = (top - fp_len) & ~(XSAVE_ALIGN - 1)
    base = (fp - X86_RT_SIGFRAME_SIZE) & ~15
    (xcr0,) = _XCR0.unpack_from(xstate, SW_RESERVED)
    # One buffer, filled in place: this runs while the vCPU thread is held.
    # Zero where nothing is written: uc_link, siginfo, the padding before the
    # XSAVE area, gs/fs, err, trapno, cr2 and the sigcontext's reserved words.
    data = bytearray(fp - base + fp_len)
    off = fp - base
    data[off : off + len(xstate)] = xstate
    # struct _fpx_sw_bytes: magic1, extended_size, xfeatures, xstate_size, padding[7]
    _SW_BYTES.pack_into(data, off + SW_RESERVED, FP_XSTATE_MAGIC1, fp_len, xcr0, len(xstate))
    _U32.pack_into(data, off + len(xstate), FP_XSTATE_MAGIC2)
    uc_flags = UC_FP_XSTATE | UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS
    _PRETCODE_UC_HEAD.pack_into(data, 0, restorer, uc_flags, 0, 0, SS_INVALID, 0)
    _MCONTEXT.pack_into(
        data,
        X86_OFF_MCONTEXT,
        *[resume[name] for name in X86_SIGCONTEXT_REGS],
        resume["cs"] & 0xFFFF,
        0,  # gs, fs: not restored by rt_sigreturn
        0,
        resume["ss"] & 0xFFFF,
        0,  # err
        0,  # trapno
        sigmask & _U64,  # oldmask
        0,  # cr2
        fp,  # fpstate
    )
    _U64S.pack_into(data, X86_OFF_SIGMASK, sigmask & _U64)
    return Frame(base=base, sp=base, data=bytes(data))


_XCR0 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_U64S = struct.Struct("<Q")
_SW_BYTES = struct.Struct("<IIQI28x")
#: pretcode, then ucontext's uc_flags, uc_link and uc_stack {ss_sp, ss_flags, ss_size}
_PRETCODE_UC_HEAD = struct.Struct("<QQQQi4xQ")
_MCONTEXT = struct.Struct("<18QHHHH5Q64x")
assert _MCONTEXT.size == X86_SIGCONTEXT_SIZE
assert _PRETCODE_UC_HEAD.size == X86_OFF_MCONTEXT


# ---------------------------------------------------------------- aarch64 facts
# arch/arm64/kernel/signal.c, arch/arm64/include/uapi/asm/{sigcontext,ucontext}.h:
#
#   struct rt_sigframe { struct siginfo info; struct ucontext uc; }
#   struct ucontext    { u64 uc_flags; u64 uc_link; stack_t uc_stack;
#                        sigset_t uc_sigmask; u8 __unused[120];
#                        struct sigcontext uc_mcontext; }   (16-aligned)
#   struct sigcontext  { u64 fault_address; u64 regs[31]; u64 sp, pc, pstate;
#                        u8 __reserved[4096] (16-aligned); }
#
# rt_sigreturn takes the frame at sp (which must be 16-aligned), sets the
# blocked mask, restores x0-x30, sp, pc and pstate (checked by
# valid_user_regs), forgets the syscall, requires an fpsimd_context record in
# __reserved (magic 0x46508001, size 528) ended by a null record, resets
# restart_block, and ignores uc_stack errors but EFAULT.
#
# SVE (Documentation/arch/arm64/sve.rst, "Signal handling"): a thread whose SVE
# state is live (TIF_SVE) gets an sve_context record after fpsimd_context:
#
#   struct sve_context { struct _aarch64_ctx head; u16 vl; u16 flags; u16 __reserved[2]; }
#
# followed, from SVE_SIG_REGS_OFFSET (16), by Z0-Z31 (vq * 16 bytes each),
# P0-P15 and FFR (vq * 2 bytes each), vq = vl / 16; head.size is
# SVE_SIG_CONTEXT_SIZE(vq) rounded up to 16. restore_sve_fpsimd_context
# requires vl to equal the thread's current vector length, copies the Z/P/FFR
# block into the thread's SVE state and sets TIF_SVE, then loads the V
# registers, FPSR and FPCR from fpsimd_context (the V registers become bits
# 127:0 of Z0-Z31: the two records must agree, as they do when read at one
# stop). NT_ARM_SVE (struct user_sve_header, then at SVE_PT_REGS_OFFSET = 16
# the same Z/P/FFR block, then FPSR/FPCR) gives that block as it is.
#
# The kernel lays records out in __reserved keeping room for an extra_context
# record (32 bytes) and a terminator (16): a record that does not fit in what
# is left makes it write, at that point, an extra_context whose datap is the
# address right after it and its own null terminator, and the record (and the
# list's final null record) continue from there past the end of __reserved;
# extra_context.size covers them. parse_user_sigframe checks exactly that
# (datap 16-aligned and equal to the address after the terminator, size a
# multiple of 16 and below SIGFRAME_MAXSZ).
A64_SIGINFO_SIZE = 128
A64_OFF_UC = A64_SIGINFO_SIZE
A64_OFF_UC_STACK = A64_OFF_UC + 16
A64_OFF_SIGMASK = A64_OFF_UC + 40
A64_OFF_MCONTEXT = A64_OFF_UC + 176
A64_OFF_RESERVED = A64_OFF_MCONTEXT + 288
A64_RESERVED_SIZE = 4096
A64_RT_SIGFRAME_SIZE = A64_OFF_RESERVED + A64_RESERVED_SIZE  # 4688
FPSIMD_MAGIC = 0x46508001
FPSIMD_CONTEXT_SIZE = 528
#: NT_PRFPREG on aarch64: struct user_fpsimd_state {vregs[32], fpsr, fpcr, reserved[2]}
A64_USER_FPSIMD_SIZE = 528
SVE_MAGIC = 0x53564501
EXTRA_MAGIC = 0x45585401
#: sve_context.flags: the record holds streaming-mode (SME) state
SVE_SIG_FLAG_SM = 0x1
SVE_VQ_BYTES = 16
#: sizeof(struct sve_context), rounded to SVE_VQ_BYTES: where the registers start
SVE_SIG_REGS_OFFSET = 16
#: struct extra_context and a null record, each rounded up to 16 bytes
EXTRA_CONTEXT_SIZE = 32
TERMINATOR_SIZE = 16
#: the smallest SIGFRAME_MAXSZ of the kernels that have extra_context (64 KiB)
SIGFRAME_MAXSZ = 65536
#: struct user_sve_header (NT_ARM_SVE, NT_ARM_SSVE) and the offset of the registers after it
SVE_PT_HEADER_SIZE = 16
SVE_PT_REGS_OFFSET = 16
#: the architecture's largest vector: 2048 bits
SVE_VL_MAX_ARCH = 256


def _round16(n: int) -> int:
    return (n + 15) & ~15


def sve_regs_size(vq: int) -> int:
    """SVE_SIG_REGS_SIZE(vq): Z0-Z31, P0-P15 and FFR."""
    return 32 * vq * SVE_VQ_BYTES + 17 * vq * (SVE_VQ_BYTES // 8)


def sve_context_size(vq: int) -> int:
    """SVE_SIG_CONTEXT_SIZE(vq)."""
    return SVE_SIG_REGS_OFFSET + sve_regs_size(vq)


class SveHeader(NamedTuple):
    """struct user_sve_header, the first 16 bytes of NT_ARM_SVE / NT_ARM_SSVE."""

    size: int
    max_size: int
    vl: int
    max_vl: int
    flags: int

    @classmethod
    def unpack(cls, raw: bytes) -> SveHeader:
        return cls(*struct.unpack_from("<IIHHH", raw, 0))

    @property
    def live(self) -> bool:
        """The regset holds SVE register data (SVE_PT_REGS_SVE), not the FPSIMD view."""
        return bool(self.flags & SVE_PT_REGS_SVE)


def a64_sve_problem(sve: bytes) -> str:
    """Why an NT_ARM_SVE image with live SVE state cannot go into a frame ('' when it can)."""
    if len(sve) < SVE_PT_HEADER_SIZE:
        return f"the SVE state read is {len(sve)} bytes"
    head = SveHeader.unpack(sve)
    if not head.live:
        return "the SVE state read is the FPSIMD view"
    if head.vl % SVE_VQ_BYTES or not SVE_VQ_BYTES <= head.vl <= SVE_VL_MAX_ARCH:
        return f"the thread's SVE vector length {head.vl} is not one the architecture has"
    need = SVE_PT_REGS_OFFSET + sve_regs_size(head.vl // SVE_VQ_BYTES)
    if len(sve) < need:
        return f"the SVE state read is {len(sve)} bytes, not the {need} its vector length takes"
    return ""


def a64_sve_record(sve: bytes) -> bytes:
    """The ``sve_context`` record (padded to 16 bytes) for an NT_ARM_SVE image
    with live SVE state: the header, then the Z/P/FFR block as the regset has it."""
    head = SveHeader.unpack(sve)
    vq = head.vl // SVE_VQ_BYTES
    size = _round16(sve_context_size(vq))
    regs = sve[SVE_PT_REGS_OFFSET : SVE_PT_REGS_OFFSET + sve_regs_size(vq)]
    record = struct.pack("<IIHH4x", SVE_MAGIC, size, head.vl, 0) + regs
    return record + bytes(size - len(record))


def a64_frame(top: int, resume: Registers, fpsimd: bytes, sigmask: int, sve: bytes = b"") -> Frame:
    """An aarch64 ``rt_sigframe`` ending at or below ``top`` (16-aligned, at sp).

    ``fpsimd``: the thread's NT_PRFPREG regset; ``sigmask``: PTRACE_GETSIGMASK;
    ``sve``: its NT_ARM_SVE regset when that holds live SVE state (then an
    ``sve_context`` record follows ``fpsimd_context``, in ``__reserved`` when
    it fits and behind an ``extra_context`` record otherwise, as the kernel
    lays it out), ``b""`` for none. On aarch64 the kernel has already rewound
    an interrupted syscall when the thread stops, so ``resume`` is the saved
    state as it is.
    """
    if len(fpsimd) < A64_USER_FPSIMD_SIZE - 8:
        raise ValueError(f"NT_PRFPREG gave {len(fpsimd)} bytes")
    vregs = fpsimd[:512]
    fpsr, fpcr = struct.unpack_from("<II", fpsimd, 512)
    records = struct.pack("<IIII512s", FPSIMD_MAGIC, FPSIMD_CONTEXT_SIZE, fpsr, fpcr, vregs)
    sve_record = b""
    if sve:
        problem = a64_sve_problem(sve)
        if problem:
            raise ValueError(problem)
        sve_record = a64_sve_record(sve)
    room = A64_RESERVED_SIZE - EXTRA_CONTEXT_SIZE - TERMINATOR_SIZE - len(records)
    extra_at = 0  # offset of the extra_context record in the frame, if any
    if len(sve_record) <= room:
        records += sve_record + bytes(TERMINATOR_SIZE)
    else:
        extra_at = A64_OFF_RESERVED + len(records)
        records += bytes(EXTRA_CONTEXT_SIZE + TERMINATOR_SIZE) + sve_record
        records += bytes(TERMINATOR_SIZE)
    size = _round16(max(A64_OFF_RESERVED + len(records), A64_RT_SIGFRAME_SIZE))
    base = (top - size) & ~15
    frame = bytearray(size)
    struct.pack_into("<Qi4xQ", frame, A64_OFF_UC_STACK, 0, SS_INVALID, 0)
    struct.pack_into("<Q", frame, A64_OFF_SIGMASK, sigmask & _U64)
    regs = [resume[f"x{i}"] for i in range(31)]
    struct.pack_into(
        "<Q31QQQQ", frame, A64_OFF_MCONTEXT, 0, *regs, resume["sp"], resume["pc"], resume["pstate"]
    )
    frame[A64_OFF_RESERVED : A64_OFF_RESERVED + len(records)] = records
    if extra_at:
        data = extra_at + EXTRA_CONTEXT_SIZE + TERMINATOR_SIZE
        struct.pack_into(
            "<IIQI12x", frame, extra_at, EXTRA_MAGIC, EXTRA_CONTEXT_SIZE, base + data, size - data
        )
    # the null records (after the last record, and after extra_context) are zero already
    return Frame(base=base, sp=base, data=bytes(frame))


# ---------------------------------------------------------------- per arch
NT_PRFPREG = 2
NT_ARM_SVE = 0x405
NT_ARM_SSVE = 0x40B
NT_ARM_ZA = 0x40C
NT_ARM_GCS = 0x410
#: user_sve_header.flags: the thread has live SVE state (more than FPSIMD); in
#: NT_ARM_SSVE: the thread is in streaming mode
SVE_PT_REGS_SVE = 1
#: user_za_header.size when ZA is off: the header alone (ZA_PT_ZA_OFFSET)
ZA_PT_ZA_OFFSET = 16
#: the most NT_ARM_SVE can hold (SVE_PT_SIZE at the architecture's largest vector)
SVE_PT_MAX_SIZE = _round16(SVE_PT_REGS_OFFSET + sve_regs_size(SVE_VL_MAX_ARCH // 16)) + 16
#: user_gcs.features_enabled: PR_SHADOW_STACK_ENABLE
PR_SHADOW_STACK_ENABLE = 1


class Frames:
    """How one arch builds its resume frame and borrows registers around it."""

    #: the regset that holds the FP/SIMD state the frame carries
    fp_note: int = 0
    #: how many bytes of it to ask for
    fp_size: int = 0

    def fp_problem(self, fp: bytes) -> str:
        """Why this FP/SIMD state cannot go into a frame ('' when it can)."""
        raise NotImplementedError

    def build(
        self, top: int, saved: Registers, syscall_entry: bool, fp: bytes, sigmask: int,
        restorer: int, extra: bytes = b"",
    ) -> Frame:  # fmt: skip
        """``extra``: more state the frame must carry (aarch64: a live NT_ARM_SVE image)."""
        raise NotImplementedError

    def borrow(self, regs: Registers, frame: Frame, restorer: int) -> Registers:
        """``regs`` (set up for a syscall at a ``syscall; ret`` gadget) returning
        into ``restorer`` with the frame at the stack pointer."""
        raise NotImplementedError


class X86Frames(Frames):
    fp_note = 0x202  # NT_X86_XSTATE
    fp_size = 8192

    def fp_problem(self, fp: bytes) -> str:
        return x86_xstate_problem(fp)

    def build(
        self, top: int, saved: Registers, syscall_entry: bool, fp: bytes, sigmask: int,
        restorer: int, extra: bytes = b"",
    ) -> Frame:  # fmt: skip
        return x86_frame(top, x86_resume_registers(saved, syscall_entry), fp, sigmask, restorer)

    def borrow(self, regs: Registers, frame: Frame, restorer: int) -> Registers:
        # `ret` pops pretcode (the restorer); rt_sigreturn finds the frame at sp - 8
        return regs.replace(rsp=frame.sp)


class A64Frames(Frames):
    fp_note = NT_PRFPREG
    fp_size = A64_USER_FPSIMD_SIZE

    def fp_problem(self, fp: bytes) -> str:
        if len(fp) < 520:
            return f"the FP/SIMD state read is {len(fp)} bytes"
        return ""

    def build(
        self, top: int, saved: Registers, syscall_entry: bool, fp: bytes, sigmask: int,
        restorer: int, extra: bytes = b"",
    ) -> Frame:  # fmt: skip
        if syscall_entry:  # the syscall has not run: the frame runs it again
            saved = saved.replace(pc=saved["pc"] - 4)
        return a64_frame(top, saved, fp, sigmask, extra)

    def borrow(self, regs: Registers, frame: Frame, restorer: int) -> Registers:
        # the gadget's `ret` goes to x30: the vDSO's __kernel_rt_sigreturn, which
        # finds the frame at sp
        return regs.replace(sp=frame.sp, x30=restorer)


FRAMES: Mapping[str, Frames] = MappingProxyType({"x86_64": X86Frames(), "aarch64": A64Frames()})
