"""A small TOML reader for campaign files that remembers the line of every key.

Why not :mod:`tomllib`: it exists only on Python 3.11+, serrinj supports 3.9,
and its result is a bare dict, so a semantic error found later (an unknown
key, a wrong type) could not say where it is. This parser reads a subset of
TOML 1.0 and returns the data together with the line of every key, table
header and array element.

The subset
----------
- comments (``#``), blank lines, LF or CRLF line ends, indentation;
- ``key = value`` with bare keys (``A-Za-z0-9_-``) or quoted keys
  (``"..."``, ``'...'``); key/value pairs before the first header go in the
  root table;
- tables ``[name]`` and arrays of tables ``[[name]]``, one key per header;
- values:

  - basic strings ``"..."`` with the escapes ``\\b \\t \\n \\f \\r \\" \\\\
    \\uXXXX \\UXXXXXXXX``, and literal strings ``'...'`` (no escapes);
  - integers: decimal with an optional sign, ``0x``/``0o``/``0b``, ``_``
    between digits;
  - floats: with a fraction and/or an exponent, ``inf`` and ``nan`` with an
    optional sign;
  - ``true`` and ``false``;
  - arrays ``[...]``, which may span lines and hold comments and a trailing
    comma;
  - inline tables ``{k = v, ...}`` on one line.

Anything else is refused with a :class:`TomlError` naming the line and the
column, with a clear message for the TOML features the subset leaves out:
multi-line strings, dates and times, dotted keys and dotted table headers.

Every document this parser accepts is valid TOML and parses to the same value
as :mod:`tomllib` (a property the test suite checks with hypothesis).
"""

from __future__ import annotations

import bisect
import math
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

from serrinj.errors import InvalidInput

__all__ = ["Document", "Path", "TomlError", "format_path", "load", "loadb", "loads"]

#: a key path: table keys are strings, array elements 0-based integers
Path = Tuple[Union[str, int], ...]

_WS = " \t"
_BARE_KEY = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
#: TOML forbids these in strings and comments: ASCII controls except tab, and DEL
_CONTROL = frozenset(chr(i) for i in range(0x20) if i != 0x09) | {"\x7f"}
_ESCAPES = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", '"': '"', "\\": "\\"}

_NUMBER = re.compile(
    r"0x[0-9A-Fa-f](?:_?[0-9A-Fa-f])*"
    r"|0o[0-7](?:_?[0-7])*"
    r"|0b[01](?:_?[01])*"
    r"|(?P<dec>[+-]?(?:0|[1-9](?:_?[0-9])*)"
    r"(?P<frac>\.[0-9](?:_?[0-9])*)?"
    r"(?P<exp>[eE][+-]?[0-9](?:_?[0-9])*)?)"
)
_SPECIAL_FLOAT = re.compile(r"[+-]?(?:inf|nan)")
_DATE_OR_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}|[0-9]{2}:[0-9]{2}")


class TomlError(InvalidInput):
    """A syntax error or a construct outside the subset, at ``line`` and ``column`` (1-based)."""

    def __init__(self, reason: str, line: int, column: int, source: Optional[str] = None) -> None:
        where = f"{source}:{line}:{column}" if source else f"line {line}, column {column}"
        super().__init__(f"{where}: {reason}")
        self.reason = reason
        self.line = line
        self.column = column
        self.source = source


@dataclass(frozen=True)
class Document:
    """Parsed TOML: ``data`` (plain dicts, lists and scalars) and where each key is.

    ``lines[path]`` is the line of the key (or table header, or array element)
    at ``path``, e.g. ``("steps", 2, "severity")`` for ``severity`` in the third
    ``[[steps]]`` table.
    """

    data: Dict[str, Any]
    lines: Mapping[Path, int]
    source: Optional[str] = None

    def line(self, path: Sequence[Union[str, int]]) -> int:
        """The line of ``path``, or of its nearest ancestor that has one (else 1)."""
        p = tuple(path)
        while p:
            found = self.lines.get(p)
            if found is not None:
                return found
            p = p[:-1]
        return 1


