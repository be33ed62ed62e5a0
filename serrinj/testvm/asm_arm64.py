"""A small A64 assembler for the test guests.

Every A64 instruction is one little-endian 32-bit word, so assembling is
"append a word, remember a fixup for each forward reference, patch the
fixups at the end". Only the instructions the built-in guests need are here;
``tests/test_asm_arm64.py`` cross-checks every encoding against GNU binutils.

Registers are named as in GNU syntax (``"x0"``, ``"w3"``, ``"xzr"``, ``"sp"``).
Branch and literal targets are label names::

    a = Asm(base=0x40080000)
    a.label("loop")
    a.ldr("x1", "x0", 8)
    a.cbnz("x1", "loop")
    a.ret()
    image = a.assemble()

64-bit constants load either with a ``movz``/``movk`` sequence
(:meth:`Asm.mov_imm`) or from a literal pool (:meth:`Asm.ldr_const`; the
pool is placed by :meth:`Asm.literal_pool`, or at the end of the image).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

__all__ = [
    "CONDITIONS",
    "FRAME_SIZE",
    "SYSREGS",
    "Asm",
    "AsmError",
    "Reg",
    "encode_logical_imm",
    "exception_vectors",
    "parse_reg",
    "restore_frame_and_eret",
    "save_frame",
]


class AsmError(ValueError):
    """An operand cannot be encoded, or a label is missing or duplicated."""


# --- registers


@dataclass(frozen=True)
class Reg:
    """A parsed general-purpose register operand.

    ``num`` is 0-31; 31 means ``sp``/``wsp`` when ``is_sp`` is true and the
    zero register otherwise. ``sf`` is 1 for a 64-bit (x) register.
    """

    num: int
    sf: int
    is_sp: bool = False


def parse_reg(name: str) -> Reg:
    """Parse a GNU register name (x0-x30, w0-w30, xzr, wzr, sp, wsp)."""
    n = name.strip().lower()
    fixed = {"xzr": Reg(31, 1), "wzr": Reg(31, 0), "sp": Reg(31, 1, True), "wsp": Reg(31, 0, True)}
    if n in fixed:
        return fixed[n]
    if n == "lr":
        return Reg(30, 1)
    if len(n) >= 2 and n[0] in "xw" and n[1:].isdigit():
        num = int(n[1:])
        if 0 <= num <= 30:
            return Reg(num, 1 if n[0] == "x" else 0)
    raise AsmError(f"not a general-purpose register: {name!r}")


def _gp(name: str, sp_ok: bool = False) -> Reg:
    r = parse_reg(name)
    if r.is_sp and not sp_ok:
        raise AsmError(f"{name} is not allowed here (the encoding means the zero register)")
    if r.num == 31 and not r.is_sp and sp_ok:
        raise AsmError(f"{name} is not allowed here (the encoding means sp)")
    return r


def _base(name: str) -> Reg:
    """A base address register: x0..x30 or sp (encoding 31 is sp, never xzr)."""
    r = parse_reg(name)
    if r.num == 31 and not r.is_sp:
        raise AsmError(f"{name} cannot be a base register")
    if not r.sf:
        raise AsmError("the base register must be 64-bit")
    return r


def _same_width(*regs: Reg) -> int:
    widths = {r.sf for r in regs}
    if len(widths) != 1:
        raise AsmError("operands mix 32-bit and 64-bit registers")
    return widths.pop()


# --- tables

CONDITIONS: Mapping[str, int] = MappingProxyType(
    {
        "eq": 0,
        "ne": 1,
        "cs": 2,
        "hs": 2,
        "cc": 3,
        "lo": 3,
        "mi": 4,
        "pl": 5,
        "vs": 6,
        "vc": 7,
        "hi": 8,
        "ls": 9,
        "ge": 10,
        "lt": 11,
        "gt": 12,
        "le": 13,
        "al": 14,
    }
)


def _sysreg(op0: int, op1: int, crn: int, crm: int, op2: int) -> int:
    return (op0 << 14) | (op1 << 11) | (crn << 7) | (crm << 3) | op2


#: system registers by GNU name, as the 15-bit ``op0:op1:CRn:CRm:op2`` field of MRS/MSR
SYSREGS: Mapping[str, int] = MappingProxyType(
    {
        "midr_el1": _sysreg(3, 0, 0, 0, 0),
        "mpidr_el1": _sysreg(3, 0, 0, 0, 5),
        "sctlr_el1": _sysreg(3, 0, 1, 0, 0),
        "ttbr0_el1": _sysreg(3, 0, 2, 0, 0),
        "tcr_el1": _sysreg(3, 0, 2, 0, 2),
        "spsr_el1": _sysreg(3, 0, 4, 0, 0),
        "elr_el1": _sysreg(3, 0, 4, 0, 1),
        "sp_el0": _sysreg(3, 0, 4, 1, 0),
        "spsel": _sysreg(3, 0, 4, 2, 0),
        "currentel": _sysreg(3, 0, 4, 2, 2),
        "daif": _sysreg(3, 3, 4, 2, 1),
        "icc_pmr_el1": _sysreg(3, 0, 4, 6, 0),
        "esr_el1": _sysreg(3, 0, 5, 2, 0),
        "far_el1": _sysreg(3, 0, 6, 0, 0),
        "mair_el1": _sysreg(3, 0, 10, 2, 0),
        "vbar_el1": _sysreg(3, 0, 12, 0, 0),
        "isr_el1": _sysreg(3, 0, 12, 1, 0),
        "icc_iar1_el1": _sysreg(3, 0, 12, 12, 0),
        "icc_eoir1_el1": _sysreg(3, 0, 12, 12, 1),
        "icc_sgi1r_el1": _sysreg(3, 0, 12, 11, 5),
        "icc_sre_el1": _sysreg(3, 0, 12, 12, 5),
        "icc_igrpen1_el1": _sysreg(3, 0, 12, 12, 7),
        "tpidr_el1": _sysreg(3, 0, 13, 0, 4),
        "cntfrq_el0": _sysreg(3, 3, 14, 0, 0),
        "cntvct_el0": _sysreg(3, 3, 14, 0, 2),
        "cntv_tval_el0": _sysreg(3, 3, 14, 3, 0),
        "cntv_ctl_el0": _sysreg(3, 3, 14, 3, 1),
        "cntv_cval_el0": _sysreg(3, 3, 14, 3, 2),
    }
)

#: the PSTATE fields ``msr <field>, #imm`` can write, as ``(op1, op2)``
_PSTATE_FIELDS: Mapping[str, Tuple[int, int]] = MappingProxyType(
    {"spsel": (0, 5), "daifset": (3, 6), "daifclr": (3, 7)}
)

_BARRIER_OPTIONS: Mapping[str, int] = MappingProxyType(
    {
        "oshld": 1,
        "oshst": 2,
        "osh": 3,
        "nshld": 5,
        "nshst": 6,
        "nsh": 7,
        "ishld": 9,
        "ishst": 10,
        "ish": 11,
        "ld": 13,
        "st": 14,
        "sy": 15,
    }
)

_SHIFTS: Mapping[str, int] = MappingProxyType({"lsl": 0, "lsr": 1, "asr": 2, "ror": 3})


def _build_logical_imms(width: int) -> Dict[int, Tuple[int, int, int]]:
    # Enumerate every (element size, run length, rotation): at most 5334
    # values, and a table is easier to trust than the bit-trick inversion.
    table: Dict[int, Tuple[int, int, int]] = {}
    size = 2
    while size <= width:
        emask = (1 << size) - 1
        for ones in range(1, size):
            run = (1 << ones) - 1
            for rot in range(size):
                elem = ((run >> rot) | (run << (size - rot))) & emask
                value = 0
                for i in range(width // size):
                    value |= elem << (i * size)
                n = 1 if size == 64 else 0
                imms = ((~(size - 1) << 1) & 0x3F) | (ones - 1)
                table.setdefault(value, (n, rot, imms))
        size *= 2
    return table


_LOGICAL_IMMS: Dict[int, Dict[int, Tuple[int, int, int]]] = {}


def encode_logical_imm(value: int, width: int) -> Tuple[int, int, int]:
    """``(N, immr, imms)`` for a bitmask immediate, or :class:`AsmError` if unencodable."""
    if width not in (32, 64):
        raise AsmError(f"bad width {width}")
    table = _LOGICAL_IMMS.get(width)
    if table is None:
        table = _LOGICAL_IMMS[width] = _build_logical_imms(width)
    value &= (1 << width) - 1
    try:
        return table[value]
    except KeyError:
        raise AsmError(f"{value:#x} is not a {width}-bit logical immediate") from None


# --- fixups


@dataclass(frozen=True)
class _Fixup:
    offset: int
    label: str
    kind: str  # "imm26" | "imm19" | "imm14" | "adr" | "abs64" | "abs32"


_FIXUP_RANGE: Mapping[str, Tuple[int, int]] = MappingProxyType(
    {"imm26": (26, 2), "imm19": (19, 2), "imm14": (14, 2), "adr": (21, 0)}
)

Operand = Union[str, int]


#: ``hint #0``: the hints are ``_HINT | n << 5``
_HINT = 0xD503201F


def _fixed(insn: int) -> Callable[[Asm], None]:
    """An instruction without operands: always ``insn``."""

    def emit(self: Asm) -> None:
        self._emit(insn)

    return emit


def _exception(opc: int, ll: int) -> Callable[[Asm, int], None]:
    """An exception-generating instruction (svc, hvc, smc, brk) with its ``#imm16``."""

    def emit(self: Asm, imm16: int) -> None:
        if not 0 <= imm16 <= 0xFFFF:
            raise AsmError(f"{imm16:#x} does not fit in 16 bits")
        self._emit(0xD4000000 | (opc << 21) | (imm16 << 5) | ll)

    return emit


