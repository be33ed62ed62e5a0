"""Per-architecture register layout and syscall ABI for the remote engine.

One class per architecture behind one interface (:class:`Arch`); the engine
never branches on the machine name. Register sets are the ``NT_PRSTATUS``
regsets: ``struct user_regs_struct`` on x86_64, ``struct user_pt_regs`` on
aarch64 (``tests/test_remote_abi.py`` checks both against the system headers).
"""

from __future__ import annotations

import functools
import platform
import struct
from types import MappingProxyType
from typing import ClassVar, Dict, Mapping, Optional, Sequence, Tuple

from serrinj.kvm.api import KVM_RUN

_U64 = (1 << 64) - 1


def to_signed(value: int) -> int:
    """A 64-bit register value as a signed integer."""
    value &= _U64
    return value - (1 << 64) if value >> 63 else value


@functools.cache
def _u64s(count: int) -> struct.Struct:
    return struct.Struct(f"<{count}Q")


class Registers:
    """An immutable snapshot of a thread's general-purpose registers."""

    __slots__ = ("_arch", "_values")

    def __init__(self, arch: Arch, values: Sequence[int]) -> None:
        if len(values) != len(arch.reg_names):
            raise ValueError(f"{arch.name} has {len(arch.reg_names)} registers, got {len(values)}")
        self._arch = arch
        self._values = tuple(v & _U64 for v in values)

    @classmethod
    def unpack(cls, arch: Arch, raw: bytes) -> Registers:
        # unsigned 64-bit fields are in range already: no masking (this runs
        # several times while a vCPU thread is held)
        regs = cls.__new__(cls)
        regs._arch = arch
        regs._values = arch.regs_struct.unpack(raw)
        return regs

    def pack(self) -> bytes:
        return self._arch.regs_struct.pack(*self._values)

    def __getitem__(self, name: str) -> int:
        return self._values[self._arch.reg_index[name]]

    def replace(self, **changes: int) -> Registers:
        values = list(self._values)
        for name, value in changes.items():
            values[self._arch.reg_index[name]] = value & _U64
        regs = Registers.__new__(Registers)
        regs._arch = self._arch
        regs._values = tuple(values)
        return regs

    def as_dict(self) -> Dict[str, int]:
        return dict(zip(self._arch.reg_names, self._values))

    def diff(self, other: Registers) -> Dict[str, Tuple[int, int]]:
        """Registers whose values differ: name -> (self, other)."""
        return {
            n: (a, b)
            for n, a, b in zip(self._arch.reg_names, self._values, other._values)
            if a != b
        }

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Registers) and self._values == other._values

    def __hash__(self) -> int:
        return hash(self._values)

    def __repr__(self) -> str:
        inner = " ".join(f"{n}={v:#x}" for n, v in zip(self._arch.reg_names, self._values))
        return f"<{self._arch.name} {inner}>"