def format_path(path: Sequence[Union[str, int]]) -> str:
    """``("steps", 2, "vcpus", 0)`` as ``steps[3].vcpus[1]``: indices count from 1."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part + 1}]"
        else:
            text = part if part and all(c in _BARE_KEY for c in part) else _quote(part)
            out += f".{text}" if out else text
    return out


def _quote(key: str) -> str:
    return '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'


def loads(text: str, source: Optional[str] = None) -> Document:
    """Parse ``text``; ``source`` (a file name) prefixes error messages."""
    return _Parser(text, source).parse()


def load(path: str) -> Document:
    """Read and parse the UTF-8 file at ``path``."""
    with open(path, "rb") as f:
        raw = f.read()
    return loadb(raw, path)


def loadb(raw: bytes, path: str) -> Document:
    """Parse the UTF-8 bytes ``raw`` read from the file ``path``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise TomlError("the file is not valid UTF-8", line, column, path) from None
    return loads(text, path)


class _Parser:
    def __init__(self, text: str, source: Optional[str]) -> None:
        # CRLF counts as one line end; a lone CR is then a stray control character.
        self.s = text.replace("\r\n", "\n")
        self.n = len(self.s)
        self.pos = 0
        self.source = source
        self._line_starts = [0] + [i + 1 for i, c in enumerate(self.s) if c == "\n"]
        self.root: Dict[str, Any] = {}
        self.lines: Dict[Path, int] = {}
        self.arrays_of_tables: Set[str] = set()

    # ------------------------------------------------------------ positions
    def line_at(self, pos: int) -> int:
        return bisect.bisect_right(self._line_starts, pos)

    def error(self, reason: str, pos: Optional[int] = None) -> TomlError:
        p = self.pos if pos is None else pos
        line = self.line_at(p)
        return TomlError(reason, line, p - self._line_starts[line - 1] + 1, self.source)

    def peek(self, k: int = 0) -> str:
        i = self.pos + k
        return self.s[i] if i < self.n else ""

    def skip_ws(self) -> None:
        while self.pos < self.n and self.s[self.pos] in _WS:
            self.pos += 1

    def skip_comment(self) -> None:
        if self.peek() != "#":
            return
        while self.pos < self.n and self.s[self.pos] != "\n":
            if self.s[self.pos] in _CONTROL:
                raise self.error(f"control character {_describe(self.s[self.pos])} in a comment")
            self.pos += 1

    def end_of_line(self, what: str) -> None:
        self.skip_ws()
        self.skip_comment()
        c = self.peek()
        if c == "\n":
            self.pos += 1
        elif c:
            raise self.error(
                f"unexpected {_describe(c)} after {what}; expected the end of the line"
            )

    # ------------------------------------------------------------ document
    def parse(self) -> Document:
        table: Dict[str, Any] = self.root
        prefix: Path = ()
        while True:
            self.skip_ws()
            c = self.peek()
            if not c:
                break
            if c == "\n":
                self.pos += 1
            elif c == "#":
                self.skip_comment()
            elif c == "[":
                table, prefix = self.header()
                self.end_of_line("the table header")
            elif c in _BARE_KEY or c in "\"'":
                self.key_value(table, prefix)
                self.end_of_line("the value")
            else:
                raise self.error(
                    f"unexpected {_describe(c)}; expected a key, a [table] or a comment"
                )
        return Document(self.root, dict(self.lines), self.source)

    def header(self) -> Tuple[Dict[str, Any], Path]:
        start = self.pos
        line = self.line_at(start)
        array = self.s.startswith("[[", self.pos)
        self.pos += 2 if array else 1
        self.skip_ws()
        key = self.key()
        self.skip_ws()
        if self.peek() == ".":
            raise self.error(
                "nested table headers ([a.b]) are not supported in campaign files;"
                " use a top-level [table]"
            )
        close = "]]" if array else "]"
        if not self.s.startswith(close, self.pos):
            raise self.error(f"expected {close!r} to close the table header")
        self.pos += len(close)
        name = f"[[{key}]]" if array else f"[{key}]"
        if key in self.root:
            if array and key in self.arrays_of_tables:
                arr: List[Dict[str, Any]] = self.root[key]
                arr.append({})
                path: Path = (key, len(arr) - 1)
                self.lines[path] = line
                return arr[-1], path
            first = self.lines.get((key,), line)
            what = (
                "an array of tables"
                if key in self.arrays_of_tables
                else "a table"
                if isinstance(self.root[key], dict)
                else "a value"
            )
            raise self.error(f"{name}: {key!r} is already defined as {what} on line {first}", start)
        if array:
            self.root[key] = [{}]
            self.arrays_of_tables.add(key)
            self.lines[(key,)] = line
            self.lines[(key, 0)] = line
            return self.root[key][0], (key, 0)
        self.root[key] = {}
        self.lines[(key,)] = line
        return self.root[key], (key,)

    def key(self) -> str:
        c = self.peek()
        if c == '"':
            return self.basic_string()
        if c == "'":
            return self.literal_string()
        start = self.pos
        while self.pos < self.n and self.s[self.pos] in _BARE_KEY:
            self.pos += 1
        if self.pos == start:
            raise self.error(f"expected a key, found {_describe(c)}")
        return self.s[start : self.pos]

    def key_value(self, table: Dict[str, Any], prefix: Path) -> None:
        start = self.pos
        line = self.line_at(start)
        key = self.key()
        self.skip_ws()
        if self.peek() == ".":
            raise self.error(
                "dotted keys (a.b = ...) are not supported in campaign files;"
                " write the key inside its [table]"
            )
        if self.peek() != "=":
            raise self.error(f"expected '=' after the key {key!r}, found {_describe(self.peek())}")
        self.pos += 1
        self.skip_ws()
        path = (*prefix, key)
        if key in table:
            raise self.error(
                f"key {key!r} is defined twice (first on line {self.lines.get(path, line)})", start
            )
        value = self.value(path)
        table[key] = value
        self.lines[path] = line

    # ------------------------------------------------------------ values
    def value(self, path: Path) -> Any:
        c = self.peek()
        if c == '"':
            if self.s.startswith('"""', self.pos):
                raise self.error('multi-line strings (""") are not supported in campaign files')
            return self.basic_string()
        if c == "'":
            if self.s.startswith("'''", self.pos):
                raise self.error("multi-line strings (''') are not supported in campaign files")
            return self.literal_string()
        if c == "[":
            return self.array(path)
        if c == "{":
            return self.inline_table(path)
        if self.s.startswith("true", self.pos):
            self.pos += 4
            return True
        if self.s.startswith("false", self.pos):
            self.pos += 5
            return False
        if _DATE_OR_TIME.match(self.s, self.pos):
            raise self.error("dates and times are not supported in campaign files")
        special = _SPECIAL_FLOAT.match(self.s, self.pos)
        if special:
            self.pos = special.end()
            return float(special.group())
        m = _NUMBER.match(self.s, self.pos)
        if m:
            self.pos = m.end()
            text = m.group().replace("_", "")
            if m.group("dec") is None:
                return int(text[2:], {"x": 16, "o": 8, "b": 2}[text[1]])
            if m.group("frac") is None and m.group("exp") is None:
                return int(text)
            return float(text)
        if not c or c == "\n":
            raise self.error("expected a value after '='")
        raise self.error(f"expected a value, found {_describe(c)}")

    def basic_string(self) -> str:
        start = self.pos
        self.pos += 1
        out: List[str] = []
        while True:
            if self.pos >= self.n or self.s[self.pos] == "\n":
                raise self.error("unterminated string (a basic string ends on its line)", start)
            c = self.s[self.pos]
            if c == '"':
                self.pos += 1
                return "".join(out)
            if c == "\\":
                out.append(self.escape())
                continue
            if c in _CONTROL:
                raise self.error(f"control character {_describe(c)} in a string")
            out.append(c)
            self.pos += 1

    def escape(self) -> str:
        start = self.pos
        c = self.peek(1)
        if c in _ESCAPES:
            self.pos += 2
            return _ESCAPES[c]
        if c in ("u", "U"):
            width = 4 if c == "u" else 8
            digits = self.s[self.pos + 2 : self.pos + 2 + width]
            if len(digits) != width or not all(d in "0123456789abcdefABCDEF" for d in digits):
                raise self.error(f"\\{c} needs {width} hex digits", start)
            code = int(digits, 16)
            if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
                raise self.error(f"\\{c}{digits} is not a Unicode scalar value", start)
            self.pos += 2 + width
            return chr(code)
        shown = _describe(c) if c else "the end of the input"
        raise self.error(
            f"invalid escape \\{c if c.isprintable() else ''} ({shown}); the escapes are"
            ' \\b \\t \\n \\f \\r \\" \\\\ \\uXXXX \\UXXXXXXXX (a literal string'
            " '...' takes backslashes as they are)",
            start,
        )

    def literal_string(self) -> str:
        start = self.pos
        self.pos += 1
        begin = self.pos
        while True:
            if self.pos >= self.n or self.s[self.pos] == "\n":
                raise self.error("unterminated string (a literal string ends on its line)", start)
            c = self.s[self.pos]
            if c == "'":
                self.pos += 1
                return self.s[begin : self.pos - 1]
            if c in _CONTROL:
                raise self.error(f"control character {_describe(c)} in a string")
            self.pos += 1

    def skip_array_space(self) -> None:
        while True:
            self.skip_ws()
            c = self.peek()
            if c == "\n":
                self.pos += 1
            elif c == "#":
                self.skip_comment()
            else:
                return

    def array(self, path: Path) -> List[Any]:
        start = self.pos
        self.pos += 1
        items: List[Any] = []
        while True:
            self.skip_array_space()
            if not self.peek():
                raise self.error("unterminated array: expected ']'", start)
            if self.peek() == "]":
                self.pos += 1
                return items
            line = self.line_at(self.pos)
            item_path = (*path, len(items))
            items.append(self.value(item_path))
            self.lines[item_path] = line
            self.skip_array_space()
            c = self.peek()
            if c == ",":
                self.pos += 1
            elif c == "]":
                self.pos += 1
                return items
            elif not c:
                raise self.error("unterminated array: expected ']'", start)
            else:
                raise self.error(f"expected ',' or ']' in the array, found {_describe(c)}")

    def inline_table(self, path: Path) -> Dict[str, Any]:
        self.pos += 1
        table: Dict[str, Any] = {}
        self.skip_ws()
        if self.peek() == "}":
            self.pos += 1
            return table
        while True:
            self.skip_ws()
            c = self.peek()
            if c == "}":
                raise self.error("a trailing comma is not allowed in an inline table")
            if c in ("\n", "#", ""):
                raise self.error("an inline table { ... } must stay on one line")
            self.key_value(table, path)
            self.skip_ws()
            c = self.peek()
            if c == ",":
                self.pos += 1
            elif c == "}":
                self.pos += 1
                return table
            elif c in ("\n", "#", ""):
                raise self.error("an inline table { ... } must stay on one line")
            else:
                raise self.error(f"expected ',' or '}}' in the inline table, found {_describe(c)}")


def _describe(c: str) -> str:
    if not c:
        return "the end of the input"
    if c == "\n":
        return "the end of the line"
    if c.isprintable() and c != " ":
        return repr(c)
    return f"U+{ord(c):04X}"


def same_value(a: Any, b: Any) -> bool:
    """Deep equality in which NaN equals NaN (for comparing parsed documents)."""
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    return bool(a == b)