class Asm:
    """An A64 assembler building one contiguous image loaded at ``base``."""

    def __init__(self, base: int = 0) -> None:
        if base % 4:
            raise AsmError("the base address must be 4-byte aligned")
        self.base = base
        self._buf = bytearray()
        self._labels: Dict[str, int] = {}
        self._fixups: List[_Fixup] = []
        self._pool: List[Tuple[str, int]] = []
        self._pool_ids: Dict[int, str] = {}
        self._anon = 0

    # --- positions and labels

    @property
    def pc(self) -> int:
        """The address the next instruction will be placed at."""
        return self.base + len(self._buf)

    @property
    def size(self) -> int:
        """Bytes emitted so far."""
        return len(self._buf)

    def label(self, name: str) -> str:
        """Define ``name`` at the current position; returns the name."""
        if name in self._labels:
            raise AsmError(f"label {name!r} defined twice")
        self._labels[name] = self.pc
        return name

    def define(self, name: str, address: int) -> str:
        """Define ``name`` at an arbitrary address (e.g. past the image, for zeroed data)."""
        if name in self._labels:
            raise AsmError(f"label {name!r} defined twice")
        self._labels[name] = address
        return name

    def fresh_label(self, hint: str = "L") -> str:
        """A unique, not yet defined label name."""
        self._anon += 1
        return f".{hint}{self._anon}"

    def address(self, name: str) -> int:
        """The address of a defined label."""
        try:
            return self._labels[name]
        except KeyError:
            raise AsmError(f"undefined label {name!r}") from None

    @property
    def labels(self) -> Mapping[str, int]:
        """Every label defined so far and its address."""
        return MappingProxyType(dict(self._labels))

    def align(self, alignment: int, fill_nop: bool = True) -> None:
        """Pad to a multiple of ``alignment`` bytes (with nops, or zeros)."""
        if alignment & (alignment - 1) or alignment < 1:
            raise AsmError("alignment must be a power of two")
        if not fill_nop:
            self._buf.extend(bytes(-self.pc % alignment))
            return
        if self.pc % 4:
            raise AsmError("cannot pad with nops from an unaligned position")
        while self.pc % alignment:
            self.nop()

    def skip_to(self, offset: int) -> None:
        """Pad with zero bytes up to ``offset`` from the base (must not go backwards)."""
        if offset < len(self._buf):
            raise AsmError(f"already past offset {offset:#x} (at {len(self._buf):#x})")
        self._buf.extend(bytes(offset - len(self._buf)))

    # --- data

    def word(self, value: int) -> None:
        """Emit a raw 32-bit little-endian word."""
        self._buf += struct.pack("<I", value & 0xFFFFFFFF)

    def quad(self, value: Union[int, str]) -> None:
        """Emit a 64-bit value, or the absolute address of a label."""
        if isinstance(value, str):
            self._fixups.append(_Fixup(len(self._buf), value, "abs64"))
            value = 0
        self._buf += struct.pack("<Q", value & 0xFFFFFFFFFFFFFFFF)

    def data(self, raw: bytes) -> None:
        """Emit raw bytes (re-align before more code)."""
        self._buf += raw

    def asciz(self, text: str) -> None:
        """Emit a NUL-terminated ASCII string."""
        self._buf += text.encode("ascii") + b"\0"

    # --- encoding helpers

    def _emit(self, insn: int) -> None:
        if len(self._buf) % 4:
            raise AsmError("instruction is not 4-byte aligned (align after data)")
        self.word(insn)

    def _ref(self, target: Operand, kind: str) -> int:
        """A fixup for a label target, or the immediate for an absolute address."""
        if isinstance(target, str):
            self._fixups.append(_Fixup(len(self._buf), target, kind))
            return 0
        return self._field(kind, target - self.pc)

    @staticmethod
    def _field(kind: str, delta: int) -> int:
        bits, scale = _FIXUP_RANGE[kind]
        if scale and delta % (1 << scale):
            raise AsmError(f"branch offset {delta} is not a multiple of 4")
        value = delta >> scale
        if not -(1 << (bits - 1)) <= value < (1 << (bits - 1)):
            raise AsmError(f"offset {delta} out of range for {kind}")
        field = value & ((1 << bits) - 1)
        if kind == "imm26":
            return field
        if kind == "imm19":
            return field << 5
        if kind == "imm14":
            return field << 5
        # adr: immlo in bits 30:29, immhi in bits 23:5
        return ((field & 3) << 29) | ((field >> 2) << 5)

    # --- moves

    def movz(self, rd: str, imm16: int, shift: int = 0) -> None:
        """``movz rd, #imm16, lsl #shift``."""
        self._movwide(0b10, rd, imm16, shift)

    def movk(self, rd: str, imm16: int, shift: int = 0) -> None:
        """``movk rd, #imm16, lsl #shift``."""
        self._movwide(0b11, rd, imm16, shift)

    def movn(self, rd: str, imm16: int, shift: int = 0) -> None:
        """``movn rd, #imm16, lsl #shift``."""
        self._movwide(0b00, rd, imm16, shift)

    def _movwide(self, opc: int, rd: str, imm16: int, shift: int) -> None:
        r = _gp(rd)
        if not 0 <= imm16 <= 0xFFFF:
            raise AsmError(f"{imm16:#x} does not fit in 16 bits")
        if shift % 16 or not 0 <= shift < (64 if r.sf else 32):
            raise AsmError(f"bad shift {shift} for a wide move")
        self._emit(
            (r.sf << 31)
            | (opc << 29)
            | (0b100101 << 23)
            | ((shift // 16) << 21)
            | (imm16 << 5)
            | r.num
        )

    def mov_imm(self, rd: str, value: int) -> None:
        """Load any constant with the shortest ``movz``/``movn`` + ``movk`` sequence."""
        r = _gp(rd)
        width = 64 if r.sf else 32
        value &= (1 << width) - 1
        chunks = [(value >> s) & 0xFFFF for s in range(0, width, 16)]
        # movn pays off when most halfwords are 0xffff
        if chunks.count(0xFFFF) > chunks.count(0):
            inverted = [c ^ 0xFFFF for c in chunks]
            first = next((i for i, c in enumerate(inverted) if c), 0)
            self.movn(rd, inverted[first], first * 16)
            for i, c in enumerate(chunks):
                if i != first and c != 0xFFFF:
                    self.movk(rd, c, i * 16)
            return
        first = next((i for i, c in enumerate(chunks) if c), 0)
        self.movz(rd, chunks[first], first * 16)
        for i, c in enumerate(chunks):
            if i != first and c:
                self.movk(rd, c, i * 16)

    def mov(self, rd: str, src: Operand) -> None:
        """``mov rd, rn`` (register, including to/from sp) or a constant (see :meth:`mov_imm`)."""
        if isinstance(src, int):
            self.mov_imm(rd, src)
            return
        d, s = parse_reg(rd), parse_reg(src)
        _same_width(d, s)
        if d.is_sp or s.is_sp:
            self.add(rd, src, 0)
        else:
            self.orr(rd, "xzr" if d.sf else "wzr", src)

    def ldr_const(self, rd: str, value: int) -> None:
        """``ldr xd, =value``: load a 64-bit constant from the literal pool."""
        r = _gp(rd)
        if not r.sf:
            raise AsmError("ldr_const loads 64-bit registers only")
        value &= 0xFFFFFFFFFFFFFFFF
        name = self._pool_ids.get(value)
        if name is None:
            name = self.fresh_label("pool")
            self._pool_ids[value] = name
            self._pool.append((name, value))
        self.ldr_literal(rd, name)

    def literal_pool(self) -> None:
        """Place the pending ``ldr_const`` values here (8-byte aligned)."""
        if not self._pool:
            return
        if self.pc % 8:
            self.word(0)
        for name, value in self._pool:
            self.label(name)
            self.quad(value)
        self._pool = []
        self._pool_ids = {}

    def adr(self, rd: str, target: Operand) -> None:
        """``adr rd, label``: a PC-relative address within +-1 MiB."""
        r = _gp(rd)
        if not r.sf:
            raise AsmError("adr takes a 64-bit register")
        self._emit(0x10000000 | self._ref(target, "adr") | r.num)

    # --- arithmetic

    def _addsub(self, op: int, s: int, rd: str, rn: str, operand: Operand, shift: int) -> None:
        if isinstance(operand, int):
            d = parse_reg(rd) if not s else _gp(rd)
            n = parse_reg(rn)
            if n.num == 31 and not n.is_sp:
                raise AsmError(f"{rn} cannot be the first operand of an immediate add/sub")
            if not s and d.num == 31 and not d.is_sp:
                raise AsmError(f"{rd} cannot be the destination of an immediate add/sub")
            sf = _same_width(d, n)
            imm, sh = operand, 0
            if shift == 12:
                sh = 1
            elif shift:
                raise AsmError("add/sub immediates shift by 0 or 12 only")
            if not 0 <= imm <= 0xFFF:
                raise AsmError(f"{imm:#x} does not fit an add/sub immediate")
            self._emit(
                (sf << 31)
                | (op << 30)
                | (s << 29)
                | (0b100010 << 23)
                | (sh << 22)
                | (imm << 10)
                | (n.num << 5)
                | d.num
            )
            return
        d, n, m = _gp(rd), _gp(rn), _gp(operand)
        sf = _same_width(d, n, m)
        if not 0 <= shift < (64 if sf else 32):
            raise AsmError(f"bad shift amount {shift}")
        self._emit(
            (sf << 31)
            | (op << 30)
            | (s << 29)
            | (0b01011 << 24)
            | (m.num << 16)
            | (shift << 10)
            | (n.num << 5)
            | d.num
        )

    def add(self, rd: str, rn: str, operand: Operand, shift: int = 0) -> None:
        """``add rd, rn, #imm{, lsl #12}`` or ``add rd, rn, rm{, lsl #shift}``."""
        self._addsub(0, 0, rd, rn, operand, shift)

    def adds(self, rd: str, rn: str, operand: Operand, shift: int = 0) -> None:
        """``adds``: add and set flags."""
        self._addsub(0, 1, rd, rn, operand, shift)

    def sub(self, rd: str, rn: str, operand: Operand, shift: int = 0) -> None:
        """``sub rd, rn, #imm{, lsl #12}`` or ``sub rd, rn, rm{, lsl #shift}``."""
        self._addsub(1, 0, rd, rn, operand, shift)

    def subs(self, rd: str, rn: str, operand: Operand, shift: int = 0) -> None:
        """``subs``: subtract and set flags."""
        self._addsub(1, 1, rd, rn, operand, shift)

    def cmp(self, rn: str, operand: Operand, shift: int = 0) -> None:
        """``cmp rn, #imm`` / ``cmp rn, rm`` (``subs`` into the zero register)."""
        zr = "xzr" if parse_reg(rn).sf else "wzr"
        self.subs(zr, rn, operand, shift)

    def cmn(self, rn: str, operand: Operand, shift: int = 0) -> None:
        """``cmn rn, #imm`` / ``cmn rn, rm``."""
        zr = "xzr" if parse_reg(rn).sf else "wzr"
        self.adds(zr, rn, operand, shift)

    def _logical(
        self, opc: int, invert: int, rd: str, rn: str, operand: Operand, shift: str
    ) -> None:
        if isinstance(operand, int):
            if invert:
                operand = ~operand
            # Rd 31 is sp for and/orr/eor immediates but the zero register for ands
            d = _gp(rd, sp_ok=opc != 0b11)
            n = _gp(rn)
            sf = _same_width(d, n)
            nbit, immr, imms = encode_logical_imm(operand, 64 if sf else 32)
            if not sf and nbit:
                raise AsmError("64-bit element in a 32-bit logical immediate")
            self._emit(
                (sf << 31)
                | (opc << 29)
                | (0b100100 << 23)
                | (nbit << 22)
                | (immr << 16)
                | (imms << 10)
                | (n.num << 5)
                | d.num
            )
            return
        d, n, m = _gp(rd), _gp(rn), _gp(operand)
        sf = _same_width(d, n, m)
        kind, _, amount_s = shift.partition("#")
        kind = kind.strip().rstrip(",").strip() or "lsl"
        amount = int(amount_s, 0) if amount_s else 0
        if kind not in _SHIFTS or not 0 <= amount < (64 if sf else 32):
            raise AsmError(f"bad shift {shift!r}")
        self._emit(
            (sf << 31)
            | (opc << 29)
            | (0b01010 << 24)
            | (_SHIFTS[kind] << 22)
            | (invert << 21)
            | (m.num << 16)
            | (amount << 10)
            | (n.num << 5)
            | d.num
        )

    def and_(self, rd: str, rn: str, operand: Operand, shift: str = "") -> None:
        """``and rd, rn, #bitmask`` or ``and rd, rn, rm{, <shift> #n}``."""
        self._logical(0b00, 0, rd, rn, operand, shift)

    def orr(self, rd: str, rn: str, operand: Operand, shift: str = "") -> None:
        """``orr rd, rn, #bitmask`` or ``orr rd, rn, rm{, <shift> #n}``."""
        self._logical(0b01, 0, rd, rn, operand, shift)

    def eor(self, rd: str, rn: str, operand: Operand, shift: str = "") -> None:
        """``eor rd, rn, #bitmask`` or ``eor rd, rn, rm{, <shift> #n}``."""
        self._logical(0b10, 0, rd, rn, operand, shift)

    def ands(self, rd: str, rn: str, operand: Operand, shift: str = "") -> None:
        """``ands``: and, setting N and Z."""
        self._logical(0b11, 0, rd, rn, operand, shift)

    def bic(self, rd: str, rn: str, operand: Operand, shift: str = "") -> None:
        """``bic rd, rn, rm`` (an integer operand becomes ``and`` with its complement)."""
        self._logical(0b00, 1, rd, rn, operand, shift)

    def orn(self, rd: str, rn: str, rm: str, shift: str = "") -> None:
        """``orn rd, rn, rm{, <shift> #n}``: rd = rn | ~rm."""
        self._logical(0b01, 1, rd, rn, rm, shift)

    def mvn(self, rd: str, rm: str) -> None:
        """``mvn rd, rm``: rd = ~rm."""
        self.orn(rd, "xzr" if parse_reg(rd).sf else "wzr", rm)

    def tst(self, rn: str, operand: Operand) -> None:
        """``tst rn, #bitmask`` / ``tst rn, rm``."""
        zr = "xzr" if parse_reg(rn).sf else "wzr"
        self.ands(zr, rn, operand)

    def _bitfield(self, opc: int, rd: str, rn: str, immr: int, imms: int) -> None:
        d, n = _gp(rd), _gp(rn)
        sf = _same_width(d, n)
        self._emit(
            (sf << 31)
            | (opc << 29)
            | (0b100110 << 23)
            | (sf << 22)
            | (immr << 16)
            | (imms << 10)
            | (n.num << 5)
            | d.num
        )

    def _shift_reg(self, op2: int, rd: str, rn: str, rm: str) -> None:
        d, n, m = _gp(rd), _gp(rn), _gp(rm)
        sf = _same_width(d, n, m)
        self._emit(
            (sf << 31)
            | 0x1AC00000
            | (m.num << 16)
            | (0b0010 << 12)
            | (op2 << 10)
            | (n.num << 5)
            | d.num
        )

    def lsl(self, rd: str, rn: str, amount: Operand) -> None:
        """``lsl rd, rn, #n`` (ubfm) or ``lsl rd, rn, rm`` (lslv)."""
        if isinstance(amount, str):
            self._shift_reg(0b00, rd, rn, amount)
            return
        width = 64 if parse_reg(rd).sf else 32
        if not 0 <= amount < width:
            raise AsmError(f"bad shift amount {amount}")
        self._bitfield(0b10, rd, rn, (-amount) % width, width - 1 - amount)

    def lsr(self, rd: str, rn: str, amount: Operand) -> None:
        """``lsr rd, rn, #n`` (ubfm) or ``lsr rd, rn, rm`` (lsrv)."""
        if isinstance(amount, str):
            self._shift_reg(0b01, rd, rn, amount)
            return
        width = 64 if parse_reg(rd).sf else 32
        if not 0 <= amount < width:
            raise AsmError(f"bad shift amount {amount}")
        self._bitfield(0b10, rd, rn, amount, width - 1)

    def asr(self, rd: str, rn: str, amount: int) -> None:
        """``asr rd, rn, #n`` (sbfm)."""
        width = 64 if parse_reg(rd).sf else 32
        if not 0 <= amount < width:
            raise AsmError(f"bad shift amount {amount}")
        self._bitfield(0b00, rd, rn, amount, width - 1)

    def ubfx(self, rd: str, rn: str, lsb: int, width: int) -> None:
        """``ubfx rd, rn, #lsb, #width``: extract an unsigned bit field."""
        size = 64 if parse_reg(rd).sf else 32
        if lsb < 0 or width < 1 or lsb + width > size:
            raise AsmError(f"bad bit field {lsb}+{width}")
        self._bitfield(0b10, rd, rn, lsb, lsb + width - 1)

    def _dp3(self, o0: int, rd: str, rn: str, rm: str, ra: str) -> None:
        d, n, m, a = _gp(rd), _gp(rn), _gp(rm), _gp(ra)
        sf = _same_width(d, n, m, a)
        self._emit(
            (sf << 31)
            | 0x1B000000
            | (m.num << 16)
            | (o0 << 15)
            | (a.num << 10)
            | (n.num << 5)
            | d.num
        )

    def madd(self, rd: str, rn: str, rm: str, ra: str) -> None:
        """``madd rd, rn, rm, ra``: rd = ra + rn * rm."""
        self._dp3(0, rd, rn, rm, ra)

    def msub(self, rd: str, rn: str, rm: str, ra: str) -> None:
        """``msub rd, rn, rm, ra``: rd = ra - rn * rm."""
        self._dp3(1, rd, rn, rm, ra)

    def mul(self, rd: str, rn: str, rm: str) -> None:
        """``mul rd, rn, rm``."""
        self.madd(rd, rn, rm, "xzr" if parse_reg(rd).sf else "wzr")

    def udiv(self, rd: str, rn: str, rm: str) -> None:
        """``udiv rd, rn, rm``."""
        d, n, m = _gp(rd), _gp(rn), _gp(rm)
        sf = _same_width(d, n, m)
        self._emit((sf << 31) | 0x1AC00800 | (m.num << 16) | (n.num << 5) | d.num)

    def csel(self, rd: str, rn: str, rm: str, cond: str) -> None:
        """``csel rd, rn, rm, cond``."""
        self._csel(0, 0, rd, rn, rm, cond)

    def csinc(self, rd: str, rn: str, rm: str, cond: str) -> None:
        """``csinc rd, rn, rm, cond``."""
        self._csel(0, 1, rd, rn, rm, cond)

    def cset(self, rd: str, cond: str) -> None:
        """``cset rd, cond`` (csinc with the inverted condition)."""
        zr = "xzr" if parse_reg(rd).sf else "wzr"
        self._csel(0, 1, rd, zr, zr, _invert(cond))

    def _csel(self, op: int, o2: int, rd: str, rn: str, rm: str, cond: str) -> None:
        d, n, m = _gp(rd), _gp(rn), _gp(rm)
        sf = _same_width(d, n, m)
        self._emit(
            (sf << 31)
            | (op << 30)
            | 0x1A800000
            | (m.num << 16)
            | (_cond(cond) << 12)
            | (o2 << 10)
            | (n.num << 5)
            | d.num
        )

    # --- loads and stores

    _SIZES: Mapping[str, int] = MappingProxyType({"b": 0, "h": 1, "w": 2, "x": 3})

    def _ldst(
        self, load: bool, rt: str, rn: str, offset: int, mode: str, size: Optional[str]
    ) -> None:
        t, n = _gp(rt), _base(rn)
        sz = self._SIZES[size] if size else (3 if t.sf else 2)
        if size in ("b", "h") and t.sf:
            raise AsmError("byte and halfword accesses use w registers")
        opc = 0b01 if load else 0b00
        head = (sz << 30) | (0b111 << 27) | (opc << 22) | (n.num << 5) | t.num
        if mode == "offset":
            scale = 1 << sz
            if offset % scale == 0 and 0 <= offset // scale <= 0xFFF:
                self._emit(head | (0b01 << 24) | ((offset // scale) << 10))
                return
            if not -256 <= offset <= 255:
                raise AsmError(f"offset {offset} does not fit ldr/str")
            self._emit(head | ((offset & 0x1FF) << 12))  # ldur/stur
            return
        if not -256 <= offset <= 255:
            raise AsmError(f"writeback offset {offset} does not fit in 9 bits")
        if t.num == n.num and t.num != 31:
            raise AsmError("writeback with rt == rn is unpredictable")
        idx = 0b11 if mode == "pre" else 0b01
        self._emit(head | ((offset & 0x1FF) << 12) | (idx << 10))

    def ldr(self, rt: str, rn: str, offset: int = 0, mode: str = "offset") -> None:
        """``ldr rt, [rn, #off]``.

        ``mode="pre"`` is ``[rn, #off]!`` and ``mode="post"`` is ``[rn], #off``.
        """
        self._ldst(True, rt, rn, offset, mode, None)

    def str_(self, rt: str, rn: str, offset: int = 0, mode: str = "offset") -> None:
        """``str rt, [rn, #off]`` (see :meth:`ldr` for ``mode``)."""
        self._ldst(False, rt, rn, offset, mode, None)

    def ldrb(self, rt: str, rn: str, offset: int = 0, mode: str = "offset") -> None:
        """``ldrb wt, [rn, #off]``."""
        self._ldst(True, rt, rn, offset, mode, "b")

    def strb(self, rt: str, rn: str, offset: int = 0, mode: str = "offset") -> None:
        """``strb wt, [rn, #off]``."""
        self._ldst(False, rt, rn, offset, mode, "b")

    def ldrh(self, rt: str, rn: str, offset: int = 0, mode: str = "offset") -> None:
        """``ldrh wt, [rn, #off]``."""
        self._ldst(True, rt, rn, offset, mode, "h")

    def strh(self, rt: str, rn: str, offset: int = 0, mode: str = "offset") -> None:
        """``strh wt, [rn, #off]``."""
        self._ldst(False, rt, rn, offset, mode, "h")

    def ldr_literal(self, rt: str, target: Operand) -> None:
        """``ldr rt, label``: a PC-relative load (+-1 MiB)."""
        t = _gp(rt)
        opc = 0x58000000 if t.sf else 0x18000000
        self._emit(opc | self._ref(target, "imm19") | t.num)

    def _pair(self, load: bool, rt: str, rt2: str, rn: str, offset: int, mode: str) -> None:
        t, t2 = _gp(rt), _gp(rt2)
        n = _base(rn)
        sf = _same_width(t, t2)
        scale = 8 if sf else 4
        if offset % scale or not -64 <= offset // scale <= 63:
            raise AsmError(f"pair offset {offset} does not fit")
        if mode != "offset" and n.num in (t.num, t2.num) and n.num != 31:
            raise AsmError("writeback with a base register that is also loaded is unpredictable")
        if load and t.num == t2.num:
            raise AsmError("ldp with rt == rt2 is unpredictable")
        idx = {"post": 0b001, "offset": 0b010, "pre": 0b011}[mode]
        self._emit(
            ((0b10 if sf else 0b00) << 30)
            | (0b101 << 27)
            | (idx << 23)
            | (int(load) << 22)
            | (((offset // scale) & 0x7F) << 15)
            | (t2.num << 10)
            | (n.num << 5)
            | t.num
        )

    def ldp(self, rt: str, rt2: str, rn: str, offset: int = 0, mode: str = "offset") -> None:
        """``ldp rt, rt2, [rn, #off]`` (``mode`` as in :meth:`ldr`)."""
        self._pair(True, rt, rt2, rn, offset, mode)

    def stp(self, rt: str, rt2: str, rn: str, offset: int = 0, mode: str = "offset") -> None:
        """``stp rt, rt2, [rn, #off]`` (``mode`` as in :meth:`ldr`)."""
        self._pair(False, rt, rt2, rn, offset, mode)

    # --- branches

    def b(self, target: Operand) -> None:
        """``b label``."""
        self._emit(0x14000000 | self._ref(target, "imm26"))

    def bl(self, target: Operand) -> None:
        """``bl label``."""
        self._emit(0x94000000 | self._ref(target, "imm26"))

    def b_cond(self, cond: str, target: Operand) -> None:
        """``b.<cond> label``."""
        self._emit(0x54000000 | self._ref(target, "imm19") | _cond(cond))

    def cbz(self, rt: str, target: Operand) -> None:
        """``cbz rt, label``."""
        t = _gp(rt)
        self._emit((t.sf << 31) | 0x34000000 | self._ref(target, "imm19") | t.num)

    def cbnz(self, rt: str, target: Operand) -> None:
        """``cbnz rt, label``."""
        t = _gp(rt)
        self._emit((t.sf << 31) | 0x35000000 | self._ref(target, "imm19") | t.num)

    def tbz(self, rt: str, bit: int, target: Operand) -> None:
        """``tbz rt, #bit, label``."""
        self._tb(0, rt, bit, target)

    def tbnz(self, rt: str, bit: int, target: Operand) -> None:
        """``tbnz rt, #bit, label``."""
        self._tb(1, rt, bit, target)

    def _tb(self, op: int, rt: str, bit: int, target: Operand) -> None:
        t = _gp(rt)
        if not 0 <= bit < (64 if t.sf else 32):
            raise AsmError(f"bad bit number {bit}")
        self._emit(
            ((bit >> 5) << 31)
            | 0x36000000
            | (op << 24)
            | ((bit & 31) << 19)
            | self._ref(target, "imm14")
            | t.num
        )

    def br(self, rn: str) -> None:
        """``br rn``."""
        self._emit(0xD61F0000 | (_x(rn) << 5))

    def blr(self, rn: str) -> None:
        """``blr rn``."""
        self._emit(0xD63F0000 | (_x(rn) << 5))

    def ret(self, rn: str = "x30") -> None:
        """``ret {rn}``."""
        self._emit(0xD65F0000 | (_x(rn) << 5))

    # --- system

    def mrs(self, rt: str, sysreg: str) -> None:
        """``mrs xt, <sysreg>`` (names from :data:`SYSREGS`)."""
        self._emit(0xD5300000 | (_sysreg_field(sysreg) << 5) | _x(rt))

    def msr(self, sysreg: str, src: Operand) -> None:
        """``msr <sysreg>, xt``, or ``msr daifset|daifclr|spsel, #imm``."""
        if isinstance(src, int):
            field = _PSTATE_FIELDS.get(sysreg.lower())
            if field is None:
                raise AsmError(f"msr immediate to {sysreg} is not supported")
            if not 0 <= src <= 15:
                raise AsmError(f"{src} does not fit the 4-bit msr immediate")
            op1, op2 = field
            self._emit(0xD500401F | (op1 << 16) | (src << 8) | (op2 << 5))
            return
        self._emit(0xD5100000 | (_sysreg_field(sysreg) << 5) | _x(src))

    # the hints: ``nop``, ``yield``, ``wfe``, ``wfi``, ``sev``, ``sevl`` and ``esb`` (the error
    # synchronization barrier; a nop without RAS)
    nop, yield_, wfe, wfi, sev, sevl, esb = (_fixed(_HINT | n << 5) for n in (0, 1, 2, 3, 4, 5, 16))

    def _barrier(self, op2: int, option: str) -> None:
        crm = _BARRIER_OPTIONS.get(option.lower())
        if crm is None:
            raise AsmError(f"bad barrier option {option!r}")
        self._emit(0xD503301F | (crm << 8) | (op2 << 5))

    def dsb(self, option: str = "sy") -> None:
        """``dsb <option>``."""
        self._barrier(0b100, option)

    def dmb(self, option: str = "sy") -> None:
        """``dmb <option>``."""
        self._barrier(0b101, option)

    # ``isb``; ``tlbi vmalle1`` (this CPU's stage-1 EL1&0 TLB entries); ``ic iallu`` (this CPU's
    # instruction cache, to the point of unification); ``eret``
    isb, tlbi_vmalle1, ic_iallu, eret = map(
        _fixed, (0xD5033FDF, 0xD508871F, 0xD508751F, 0xD69F03E0)
    )

    # ``svc``, ``hvc``, ``smc`` and ``brk``, each ``#imm16``
    svc, hvc, smc, brk = (_exception(opc, ll) for opc, ll in ((0, 1), (0, 2), (0, 3), (1, 0)))

    # --- output

    def assemble(self) -> bytes:
        """Place any pending literal pool, resolve every label, and return the image."""
        self.literal_pool()
        out = bytearray(self._buf)
        for fx in self._fixups:
            target = self.address(fx.label)
            if fx.kind == "abs64":
                struct.pack_into("<Q", out, fx.offset, target)
                continue
            if fx.kind == "abs32":
                struct.pack_into("<I", out, fx.offset, target)
                continue
            insn = struct.unpack_from("<I", out, fx.offset)[0]
            insn |= self._field(fx.kind, target - (self.base + fx.offset))
            struct.pack_into("<I", out, fx.offset, insn)
        return bytes(out)


def _cond(cond: str) -> int:
    try:
        return CONDITIONS[cond.lower()]
    except KeyError:
        raise AsmError(f"bad condition {cond!r}") from None


def _invert(cond: str) -> str:
    code = _cond(cond)
    if code == 14:
        raise AsmError("'al' has no inverse")
    inverse = code ^ 1
    return next(name for name, value in CONDITIONS.items() if value == inverse)


def _x(name: str) -> int:
    r = _gp(name)
    if not r.sf:
        raise AsmError(f"{name}: a 64-bit register is required")
    return r.num


def _sysreg_field(name: str) -> int:
    try:
        return SYSREGS[name.lower()]
    except KeyError:
        raise AsmError(f"unknown system register {name!r}") from None


# --- building blocks shared by the guests


def exception_vectors(a: Asm, common: str, frame: int) -> None:
    """A VBAR_EL1 table at the current position (padded to 2 KiB).

    Each of the 16 entries allocates ``frame`` bytes of stack, saves x0 and x1
    at its bottom, puts its own index (0-15) in x0 and branches to ``common``,
    which is expected to start with :func:`save_frame`.
    """
    a.align(0x800)
    a.label("vectors")
    for index in range(16):
        start = a.pc
        a.sub("sp", "sp", frame)
        a.stp("x0", "x1", "sp")
        a.mov("x0", index)
        a.b(common)
        while a.pc < start + 0x80:
            a.nop()


#: the registers a handler frame keeps: x0-x18 (caller-saved), x29 and x30
FRAME_SIZE = 176


def save_frame(a: Asm) -> None:
    """Store x2-x18, x29 and x30 into the frame an :func:`exception_vectors` entry opened."""
    for i in range(2, 18, 2):
        a.stp(f"x{i}", f"x{i + 1}", "sp", 8 * i)
    a.stp("x18", "x29", "sp", 144)
    a.str_("x30", "sp", 160)


def restore_frame_and_eret(a: Asm) -> None:
    """Reload every register :func:`save_frame` and the vector entry stored, and ``eret``."""
    a.ldp("x0", "x1", "sp")
    for i in range(2, 18, 2):
        a.ldp(f"x{i}", f"x{i + 1}", "sp", 8 * i)
    a.ldp("x18", "x29", "sp", 144)
    a.ldr("x30", "sp", 160)
    a.add("sp", "sp", FRAME_SIZE)
    a.eret()
