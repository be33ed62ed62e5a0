"""A small x86 assembler for the built-in guests (16-bit real mode, 32-bit operands).

The guests of the test VM and the QEMU firmware are written in a subset of
GNU ``as`` Intel syntax (``.intel_syntax noprefix``), so that
``tests/test_asm_x86.py`` can feed the *same text* to GNU ``as`` and compare
the bytes: an encoding bug cannot hide. Where GNU ``as`` has a choice of
encodings, this assembler makes the same one (shortest immediate and
displacement forms, the accumulator short forms, ``op r/m, reg`` for
register-to-register moves, no redundant segment override, prefix order
segment / 0x67 / 0x66 / lock).

Supported:

- ``.code16`` and ``.code32`` (operand and address size prefixes follow),
  ``.intel_syntax noprefix`` (accepted), ``.equ NAME, expr`` and
  ``NAME = expr`` (absolute, defined before use), ``.byte .word .long .quad``,
  ``.ascii .asciz``, ``.balign N, fill``, ``.org offset, fill``,
  ``.space n, fill``.
- Labels (forward references allowed); jumps are relaxed from short to near
  exactly as GNU ``as`` does (start short, grow the ones out of range until
  nothing changes).
- Expressions with GNU ``as`` precedence: ``* / % << >>`` bind tighter than
  ``& | ^``, which bind tighter than ``+ -``; unary ``- ~``; parentheses.
- Operands: registers (8/16/32-bit, segment, ``cr0 cr2 cr3 cr4``),
  ``[base + index*scale + disp]`` memory with 16- or 32-bit addressing, an
  optional ``seg:`` override and ``byte/word/dword ptr``; ``offset label``
  immediates; ``sel:off`` far pointers.
- Instructions: only those the guests use (see :data:`MNEMONICS`).

A bare label used as a data operand means a *memory* operand in GNU ``as``
and an immediate in other assemblers; it is refused here: write
``offset label`` or ``[label]``. An address that depends on a label always
gets a full-size field, as in GNU ``as``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple, Union

__all__ = ["MNEMONICS", "AsmError", "Program", "assemble"]


class AsmError(ValueError):
    """A source error, with the line it is about."""

    def __init__(self, message: str, line: int = 0, text: str = "") -> None:
        where = f"line {line}: " if line else ""
        suffix = f"\n    {text.strip()}" if text else ""
        super().__init__(f"{where}{message}{suffix}")
        self.line = line


@dataclass(frozen=True)
class Program:
    """The output: bytes placed at ``origin`` and the value of every label and equate."""

    origin: int
    code: bytes
    symbols: Mapping[str, int]

    def __getitem__(self, name: str) -> int:
        return self.symbols[name]


# --------------------------------------------------------------------------- registers


@dataclass(frozen=True)
class Reg:
    name: str
    kind: str  # "r8" "r16" "r32" "sreg" "cr"
    num: int

    @property
    def size(self) -> int:
        return {"r8": 8, "r16": 16, "r32": 32, "sreg": 16, "cr": 32}[self.kind]


def _reg_table() -> Mapping[str, Reg]:
    table: Dict[str, Reg] = {}
    for kind, names in (
        ("r8", "al cl dl bl ah ch dh bh"),
        ("r16", "ax cx dx bx sp bp si di"),
        ("r32", "eax ecx edx ebx esp ebp esi edi"),
        ("sreg", "es cs ss ds fs gs"),
    ):
        for num, name in enumerate(names.split()):
            table[name] = Reg(name, kind, num)
    for num in (0, 2, 3, 4):
        table[f"cr{num}"] = Reg(f"cr{num}", "cr", num)
    return MappingProxyType(table)


REGISTERS = _reg_table()
_SEG_PREFIX = MappingProxyType(
    {"es": 0x26, "cs": 0x2E, "ss": 0x36, "ds": 0x3E, "fs": 0x64, "gs": 0x65}
)
_SIZE_WORDS = MappingProxyType({"byte": 8, "word": 16, "dword": 32})

# --------------------------------------------------------------------------- expressions


@dataclass(frozen=True)
class Num:
    value: int


@dataclass(frozen=True)
class Sym:
    name: str


@dataclass(frozen=True)
class Unary:
    op: str
    arg: Expr


@dataclass(frozen=True)
class Binary:
    op: str
    left: Expr
    right: Expr


Expr = Union[Num, Sym, Unary, Binary]

_TOKEN = re.compile(
    r"\s*(?:(?P<num>0[xX][0-9a-fA-F]+|0[bB][01]+|\d+)|(?P<id>[A-Za-z_.$][\w.$]*)"
    r"|(?P<op><<|>>|[-+*/%&|^~()]))"
)
# GNU as precedence, lowest first (not C's: `a + b & c` is `a + (b & c)`)
_BIN_LEVELS: Tuple[FrozenSet[str], ...] = (
    frozenset({"+", "-"}),
    frozenset({"&", "|", "^"}),
    frozenset({"*", "/", "%", "<<", ">>"}),
)
_BIN_OPS: Mapping[str, Callable[[int, int], int]] = MappingProxyType(
    {
        "+": lambda x, y: x + y,
        "-": lambda x, y: x - y,
        "*": lambda x, y: x * y,
        "<<": lambda x, y: x << y,
        ">>": lambda x, y: x >> y,
        "&": lambda x, y: x & y,
        "|": lambda x, y: x | y,
        "^": lambda x, y: x ^ y,
    }
)


def _tokenize(text: str) -> List[Tuple[str, str]]:
    out: List[Tuple[str, str]] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise AsmError(f"cannot parse expression {text!r} at {text[pos:]!r}")
        pos = m.end()
        kind = m.lastgroup
        assert kind is not None
        out.append((kind, m.group(kind)))
    return out


class _ExprParser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.pos = 0

    def parse(self) -> Expr:
        if not self.tokens:
            raise AsmError("empty expression")
        node = self._level(0)
        if self.pos != len(self.tokens):
            raise AsmError(f"unexpected {self.tokens[self.pos][1]!r} in {self.text!r}")
        return node

    def _peek(self) -> Optional[Tuple[str, str]]:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _level(self, level: int) -> Expr:
        if level == len(_BIN_LEVELS):
            return self._unary()
        node = self._level(level + 1)
        while True:
            tok = self._peek()
            if tok is None or tok[0] != "op" or tok[1] not in _BIN_LEVELS[level]:
                return node
            self.pos += 1
            node = Binary(tok[1], node, self._level(level + 1))

    def _unary(self) -> Expr:
        tok = self._peek()
        if tok is None:
            raise AsmError(f"expression {self.text!r} ends early")
        self.pos += 1
        kind, text = tok
        if kind == "num":
            return Num(int(text, 0))
        if kind == "id":
            return Sym(text)
        if text == "(":
            node = self._level(0)
            if self._peek() != ("op", ")"):
                raise AsmError(f"missing ')' in {self.text!r}")
            self.pos += 1
            return node
        if text in ("-", "~", "+"):
            return Unary(text, self._unary())
        raise AsmError(f"unexpected {text!r} in {self.text!r}")


def _parse_expr(text: str) -> Expr:
    return _ExprParser(text).parse()


def _symbols_of(node: Expr) -> List[str]:
    if isinstance(node, Sym):
        return [node.name]
    if isinstance(node, Unary):
        return _symbols_of(node.arg)
    if isinstance(node, Binary):
        return _symbols_of(node.left) + _symbols_of(node.right)
    return []


def _eval(node: Expr, lookup: Callable[[str], int]) -> int:
    if isinstance(node, Num):
        return node.value
    if isinstance(node, Sym):
        return lookup(node.name)
    if isinstance(node, Unary):
        val = _eval(node.arg, lookup)
        return {"-": -val, "~": ~val, "+": val}[node.op]
    a = _eval(node.left, lookup)
    b = _eval(node.right, lookup)
    if node.op in ("/", "%"):
        if b == 0:
            raise AsmError("division by zero")
        if a < 0 or b < 0:
            raise AsmError("division of negative numbers is not portable between assemblers")
        return a // b if node.op == "/" else a % b
    return _BIN_OPS[node.op](a, b)


# --------------------------------------------------------------------------- operands


@dataclass(frozen=True)
class Imm:
    expr: Expr
    offset: bool = False  # written as ``offset EXPR``


@dataclass(frozen=True)
class Mem:
    size: Optional[int]
    seg: Optional[Reg]
    base: Optional[Reg]
    index: Optional[Reg]
    scale: int
    disp: Optional[Expr]


@dataclass(frozen=True)
class Far:
    selector: Expr
    offset: Expr


Operand = Union[Reg, Imm, Mem, Far]


def _split_operands(text: str) -> List[str]:
    parts: List[str] = []
    depth = 0
    cur = ""
    for ch in text:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return parts


def _split_terms(inner: str) -> List[Tuple[str, str]]:
    """Split ``a + b*4 - c`` into signed terms at parenthesis depth 0."""
    terms: List[Tuple[str, str]] = []
    depth = 0
    sign = "+"
    cur = ""
    for ch in inner:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch in "+-" and depth == 0 and cur.strip():
            terms.append((sign, cur.strip()))
            sign = ch
            cur = ""
        elif ch in "+-" and depth == 0 and not cur.strip():
            sign = "-" if (sign == "-") != (ch == "-") else "+"
        else:
            cur += ch
    if cur.strip():
        terms.append((sign, cur.strip()))
    return terms


def _parse_mem(size: Optional[int], seg: Optional[Reg], inner: str) -> Mem:
    base: Optional[Reg] = None
    index: Optional[Reg] = None
    scale = 1
    disp_parts: List[str] = []
    for sign, term in _split_terms(inner):
        pieces = [p.strip() for p in term.split("*")]
        regs = [p for p in pieces if p.lower() in REGISTERS]
        if not regs:
            disp_parts.append(f"{sign} ({term})")
            continue
        if sign == "-":
            raise AsmError(f"a register cannot be subtracted in [{inner}]")
        reg = REGISTERS[regs[0].lower()]
        if reg.kind not in ("r16", "r32"):
            raise AsmError(f"{reg.name} cannot address memory")
        if len(pieces) == 1:
            if base is None:
                base = reg
            elif index is None:
                index = reg
            else:
                raise AsmError(f"too many registers in [{inner}]")
        elif len(pieces) == 2 and len(regs) == 1:
            other = pieces[1] if pieces[0] == regs[0] else pieces[0]
            scale = int(other, 0)
            if scale not in (1, 2, 4, 8):
                raise AsmError(f"scale {scale} is not 1, 2, 4 or 8")
            if index is not None:
                raise AsmError(f"two index registers in [{inner}]")
            index = reg
        else:
            raise AsmError(f"cannot parse [{inner}]")
    disp = _parse_expr(" ".join(disp_parts)) if disp_parts else None
    return Mem(size, seg, base, index, scale, disp)


def _parse_operand(text: str) -> Operand:
    text = text.strip()
    low = text.lower()
    size: Optional[int] = None
    m = re.match(r"(byte|word|dword)\s+ptr\s+(.*)$", text, re.I)
    if m:
        size = _SIZE_WORDS[m.group(1).lower()]
        text = m.group(2).strip()
        low = text.lower()
    if low in REGISTERS:
        reg = REGISTERS[low]
        if size is not None and size != reg.size:
            raise AsmError(f"{reg.name} is not a {size}-bit register")
        return reg
    if low.startswith("offset "):
        return Imm(_parse_expr(text[7:]), offset=True)
    m = re.match(r"([a-z]{2})\s*:\s*\[(.*)\]$", text, re.I)
    if m and m.group(1).lower() in _SEG_PREFIX:
        return _parse_mem(size, REGISTERS[m.group(1).lower()], m.group(2))
    if text.startswith("[") and text.endswith("]"):
        return _parse_mem(size, None, text[1:-1])
    if ":" in text:
        if size is not None:
            raise AsmError("a far pointer takes the size of the current mode")
        sel, off = text.split(":", 1)
        return Far(_parse_expr(sel), _parse_expr(off))
    return Imm(_parse_expr(text))


# --------------------------------------------------------------------------- statements


@dataclass
class _Stmt:
    line: int
    text: str
    mnemonic: str
    operands: List[Operand]
    prefixes: Tuple[str, ...]
    bits: int
    raw_args: str = ""
    long_jump: bool = False
    address: int = 0
    size: int = 0


class _Ctx:
    """What an encoder needs: the mode, the address, and symbol lookup."""

    def __init__(
        self,
        bits: int,
        address: int,
        labels: Mapping[str, int],
        equates: Mapping[str, int],
        final: bool,
    ) -> None:
        self.bits = bits
        self.address = address
        self.labels = labels
        self.equates = equates
        self.final = final

    def value(self, expr: Expr) -> int:
        def lookup(name: str) -> int:
            if name in self.equates:
                return self.equates[name]
            if name in self.labels:
                return self.labels[name]
            if self.final:
                raise AsmError(f"undefined symbol {name!r}")
            return 0

        return _eval(expr, lookup)

    def relocatable(self, expr: Optional[Expr]) -> bool:
        """True when the value depends on a label (so its field is full size)."""
        if expr is None:
            return False
        return any(name not in self.equates for name in _symbols_of(expr))


def _fits_s8(value: int) -> bool:
    return -128 <= value <= 127


def _pack_int(value: int, size: int, what: str = "value") -> bytes:
    bits = size * 8
    if not -(1 << (bits - 1)) <= value < (1 << bits):
        raise AsmError(f"{what} {value:#x} does not fit in {bits} bits")
    return (value & ((1 << bits) - 1)).to_bytes(size, "little")


def _sext(value: int, bits: int) -> int:
    """``value`` truncated to ``bits`` and sign-extended (how the CPU sees an immediate)."""
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


class _Enc:
    """One instruction being built: prefixes, opcode, ModRM/SIB/displacement, immediate."""

    def __init__(self, ctx: _Ctx) -> None:
        self.ctx = ctx
        self.seg: Optional[int] = None
        self.addr32: Optional[bool] = None
        self.opsize: Optional[int] = None
        self.lock = False
        self.rep = False
        self.body = bytearray()

    def operand_size(self, size: int) -> None:
        if size in (16, 32):
            self.opsize = size

    def modrm(self, reg_field: int, rm: Operand) -> bytes:
        if isinstance(rm, Reg):
            return bytes([0xC0 | (reg_field << 3) | rm.num])
        if not isinstance(rm, Mem):
            raise AsmError("expected a register or memory operand")
        return self._mem(reg_field, rm)

    def _address_size(self, mem: Mem) -> int:
        kinds = {r.kind for r in (mem.base, mem.index) if r is not None}
        if len(kinds) > 1:
            raise AsmError("mixed 16- and 32-bit address registers")
        if not kinds:
            return self.ctx.bits
        return 32 if kinds == {"r32"} else 16

    def _segment(self, mem: Mem, stack_based: bool) -> None:
        if mem.seg is None:
            return
        default = "ss" if stack_based else "ds"
        if mem.seg.name != default:
            self.seg = _SEG_PREFIX[mem.seg.name]

    def _mem(self, reg_field: int, mem: Mem) -> bytes:
        asize = self._address_size(mem)
        self.addr32 = asize == 32
        reloc = self.ctx.relocatable(mem.disp)
        disp = self.ctx.value(mem.disp) if mem.disp is not None else 0
        if asize == 16:
            return self._mem16(reg_field, mem, disp, reloc)
        return self._mem32(reg_field, mem, disp, reloc)

    def _mem16(self, reg_field: int, mem: Mem, disp: int, reloc: bool) -> bytes:
        if mem.scale != 1:
            raise AsmError("16-bit addressing has no scale")
        regs = frozenset(r.name for r in (mem.base, mem.index) if r is not None)
        table = {
            frozenset({"bx", "si"}): 0,
            frozenset({"bx", "di"}): 1,
            frozenset({"bp", "si"}): 2,
            frozenset({"bp", "di"}): 3,
            frozenset({"si"}): 4,
            frozenset({"di"}): 5,
            frozenset({"bp"}): 6,
            frozenset({"bx"}): 7,
        }
        self._segment(mem, "bp" in regs)
        if not regs:
            return bytes([(reg_field << 3) | 6]) + _pack_int(disp, 2, "displacement")
        if regs not in table:
            raise AsmError(f"invalid 16-bit address {'+'.join(sorted(regs))}")
        rm = table[regs]
        if reloc or not _fits_s8(disp):
            return bytes([0x80 | (reg_field << 3) | rm]) + _pack_int(disp, 2, "displacement")
        if disp == 0 and rm != 6:
            return bytes([(reg_field << 3) | rm])
        return bytes([0x40 | (reg_field << 3) | rm]) + _pack_int(disp, 1)

    def _mem32(self, reg_field: int, mem: Mem, disp: int, reloc: bool) -> bytes:
        base, index, scale = mem.base, mem.index, mem.scale
        if index is not None and index.name == "esp":
            if scale != 1 or base is None or base.name == "esp":
                raise AsmError("esp cannot be an index register")
            base, index = index, base
        self._segment(mem, base is not None and base.name in ("esp", "ebp"))
        disp32 = _pack_int(disp, 4, "displacement")
        if base is None and index is None:
            return bytes([(reg_field << 3) | 5]) + disp32
        if base is None:
            assert index is not None
            sib = (scale.bit_length() - 1) << 6 | index.num << 3 | 5
            return bytes([(reg_field << 3) | 4, sib]) + disp32
        if reloc or not _fits_s8(disp):
            mod, tail = 2, disp32
        elif disp == 0 and base.name != "ebp":
            mod, tail = 0, b""
        else:
            mod, tail = 1, _pack_int(disp, 1)
        if index is None and base.name != "esp":
            return bytes([mod << 6 | reg_field << 3 | base.num]) + tail
        idx = 4 if index is None else index.num
        sib = (scale.bit_length() - 1) << 6 | idx << 3 | base.num
        return bytes([mod << 6 | reg_field << 3 | 4, sib]) + tail

    def imm(self, expr: Expr, size_bits: int) -> bytes:
        return _pack_int(self.ctx.value(expr), size_bits // 8, "immediate")

    def finish(self) -> bytes:
        out = bytearray()
        if self.seg is not None:
            out.append(self.seg)
        if self.addr32 is not None and self.addr32 != (self.ctx.bits == 32):
            out.append(0x67)
        if self.opsize is not None and self.opsize != self.ctx.bits:
            out.append(0x66)
        if self.rep:
            out.append(0xF3)
        if self.lock:
            out.append(0xF0)
        return bytes(out + self.body)


# --------------------------------------------------------------------------- instruction encoders

_ALU = MappingProxyType(
    {"add": 0, "or": 1, "adc": 2, "sbb": 3, "and": 4, "sub": 5, "xor": 6, "cmp": 7}
)
_SHIFT = MappingProxyType(
    {"rol": 0, "ror": 1, "rcl": 2, "rcr": 3, "shl": 4, "sal": 4, "shr": 5, "sar": 7}
)
_GROUP3 = MappingProxyType({"not": 2, "neg": 3, "mul": 4, "div": 6})
_CC = MappingProxyType(
    {
        "o": 0, "no": 1, "b": 2, "c": 2, "nae": 2, "ae": 3, "nb": 3, "nc": 3,
        "e": 4, "z": 4, "ne": 5, "nz": 5, "be": 6, "na": 6, "a": 7, "nbe": 7,
        "s": 8, "ns": 9, "p": 10, "pe": 10, "np": 11, "po": 11,
        "l": 12, "nge": 12, "ge": 13, "nl": 13, "le": 14, "ng": 14, "g": 15, "nle": 15,
    }
)  # fmt: skip
_FIXED = MappingProxyType(
    {
        "hlt": b"\xf4", "cli": b"\xfa", "sti": b"\xfb", "cld": b"\xfc", "std": b"\xfd",
        "nop": b"\x90", "pause": b"\xf3\x90", "rdmsr": b"\x0f\x32", "wrmsr": b"\x0f\x30",
        "rdtsc": b"\x0f\x31", "cpuid": b"\x0f\xa2", "ret": b"\xc3", "int3": b"\xcc",
        "clc": b"\xf8", "stc": b"\xf9", "lodsb": b"\xac", "stosb": b"\xaa",
    }
)  # fmt: skip
# instructions whose only difference between 16 and 32 bits is the operand size prefix
_SIZED_FIXED = MappingProxyType(
    {
        "iret": (b"\xcf", None), "iretd": (b"\xcf", 32), "pusha": (b"\x60", None),
        "pushad": (b"\x60", 32), "popa": (b"\x61", None), "popad": (b"\x61", 32),
        "pushf": (b"\x9c", None), "pushfd": (b"\x9c", 32), "popf": (b"\x9d", None),
        "popfd": (b"\x9d", 32), "lodsd": (b"\xad", 32), "stosd": (b"\xab", 32),
    }
)  # fmt: skip
_SREG_PUSH = MappingProxyType(
    {"es": (b"\x06", b"\x07"), "cs": (b"\x0e", None), "ss": (b"\x16", b"\x17"),
     "ds": (b"\x1e", b"\x1f"), "fs": (b"\x0f\xa0", b"\x0f\xa1"), "gs": (b"\x0f\xa8", b"\x0f\xa9")}
)  # fmt: skip


def _size_of(ops: Sequence[Operand], *, default: Optional[int] = None) -> int:
    """The operand size shared by ``ops`` (registers and ``ptr`` hints must agree)."""
    sizes = set()
    for op in ops:
        if isinstance(op, Reg) and op.kind in ("r8", "r16", "r32"):
            sizes.add(op.size)
        if isinstance(op, Mem) and op.size is not None:
            sizes.add(op.size)
    if len(sizes) > 1:
        raise AsmError(f"operand sizes disagree: {sorted(sizes)}")
    if not sizes:
        if default is None:
            raise AsmError("operand size is ambiguous; add byte/word/dword ptr")
        return default
    return sizes.pop()


def _is_gpr(op: Operand) -> bool:
    return isinstance(op, Reg) and op.kind in ("r8", "r16", "r32")


def _is_rm(op: Operand) -> bool:
    return _is_gpr(op) or isinstance(op, Mem)


def _imm_fits_s8(enc: _Enc, imm: Imm, size: int) -> bool:
    if enc.ctx.relocatable(imm.expr):
        return False
    value = enc.ctx.value(imm.expr)
    if not -(1 << (size - 1)) <= value < (1 << size):
        raise AsmError(f"immediate {value:#x} does not fit in {size} bits")
    return _fits_s8(_sext(value, size))


def _imm_bytes(enc: _Enc, imm: Imm, size: int) -> bytes:
    return enc.imm(imm.expr, size)


def _enc_reg_rm(enc: _Enc, ops: Sequence[Operand], to_rm: int, to_reg: int, mn: str) -> None:
    """The register forms of a two-operand instruction: opcode ``to_rm`` for "r/m, reg" and
    ``to_reg`` for "reg, memory", each followed by its ModRM byte."""
    dst, src = ops
    if _is_gpr(src) and _is_rm(dst):
        assert isinstance(src, Reg)
        enc.body += bytes([to_rm]) + enc.modrm(src.num, dst)
    elif _is_gpr(dst) and isinstance(src, Mem):
        assert isinstance(dst, Reg)
        enc.body += bytes([to_reg]) + enc.modrm(dst.num, src)
    else:
        raise AsmError(f"unsupported operands for {mn}")


def _enc_alu(enc: _Enc, mn: str, ops: Sequence[Operand]) -> None:
    code = _ALU[mn]
    dst, src = ops
    size = _size_of(ops)
    enc.operand_size(size)
    w = 0 if size == 8 else 1
    if isinstance(src, Imm):
        if not _is_rm(dst):
            raise AsmError(f"{mn} needs a register or memory destination")
        if size != 8 and _imm_fits_s8(enc, src, size):
            enc.body += bytes([0x83]) + enc.modrm(code, dst)
            enc.body += _pack_int(_sext(enc.ctx.value(src.expr), size), 1)
        elif isinstance(dst, Reg) and dst.num == 0:
            enc.body += bytes([code << 3 | 4 | w]) + _imm_bytes(enc, src, size)
        else:
            enc.body += bytes([0x80 | w]) + enc.modrm(code, dst) + _imm_bytes(enc, src, size)
    else:
        _enc_reg_rm(enc, ops, code << 3 | w, code << 3 | 2 | w, mn)


def _enc_test(enc: _Enc, ops: Sequence[Operand]) -> None:
    dst, src = ops
    size = _size_of(ops)
    enc.operand_size(size)
    w = 0 if size == 8 else 1
    if isinstance(src, Imm):
        if isinstance(dst, Reg) and dst.num == 0:
            enc.body += bytes([0xA8 | w]) + _imm_bytes(enc, src, size)
        else:
            enc.body += bytes([0xF6 | w]) + enc.modrm(0, dst) + _imm_bytes(enc, src, size)
    else:
        _enc_reg_rm(enc, ops, 0x84 | w, 0x84 | w, "test")


def _moffs(mem: Mem) -> bool:
    return mem.base is None and mem.index is None


def _enc_moffs(enc: _Enc, mem: Mem, opcode: int) -> None:
    """``opcode`` (mov between the accumulator and a bare address) and that address."""
    enc._segment(mem, False)
    asize = enc._address_size(mem)
    enc.addr32 = asize == 32
    enc.body += bytes([opcode])
    enc.body += _pack_int(enc.ctx.value(mem.disp or Num(0)), asize // 8, "address")


def _enc_mov(enc: _Enc, ops: Sequence[Operand]) -> None:
    dst, src = ops
    if isinstance(dst, Reg) and dst.kind == "cr":
        if not (isinstance(src, Reg) and src.kind == "r32"):
            raise AsmError("mov to a control register needs a 32-bit register")
        enc.body += bytes([0x0F, 0x22, 0xC0 | dst.num << 3 | src.num])
        return
    if isinstance(src, Reg) and src.kind == "cr":
        if not (isinstance(dst, Reg) and dst.kind == "r32"):
            raise AsmError("mov from a control register needs a 32-bit register")
        enc.body += bytes([0x0F, 0x20, 0xC0 | src.num << 3 | dst.num])
        return
    if isinstance(dst, Reg) and dst.kind == "sreg":
        if isinstance(src, Mem) and src.size not in (None, 16):
            raise AsmError("a segment register is loaded from a word")
        if not (isinstance(src, Mem) or (isinstance(src, Reg) and src.kind == "r16")):
            raise AsmError("mov to a segment register needs a 16-bit register or memory")
        enc.body += b"\x8e" + enc.modrm(dst.num, src)
        return
    if isinstance(src, Reg) and src.kind == "sreg":
        if _is_gpr(dst):
            assert isinstance(dst, Reg)
            if dst.kind == "r8":
                raise AsmError("a segment register does not fit in a byte register")
            enc.operand_size(dst.size)
        elif isinstance(dst, Mem) and dst.size not in (None, 16):
            raise AsmError("a segment register is stored as a word")
        enc.body += b"\x8c" + enc.modrm(src.num, dst)
        return
    size = _size_of(ops)
    enc.operand_size(size)
    w = 0 if size == 8 else 1
    if isinstance(src, Imm):
        if isinstance(dst, Reg):
            enc.body += bytes([(0xB0 if size == 8 else 0xB8) | dst.num])
            enc.body += _imm_bytes(enc, src, size)
        elif isinstance(dst, Mem):
            enc.body += bytes([0xC6 | w]) + enc.modrm(0, dst) + _imm_bytes(enc, src, size)
        else:
            raise AsmError("unsupported destination for mov")
    elif isinstance(dst, Reg) and dst.num == 0 and isinstance(src, Mem) and _moffs(src):
        _enc_moffs(enc, src, 0xA0 | w)
    elif isinstance(src, Reg) and src.num == 0 and isinstance(dst, Mem) and _moffs(dst):
        _enc_moffs(enc, dst, 0xA2 | w)
    else:
        _enc_reg_rm(enc, ops, 0x88 | w, 0x8A | w, "mov")


def _enc_movzx(enc: _Enc, ops: Sequence[Operand]) -> None:
    dst, src = ops
    if not (isinstance(dst, Reg) and dst.kind in ("r16", "r32")):
        raise AsmError("movzx needs a 16- or 32-bit register destination")
    src_size = src.size if isinstance(src, (Reg, Mem)) else None
    if src_size is None:
        raise AsmError("movzx needs byte ptr or word ptr")
    if src_size not in (8, 16) or src_size >= dst.size:
        raise AsmError("movzx widens a byte or a word")
    enc.operand_size(dst.size)
    enc.body += bytes([0x0F, 0xB6 if src_size == 8 else 0xB7]) + enc.modrm(dst.num, src)


def _enc_shift(enc: _Enc, mn: str, ops: Sequence[Operand]) -> None:
    dst, count = ops
    size = _size_of([dst])
    enc.operand_size(size)
    w = 0 if size == 8 else 1
    code = _SHIFT[mn]
    if isinstance(count, Reg) and count.name == "cl":
        enc.body += bytes([0xD2 | w]) + enc.modrm(code, dst)
    elif isinstance(count, Imm):
        value = enc.ctx.value(count.expr)
        if value == 1 and not enc.ctx.relocatable(count.expr):
            enc.body += bytes([0xD0 | w]) + enc.modrm(code, dst)
        else:
            enc.body += bytes([0xC0 | w]) + enc.modrm(code, dst) + _pack_int(value, 1, "count")
    else:
        raise AsmError(f"{mn} counts in cl or an immediate")


def _enc_incdec(enc: _Enc, mn: str, ops: Sequence[Operand]) -> None:
    (dst,) = ops
    size = _size_of(ops)
    enc.operand_size(size)
    code = 0 if mn == "inc" else 1
    if isinstance(dst, Reg) and size != 8:
        enc.body += bytes([(0x40 if mn == "inc" else 0x48) | dst.num])
    else:
        enc.body += bytes([0xFE if size == 8 else 0xFF]) + enc.modrm(code, dst)


def _enc_push_pop(enc: _Enc, mn: str, ops: Sequence[Operand]) -> None:
    (op,) = ops
    push = mn == "push"
    if isinstance(op, Reg) and op.kind == "sreg":
        code = _SREG_PUSH[op.name][0 if push else 1]
        if code is None:
            raise AsmError("pop cs does not exist")
        enc.body += code
        return
    if isinstance(op, Reg) and op.kind in ("r16", "r32"):
        enc.operand_size(op.size)
        enc.body += bytes([(0x50 if push else 0x58) | op.num])
        return
    if isinstance(op, Imm) and push:
        if _imm_fits_s8(enc, op, enc.ctx.bits):
            enc.body += bytes([0x6A]) + _pack_int(_sext(enc.ctx.value(op.expr), enc.ctx.bits), 1)
        else:
            enc.body += b"\x68" + _imm_bytes(enc, op, enc.ctx.bits)
        return
    if isinstance(op, Mem):
        size = _size_of(ops)
        if size == 8:
            raise AsmError(f"{mn} of a byte")
        enc.operand_size(size)
        enc.body += (b"\xff" + enc.modrm(6, op)) if push else (b"\x8f" + enc.modrm(0, op))
        return
    raise AsmError(f"unsupported operand for {mn}")


def _enc_xchg_like(enc: _Enc, mn: str, ops: Sequence[Operand]) -> None:
    dst, src = ops
    size = _size_of(ops)
    enc.operand_size(size)
    w = 0 if size == 8 else 1
    if mn == "xchg":
        if _is_gpr(dst) and _is_gpr(src) and size != 8:
            assert isinstance(dst, Reg) and isinstance(src, Reg)
            if dst.num == 0 or src.num == 0:
                enc.body += bytes([0x90 | (src.num if dst.num == 0 else dst.num)])
                return
        if isinstance(dst, Reg) and isinstance(src, Mem):
            dst, src = src, dst
        if not (isinstance(src, Reg) and _is_rm(dst)):
            raise AsmError("unsupported operands for xchg")
        enc.body += bytes([0x86 | w]) + enc.modrm(src.num, dst)
        return
    if not (isinstance(src, Reg) and _is_gpr(src) and _is_rm(dst)):
        raise AsmError(f"{mn} takes r/m, reg")
    opcode = {"xadd": 0xC0, "cmpxchg": 0xB0}[mn] | w
    enc.body += bytes([0x0F, opcode]) + enc.modrm(src.num, dst)


def _enc_lea(enc: _Enc, ops: Sequence[Operand]) -> None:
    dst, src = ops
    if not (isinstance(dst, Reg) and dst.kind in ("r16", "r32") and isinstance(src, Mem)):
        raise AsmError("lea takes a 16/32-bit register and a memory operand")
    enc.operand_size(dst.size)
    enc.body += b"\x8d" + enc.modrm(dst.num, src)


def _enc_io(enc: _Enc, mn: str, ops: Sequence[Operand]) -> None:
    if mn == "out":
        port, data = ops
    else:
        data, port = ops
    if not (isinstance(data, Reg) and data.kind in ("r8", "r16", "r32") and data.num == 0):
        raise AsmError(f"{mn} transfers al, ax or eax")
    enc.operand_size(data.size)
    w = 0 if data.size == 8 else 1
    base = 0xE6 if mn == "out" else 0xE4
    if isinstance(port, Reg) and port.name == "dx":
        enc.body += bytes([(base | 8) | w])
    elif isinstance(port, Imm):
        enc.body += bytes([base | w]) + _pack_int(enc.ctx.value(port.expr), 1, "port")
    else:
        raise AsmError(f"{mn} port is dx or an 8-bit immediate")


def _enc_group3(enc: _Enc, mn: str, ops: Sequence[Operand]) -> None:
    (dst,) = ops
    size = _size_of(ops)
    enc.operand_size(size)
    enc.body += bytes([0xF6 if size == 8 else 0xF7]) + enc.modrm(_GROUP3[mn], dst)


def _enc_descriptor_table(enc: _Enc, mn: str, ops: Sequence[Operand]) -> None:
    (mem,) = ops
    if not isinstance(mem, Mem):
        raise AsmError(f"{mn} takes a memory operand")
    enc.body += b"\x0f\x01" + enc.modrm(2 if mn == "lgdt" else 3, mem)


def _enc_int(enc: _Enc, ops: Sequence[Operand]) -> None:
    (vec,) = ops
    if not isinstance(vec, Imm):
        raise AsmError("int takes an immediate")
    value = enc.ctx.value(vec.expr)
    enc.body += b"\xcc" if value == 3 else b"\xcd" + _pack_int(value, 1, "vector")


def _enc_far_jmp(enc: _Enc, far: Far) -> None:
    enc.body += b"\xea" + enc.imm(far.offset, enc.ctx.bits) + enc.imm(far.selector, 16)


def _branch_target(ctx: _Ctx, ops: Sequence[Operand], mn: str) -> int:
    if len(ops) != 1 or not isinstance(ops[0], Imm):
        raise AsmError(f"{mn} takes a label")
    if not ctx.relocatable(ops[0].expr):
        raise AsmError(f"{mn} to an absolute address is not supported; use a label")
    return ctx.value(ops[0].expr)


def _enc_branch(stmt: _Stmt, ctx: _Ctx) -> bytes:
    mn = stmt.mnemonic
    ops = stmt.operands
    if mn == "jmp" and len(ops) == 1 and isinstance(ops[0], Far):
        enc = _Enc(ctx)
        _enc_far_jmp(enc, ops[0])
        return enc.finish()
    target = _branch_target(ctx, ops, mn)
    width = ctx.bits // 8
    if mn == "call":
        return b"\xe8" + _rel(target, ctx.address + 1 + width, width, ctx)
    cc = _CC.get(mn[1:]) if mn != "jmp" else None
    if not stmt.long_jump:
        rel = target - (ctx.address + 2)
        opcode = 0xEB if cc is None else 0x70 | cc
        if ctx.final and not _fits_s8(rel):
            raise AsmError("internal error: short jump out of range after relaxation")
        return bytes([opcode, rel & 0xFF])
    if cc is None:
        return b"\xe9" + _rel(target, ctx.address + 1 + width, width, ctx)
    return bytes([0x0F, 0x80 | cc]) + _rel(target, ctx.address + 2 + width, width, ctx)


def _rel(target: int, next_ip: int, width: int, ctx: _Ctx) -> bytes:
    rel = target - next_ip
    if not ctx.final:
        return bytes(width)
    return _pack_int(_sext(rel, width * 8), width, "branch displacement")


def _is_branch(mn: str) -> bool:
    return mn in ("jmp", "call") or (mn.startswith("j") and mn[1:] in _CC)


_Encoder = Callable[[_Enc, str, Sequence[Operand]], None]
_TABLE: Mapping[str, _Encoder] = MappingProxyType(
    {
        **{mn: _enc_alu for mn in _ALU},
        **{mn: _enc_shift for mn in _SHIFT},
        **{mn: _enc_group3 for mn in _GROUP3},
        "test": lambda e, mn, ops: _enc_test(e, ops),
        "mov": lambda e, mn, ops: _enc_mov(e, ops),
        "movzx": lambda e, mn, ops: _enc_movzx(e, ops),
        "inc": _enc_incdec,
        "dec": _enc_incdec,
        "push": _enc_push_pop,
        "pop": _enc_push_pop,
        "xchg": _enc_xchg_like,
        "xadd": _enc_xchg_like,
        "cmpxchg": _enc_xchg_like,
        "lea": lambda e, mn, ops: _enc_lea(e, ops),
        "in": _enc_io,
        "out": _enc_io,
        "lgdt": _enc_descriptor_table,
        "lidt": _enc_descriptor_table,
        "int": lambda e, mn, ops: _enc_int(e, ops),
    }
)

#: every mnemonic this assembler accepts
MNEMONICS: FrozenSet[str] = frozenset(
    set(_TABLE) | set(_FIXED) | set(_SIZED_FIXED) | {"jmp", "call"} | {"j" + cc for cc in _CC}
)


def _encode_insn(stmt: _Stmt, ctx: _Ctx) -> bytes:
    mn = stmt.mnemonic
    if _is_branch(mn):
        if stmt.prefixes:
            raise AsmError(f"prefix on {mn}")
        return _enc_branch(stmt, ctx)
    enc = _Enc(ctx)
    for prefix in stmt.prefixes:
        if prefix == "lock":
            enc.lock = True
        elif prefix == "rep":
            enc.rep = True
    if mn in _FIXED:
        if stmt.operands:
            raise AsmError(f"{mn} takes no operands")
        enc.body += _FIXED[mn]
        return enc.finish()
    if mn in _SIZED_FIXED:
        if stmt.operands:
            raise AsmError(f"{mn} takes no operands")
        code, size = _SIZED_FIXED[mn]
        enc.operand_size(size or ctx.bits)
        enc.body += code
        return enc.finish()
    encoder = _TABLE.get(mn)
    if encoder is None:
        raise AsmError(f"unknown instruction {mn!r}")
    for op in stmt.operands:
        if isinstance(op, Imm) and not op.offset and ctx.relocatable(op.expr):
            # GNU as reads a bare label as a memory operand; other assemblers
            # as an immediate. Refuse the ambiguity.
            raise AsmError("a bare label is ambiguous here: write `offset LABEL` or `[LABEL]`")
    expected = 1 if mn in ("inc", "dec", "push", "pop", "lgdt", "lidt", "int", *_GROUP3) else 2
    if len(stmt.operands) != expected:
        raise AsmError(f"{mn} takes {expected} operand(s)")
    encoder(enc, mn, stmt.operands)
    return enc.finish()


# --------------------------------------------------------------------------- directives


def _parse_string(text: str) -> bytes:
    text = text.strip()
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        raise AsmError(f"expected a quoted string, got {text!r}")
    out = bytearray()
    escapes = {"n": 10, "r": 13, "t": 9, "\\": 92, '"': 34, "0": 0}
    i = 1
    while i < len(text) - 1:
        ch = text[i]
        if ch == "\\":
            i += 1
            esc = text[i]
            if esc not in escapes:
                raise AsmError(f"unsupported escape \\{esc}")
            out.append(escapes[esc])
        else:
            out += ch.encode("ascii")
        i += 1
    return bytes(out)


_DATA_SIZES = MappingProxyType({".byte": 1, ".word": 2, ".long": 4, ".quad": 8})


def _encode_directive(stmt: _Stmt, ctx: _Ctx, origin: int) -> bytes:
    name = stmt.mnemonic
    args = _split_operands(stmt.raw_args)
    if name in _DATA_SIZES:
        width = _DATA_SIZES[name]
        return b"".join(_pack_int(ctx.value(_parse_expr(a)), width) for a in args)
    if name in (".ascii", ".asciz"):
        data = b"".join(_parse_string(a) for a in args)
        return data + (b"\0" if name == ".asciz" else b"")
    if name in (".balign", ".org", ".space"):
        if len(args) != 2:
            raise AsmError(f"{name} needs an explicit fill byte here (`{name} value, fill`)")
        value = ctx.value(_parse_expr(args[0]))
        fill = ctx.value(_parse_expr(args[1]))
        if name == ".balign":
            if value <= 0 or value & (value - 1):
                raise AsmError(".balign needs a power of two")
            count = -ctx.address % value
        elif name == ".org":
            count = origin + value - ctx.address
            if count < 0:
                raise AsmError(f".org {value:#x} moves backwards")
        else:
            count = value
        return _pack_int(fill, 1, "fill") * count
    raise AsmError(f"unknown directive {name}")


# --------------------------------------------------------------------------- driver

_LABEL = re.compile(r"^\s*([A-Za-z_.$][\w.$]*)\s*:(?!\s*\[)")
_EQU = re.compile(r"^\s*([A-Za-z_.$][\w.$]*)\s*=\s*(.+)$")
_IGNORED = frozenset({".intel_syntax", ".text"})


def _parse(
    source: str, bits: int, equates: Dict[str, int], label_names: List[str]
) -> List[Tuple[Optional[str], Optional[_Stmt]]]:
    """Lines to (label, statement) pairs; evaluates equates in order."""
    items: List[Tuple[Optional[str], Optional[_Stmt]]] = []
    for lineno, raw in enumerate(source.splitlines(), 1):
        text = raw.split("#", 1)[0].strip()
        if ";" in text:
            raise AsmError("';' separates statements in GNU as; use one per line", lineno, raw)
        try:
            while True:
                m = _LABEL.match(text)
                if not m or m.group(1).lower() in REGISTERS:
                    break
                label = m.group(1)
                if label in label_names or label in equates:
                    raise AsmError(f"symbol {label!r} defined twice")
                label_names.append(label)
                items.append((label, None))
                text = text[m.end() :].strip()
            if not text:
                continue
            m = _EQU.match(text)
            if m:
                _define(m.group(1), m.group(2), equates, label_names)
                continue
            word, _, rest = text.partition(" ")
            word = word.lower()
            rest = rest.strip()
            if word == ".equ":
                name, _, value = rest.partition(",")
                _define(name.strip(), value, equates, label_names)
                continue
            if word in _IGNORED:
                continue
            if word in (".code16", ".code32"):
                bits = 16 if word == ".code16" else 32
                continue
            prefixes: List[str] = []
            while word in ("lock", "rep"):
                prefixes.append(word)
                word, _, rest = rest.partition(" ")
                word = word.lower()
                rest = rest.strip()
            if word.startswith("."):
                items.append((None, _Stmt(lineno, raw, word, [], (), bits, raw_args=rest)))
                continue
            operands: List[Operand] = []
            for part in _split_operands(rest):
                operands.append(_parse_operand(part))
            if word not in MNEMONICS:
                raise AsmError(f"unknown instruction {word!r}")
            items.append((None, _Stmt(lineno, raw, word, operands, tuple(prefixes), bits)))
        except AsmError as err:
            if err.line:
                raise
            raise AsmError(str(err), lineno, raw) from None
    return items


def _define(name: str, value: str, equates: Dict[str, int], labels: List[str]) -> None:
    if name in equates or name in labels:
        raise AsmError(f"symbol {name!r} defined twice")

    def lookup(sym: str) -> int:
        if sym not in equates:
            raise AsmError(
                f"equate {name!r} uses {sym!r}, which is not an equate defined before it"
            )
        return equates[sym]

    equates[name] = _eval(_parse_expr(value), lookup)


def assemble(
    source: str,
    *,
    origin: int = 0,
    bits: int = 16,
    defines: Optional[Mapping[str, int]] = None,
) -> Program:
    """Assemble ``source`` (GNU as Intel syntax subset) to be loaded at ``origin``.

    ``bits`` is the initial mode (``.code16``/``.code32`` switch it);
    ``defines`` are equates visible to the source, as if written at its top.
    """
    if bits not in (16, 32):
        raise ValueError("bits must be 16 or 32")
    equates: Dict[str, int] = dict(defines or {})
    label_names: List[str] = []
    items = _parse(source, bits, equates, label_names)
    for name in label_names:
        if name in equates:
            raise AsmError(f"symbol {name!r} is both a label and an equate")

    labels: Dict[str, int] = {}
    for attempt in range(1000):
        new_labels, grew = _layout(items, origin, labels, equates)
        stable = attempt > 0 and not grew and new_labels == labels
        labels = new_labels
        if stable:
            break
    else:  # pragma: no cover - relaxation only grows, so it always ends
        raise AsmError("branch relaxation did not converge")

    out = bytearray()
    for _label, stmt in items:
        if stmt is None:
            continue
        ctx = _Ctx(stmt.bits, stmt.address, labels, equates, final=True)
        out += _encode(stmt, ctx, origin)
    symbols = dict(equates)
    symbols.update(labels)
    return Program(origin, bytes(out), MappingProxyType(symbols))


def _encode(stmt: _Stmt, ctx: _Ctx, origin: int) -> bytes:
    try:
        if stmt.mnemonic.startswith("."):
            return _encode_directive(stmt, ctx, origin)
        return _encode_insn(stmt, ctx)
    except AsmError as err:
        if err.line:
            raise
        raise AsmError(str(err), stmt.line, stmt.text) from None


def _layout(
    items: Sequence[Tuple[Optional[str], Optional[_Stmt]]],
    origin: int,
    prev_labels: Mapping[str, int],
    equates: Mapping[str, int],
) -> Tuple[Dict[str, int], bool]:
    """One pass: place everything with the current jump sizes; grow short jumps out of range."""
    labels: Dict[str, int] = {}
    addr = origin
    for label, stmt in items:
        if label is not None:
            labels[label] = addr
            continue
        assert stmt is not None
        stmt.address = addr
        ctx = _Ctx(stmt.bits, addr, prev_labels, equates, final=False)
        stmt.size = len(_encode(stmt, ctx, origin))
        addr += stmt.size
    grew = False
    for _label, stmt in items:
        if stmt is None or stmt.long_jump or not _is_branch(stmt.mnemonic):
            continue
        if stmt.mnemonic == "call" or isinstance(stmt.operands[0], Far):
            continue
        ctx = _Ctx(stmt.bits, stmt.address, labels, equates, final=False)
        target = _branch_target(ctx, stmt.operands, stmt.mnemonic)
        if not _fits_s8(target - (stmt.address + 2)):
            stmt.long_jump = True
            grew = True
    return labels, grew
