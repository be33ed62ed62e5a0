"""Evaluate a thread's seccomp filters before the engine runs a syscall in it.

A sandboxed VMM (Firecracker, cloud-hypervisor) may trap or kill on
``ioctl(KVM_SET_VCPU_EVENTS)`` from a vCPU thread, and Firecracker's SIGSYS
handler then shuts the VM down (BRIEF section 1). serrinj therefore reads the
thread's classic-BPF programs with PTRACE_SECCOMP_GET_FILTER and runs them
here for the exact ``seccomp_data`` the call would produce. Only ALLOW and LOG
let a call through; everything else is refused before anything is sent.

The module also builds small filters, which the test VM installs to play a
sandboxed VMM.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Iterable, List, Sequence, Tuple

# struct seccomp_data {int nr; u32 arch; u64 instruction_pointer; u64 args[6];}
SECCOMP_DATA_SIZE = 64
OFF_NR = 0
OFF_ARCH = 4
OFF_IP = 8


def off_arg(index: int, high: bool = False) -> int:
    """Offset of the low (or high) 32-bit half of ``args[index]`` (little-endian)."""
    return 16 + 8 * index + (4 if high else 0)


SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_KILL_THREAD = 0x00000000
SECCOMP_RET_TRAP = 0x00030000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_RET_TRACE = 0x7FF00000
SECCOMP_RET_LOG = 0x7FFC0000
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ACTION_FULL = 0xFFFF0000
SECCOMP_RET_DATA = 0x0000FFFF


class Action(enum.Enum):
    KILL_PROCESS = "kill-process"
    KILL_THREAD = "kill-thread"
    TRAP = "trap"
    ERRNO = "errno"
    USER_NOTIF = "user-notif"
    TRACE = "trace"
    LOG = "log"
    ALLOW = "allow"

    @property
    def lets_through(self) -> bool:
        """Whether the syscall would actually run (and nothing bad happen to the VMM)."""
        return self in (Action.ALLOW, Action.LOG)


_ACTIONS = {
    SECCOMP_RET_KILL_PROCESS: Action.KILL_PROCESS,
    SECCOMP_RET_KILL_THREAD: Action.KILL_THREAD,
    SECCOMP_RET_TRAP: Action.TRAP,
    SECCOMP_RET_ERRNO: Action.ERRNO,
    SECCOMP_RET_USER_NOTIF: Action.USER_NOTIF,
    SECCOMP_RET_TRACE: Action.TRACE,
    SECCOMP_RET_LOG: Action.LOG,
    SECCOMP_RET_ALLOW: Action.ALLOW,
}


def action_of(ret: int) -> Action:
    """The action of a filter's return value (unknown actions kill, as in the kernel)."""
    return _ACTIONS.get(ret & SECCOMP_RET_ACTION_FULL, Action.KILL_PROCESS)


def _action_rank(ret: int) -> int:
    # The kernel keeps the filter result with the lowest (s32) action value.
    v = ret & SECCOMP_RET_ACTION_FULL
    return v - (1 << 32) if v >> 31 else v


@dataclass(frozen=True)
class Verdict:
    """The combined result of every filter for one syscall."""

    ret: int
    filter_index: int  # which filter decided (0 = newest); -1 when no filter

    @property
    def action(self) -> Action:
        return action_of(self.ret)

    @property
    def data(self) -> int:
        return self.ret & SECCOMP_RET_DATA


def seccomp_data(nr: int, arch: int, ip: int, args: Sequence[int]) -> bytes:
    padded = list(args) + [0] * (6 - len(args))
    return struct.pack("<iIQ6Q", nr, arch, ip & (2**64 - 1), *(a & (2**64 - 1) for a in padded))


# --- classic BPF
BPF_LD, BPF_LDX, BPF_ST, BPF_STX, BPF_ALU, BPF_JMP, BPF_RET, BPF_MISC = range(8)
BPF_W, BPF_H, BPF_B = 0x00, 0x08, 0x10
BPF_IMM, BPF_ABS, BPF_IND, BPF_MEM, BPF_LEN, BPF_MSH = 0x00, 0x20, 0x40, 0x60, 0x80, 0xA0
BPF_ADD, BPF_SUB, BPF_MUL, BPF_DIV, BPF_OR, BPF_AND = 0x00, 0x10, 0x20, 0x30, 0x40, 0x50
BPF_LSH, BPF_RSH, BPF_NEG, BPF_MOD, BPF_XOR = 0x60, 0x70, 0x80, 0x90, 0xA0
BPF_JA, BPF_JEQ, BPF_JGT, BPF_JGE, BPF_JSET = 0x00, 0x10, 0x20, 0x30, 0x40
BPF_K, BPF_X = 0x00, 0x08
BPF_A = 0x10
BPF_TAX, BPF_TXA = 0x00, 0x80

Insn = Tuple[int, int, int, int]  # (code, jt, jf, k)
_INSN = struct.Struct("<HBBI")
_MASK32 = 0xFFFFFFFF


class BpfError(ValueError):
    """A malformed program (the kernel would not have accepted it either)."""


def decode_program(raw: bytes) -> List[Insn]:
    if len(raw) % 8:
        raise BpfError("a BPF program is a whole number of 8-byte instructions")
    return [_INSN.unpack_from(raw, i) for i in range(0, len(raw), 8)]