class Arch:
    """The interface both architectures implement."""

    name: ClassVar[str]
    reg_names: ClassVar[Tuple[str, ...]]
    reg_index: ClassVar[Mapping[str, int]]
    pc_reg: ClassVar[str]
    sp_reg: ClassVar[str]
    #: the machine code of the syscall instruction, and its alignment
    syscall_insn: ClassVar[bytes]
    insn_align: ClassVar[int]
    #: bytes below the stack pointer the ABI lets leaf code use without moving sp
    red_zone: ClassVar[int]
    #: AUDIT_ARCH_* as seen by seccomp filters in ``seccomp_data.arch``
    audit_arch: ClassVar[int]
    #: syscall numbers the engine and discovery use
    nr: ClassVar[Mapping[str, int]]
    #: machine code that runs a syscall and then returns to the address on the
    #: stack (or in the link register), and machine code that calls
    #: ``rt_sigreturn``: the kill-safe path runs both (serrinj.remote.sigframe);
    #: empty where the arch has no kill-safe path
    syscall_ret_seqs: ClassVar[Tuple[bytes, ...]]
    syscall_ret_name: ClassVar[str]
    sigreturn_seqs: ClassVar[Tuple[bytes, ...]]

    @property
    def regs_size(self) -> int:
        return 8 * len(self.reg_names)

    @property
    def regs_struct(self) -> struct.Struct:
        """The NT_PRSTATUS layout: one unsigned 64-bit field per register."""
        return _u64s(len(self.reg_names))

    def prepare_syscall(
        self, base: Registers, gadget: int, nr: int, args: Sequence[int]
    ) -> Registers:
        """Registers that make the thread execute syscall ``nr`` at ``gadget``."""
        raise NotImplementedError

    def entry_matches(self, regs: Registers, gadget: int, nr: int) -> bool:
        """Whether a syscall-entry stop is the one the engine started."""
        raise NotImplementedError

    def syscall_result(self, regs: Registers) -> int:
        """The signed return value at a syscall-exit stop."""
        raise NotImplementedError

    def entry_call(self, regs: Registers) -> Tuple[int, Tuple[int, ...]]:
        """``(nr, args)`` of the syscall at a syscall-entry stop."""
        raise NotImplementedError

    def same_after_restore(self, before: Registers, after: Registers, syscall_stop: bool) -> bool:
        """Whether ``after`` is ``before`` up to what the kernel itself may change.

        Architectures list those bits and say why; everything else must be
        bit-identical.
        """
        return before == after

    def kvm_run_fd_at_stop(self, regs: Registers) -> Optional[int]:
        """The vCPU fd, when a stop shows the thread just left ``ioctl(fd, KVM_RUN)``.

        Only possible when the fd register survives the syscall's return
        (x86_64 keeps it in rdi); otherwise ``None`` and the caller steps to
        the next KVM_RUN entry instead.
        """
        return None

    def kvm_run_fd_at_entry(self, regs: Registers) -> Optional[int]:
        """The vCPU fd when a syscall-entry stop is ``ioctl(fd, KVM_RUN, ...)``."""
        nr, args = self.entry_call(regs)
        if nr == self.nr["ioctl"] and args[1] & 0xFFFFFFFF == KVM_RUN:
            return args[0] & 0xFFFFFFFF
        return None


class X86_64(Arch):
    """x86_64: ``syscall`` is 0f 05; nr in rax (orig_rax at stops); args rdi rsi rdx r10 r8 r9."""

    name = "x86_64"
    reg_names = (
        "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8",
        "rax", "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags",
        "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs",
    )  # fmt: skip
    reg_index = MappingProxyType({n: i for i, n in enumerate(reg_names)})
    pc_reg = "rip"
    sp_reg = "rsp"
    syscall_insn = b"\x0f\x05"
    insn_align = 1
    red_zone = 128
    audit_arch = 0xC000003E
    nr = MappingProxyType(
        {
            "ioctl": 16,
            "getpid": 39,
            "gettid": 186,
            "nanosleep": 35,
            "restart_syscall": 219,
        }
    )
    _ARGS = ("rdi", "rsi", "rdx", "r10", "r8", "r9")
    #: ``syscall; ret``
    syscall_ret_seqs = (b"\x0f\x05\xc3",)
    syscall_ret_name = "syscall; ret"
    #: ``mov $15, %rax; syscall`` (glibc's and musl's ``__restore_rt``), and the
    #: same with ``mov $15, %eax``
    sigreturn_seqs = (b"\x48\xc7\xc0\x0f\x00\x00\x00\x0f\x05", b"\xb8\x0f\x00\x00\x00\x0f\x05")

    def prepare_syscall(
        self, base: Registers, gadget: int, nr: int, args: Sequence[int]
    ) -> Registers:
        if len(args) > 6:
            raise ValueError("a syscall takes at most 6 arguments")
        changes = dict(zip(self._ARGS, args))
        # orig_rax = -1 keeps the kernel's restart logic away from our registers
        # if it runs between the stop and our syscall.
        return base.replace(rip=gadget, rax=nr, orig_rax=_U64, **changes)

    def entry_matches(self, regs: Registers, gadget: int, nr: int) -> bool:
        return regs["orig_rax"] == nr and regs["rip"] == gadget + len(self.syscall_insn)

    def syscall_result(self, regs: Registers) -> int:
        return to_signed(regs["rax"])

    def entry_call(self, regs: Registers) -> Tuple[int, Tuple[int, ...]]:
        return to_signed(regs["orig_rax"]), tuple(regs[a] for a in self._ARGS)

    def kvm_run_fd_at_stop(self, regs: Registers) -> Optional[int]:
        if regs["orig_rax"] == self.nr["ioctl"] and regs["rsi"] & 0xFFFFFFFF == KVM_RUN:
            return regs["rdi"] & 0xFFFFFFFF
        return None