def encode_program(insns: Iterable[Insn]) -> bytes:
    return b"".join(_INSN.pack(*i) for i in insns)


def run(program: Sequence[Insn], data: bytes) -> int:
    """Run a classic-BPF program over ``data``; returns its 32-bit return value."""
    a = x = 0
    mem = [0] * 16
    pc = 0
    n = len(program)
    for _ in range(n + 1):  # jumps only go forward: n steps bound any run
        if not 0 <= pc < n:
            raise BpfError(f"BPF program ran off its end at {pc}")
        code, jt, jf, k = program[pc]
        pc += 1
        cls = code & 0x07
        if cls in (BPF_LD, BPF_LDX):
            mode = code & 0xE0
            if mode == BPF_IMM:
                val = k
            elif mode == BPF_MEM:
                val = mem[k & 0xF]
            elif mode == BPF_LEN:
                val = len(data)
            elif mode in (BPF_ABS, BPF_IND):
                off = k + (x if mode == BPF_IND else 0)
                size = {BPF_W: 4, BPF_H: 2, BPF_B: 1}[code & 0x18]
                if off + size > len(data):
                    return 0  # out-of-bounds loads end the program with 0 (kill)
                # seccomp_data is read in native byte order; both supported arches are LE.
                val = int.from_bytes(data[off : off + size], "little")
            elif mode == BPF_MSH:
                if k >= len(data):
                    return 0
                val = (data[k] & 0xF) << 2
            else:
                raise BpfError(f"unknown load mode {code:#x}")
            if cls == BPF_LD:
                a = val & _MASK32
            else:
                x = val & _MASK32
        elif cls == BPF_ST:
            mem[k & 0xF] = a
        elif cls == BPF_STX:
            mem[k & 0xF] = x
        elif cls == BPF_ALU:
            op = code & 0xF0
            src = x if code & BPF_X else k
            if op == BPF_ADD:
                a = (a + src) & _MASK32
            elif op == BPF_SUB:
                a = (a - src) & _MASK32
            elif op == BPF_MUL:
                a = (a * src) & _MASK32
            elif op == BPF_DIV:
                if src == 0:
                    return 0
                a = a // src
            elif op == BPF_MOD:
                if src == 0:
                    return 0
                a = a % src
            elif op == BPF_OR:
                a |= src
            elif op == BPF_AND:
                a &= src
            elif op == BPF_XOR:
                a ^= src
            elif op == BPF_LSH:
                a = (a << (src & 31)) & _MASK32 if src < 32 else 0
            elif op == BPF_RSH:
                a = a >> src if src < 32 else 0
            elif op == BPF_NEG:
                a = (-a) & _MASK32
            else:
                raise BpfError(f"unknown ALU op {code:#x}")
        elif cls == BPF_JMP:
            op = code & 0xF0
            if op == BPF_JA:
                pc += k
                continue
            src = x if code & BPF_X else k
            if op == BPF_JEQ:
                taken = a == src
            elif op == BPF_JGT:
                taken = a > src
            elif op == BPF_JGE:
                taken = a >= src
            elif op == BPF_JSET:
                taken = bool(a & src)
            else:
                raise BpfError(f"unknown jump {code:#x}")
            pc += jt if taken else jf
        elif cls == BPF_RET:
            rv = code & 0x18
            return (a if rv == BPF_A else x if rv == BPF_X else k) & _MASK32
        elif cls == BPF_MISC:
            if code & 0xF8 == BPF_TXA:
                a = x
            else:
                x = a
    raise BpfError("BPF program did not return")


def evaluate(filters: Sequence[Sequence[Insn]], data: bytes) -> Verdict:
    """Combine every filter's verdict the way the kernel does (most restrictive wins)."""
    best = Verdict(SECCOMP_RET_ALLOW, -1)
    for index, prog in enumerate(filters):
        ret = run(prog, data)
        if _action_rank(ret) < _action_rank(best.ret):
            best = Verdict(ret, index)
    return best


def deny_ioctls(audit_arch: int, ioctl_nr: int, requests: Sequence[int], ret: int) -> bytes:
    """A filter returning ``ret`` for ``ioctl(_, req, ...)`` with ``req`` in ``requests``.

    Everything else is allowed. This is how a sandboxed VMM forbids
    KVM_GET/SET_VCPU_EVENTS on its vCPU threads.
    """
    prog: List[Insn] = [
        (BPF_LD | BPF_W | BPF_ABS, 0, 0, OFF_ARCH),
        (BPF_JMP | BPF_JEQ | BPF_K, 0, 3 + len(requests), audit_arch),
        (BPF_LD | BPF_W | BPF_ABS, 0, 0, OFF_NR),
        (BPF_JMP | BPF_JEQ | BPF_K, 0, 1 + len(requests), ioctl_nr),
        (BPF_LD | BPF_W | BPF_ABS, 0, 0, off_arg(1)),
    ]
    for i, req in enumerate(requests):
        remaining = len(requests) - i - 1
        prog.append((BPF_JMP | BPF_JEQ | BPF_K, remaining + 1, 0, req & _MASK32))
    prog.append((BPF_RET | BPF_K, 0, 0, SECCOMP_RET_ALLOW))
    prog.append((BPF_RET | BPF_K, 0, 0, ret))
    return encode_program(prog)