class Aarch64(Arch):
    """aarch64: ``svc #0`` is d4000001; nr in x8; args x0..x5; result in x0."""

    name = "aarch64"
    reg_names = (*(f"x{i}" for i in range(31)), "sp", "pc", "pstate")
    reg_index = MappingProxyType({n: i for i, n in enumerate(reg_names)})
    pc_reg = "pc"
    sp_reg = "sp"
    syscall_insn = struct.pack("<I", 0xD4000001)
    insn_align = 4
    # AAPCS64 has no red zone, but signal frames and leaf code may sit just
    # below sp in hand-written code; stay clear of it anyway.
    red_zone = 128
    audit_arch = 0xC00000B7
    nr = MappingProxyType(
        {
            "ioctl": 29,
            "getpid": 172,
            "gettid": 178,
            "nanosleep": 101,
            "restart_syscall": 128,
        }
    )
    #: ``svc #0; ret`` (glibc's wrappers of syscalls that cannot fail, getpid...)
    syscall_ret_seqs = (struct.pack("<II", 0xD4000001, 0xD65F03C0),)
    syscall_ret_name = "svc #0; ret"
    #: ``mov x8, #139; svc #0``: the vDSO's __kernel_rt_sigreturn
    sigreturn_seqs = (struct.pack("<II", 0xD2801168, 0xD4000001),)
    #: PSTATE.BTYPE: a stale branch type would make a non-BTI gadget fault in a
    #: BTI-guarded page, so it is cleared while the engine's syscall runs.
    PSTATE_BTYPE = 0x3 << 10

    def prepare_syscall(
        self, base: Registers, gadget: int, nr: int, args: Sequence[int]
    ) -> Registers:
        if len(args) > 6:
            raise ValueError("a syscall takes at most 6 arguments")
        changes = {f"x{i}": a for i, a in enumerate(args)}
        return base.replace(pc=gadget, x8=nr, pstate=base["pstate"] & ~self.PSTATE_BTYPE, **changes)

    #: PSTATE.SSBS. On CPUs without FEAT_SSBS the kernel rewrites this bit in a
    #: task's saved user PSTATE at every context switch (the Spectre-v4
    #: mitigation state, ``ssbs_thread_switch``), so it may change while the
    #: thread is stopped, whatever serrinj does. Seen on a cortex-a57 host.
    PSTATE_SSBS = 1 << 12

    def same_after_restore(self, before: Registers, after: Registers, syscall_stop: bool) -> bool:
        if before == after:
            return True
        diff = before.diff(after)
        if syscall_stop:
            # At syscall stops x7 reads as the entry/exit flag, not its value;
            # the kernel puts the real value back itself (BRIEF section 9).
            diff.pop("x7", None)
        pstate = diff.pop("pstate", None)
        if pstate is not None and (pstate[0] ^ pstate[1]) & ~self.PSTATE_SSBS:
            return False
        return not diff

    def entry_matches(self, regs: Registers, gadget: int, nr: int) -> bool:
        return regs["x8"] == nr and regs["pc"] == gadget + len(self.syscall_insn)

    def syscall_result(self, regs: Registers) -> int:
        return to_signed(regs["x0"])

    def entry_call(self, regs: Registers) -> Tuple[int, Tuple[int, ...]]:
        return to_signed(regs["x8"]), tuple(regs[f"x{i}"] for i in range(6))


_ARCHES: Mapping[str, Arch] = MappingProxyType({"x86_64": X86_64(), "aarch64": Aarch64()})


def host_arch() -> Arch:
    """The engine's arch: serrinj only traces processes of its own architecture."""
    machine = platform.machine()
    if machine == "arm64":
        machine = "aarch64"
    try:
        return _ARCHES[machine]
    except KeyError:
        raise RuntimeError(f"serrinj supports x86_64 and aarch64 hosts, not {machine}") from None


def arch_named(name: str) -> Arch:
    return _ARCHES[name]
