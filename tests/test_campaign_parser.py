"""The campaign TOML subset against tomllib: same values, right lines, clear errors.

Documents are generated from the subset's grammar (every value type, key
quoting, escapes, number forms, multi-line arrays with comments, inline
tables, tables and arrays of tables, CRLF) and parsed by both; then they are
mutated at random, and whatever the subset still accepts must be valid TOML
with the same value.
"""

from __future__ import annotations

import math
import string
from typing import Any, Callable, Dict, List, Tuple

import pytest
import tomllib
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serrinj.codec import tomlsubset
from serrinj.codec.tomlsubset import Document, Path, TomlError, format_path, loads, same_value
from serrinj.errors import InvalidInput

BARE = string.ascii_letters + string.digits + "_-"
CONTROL = {chr(i) for i in range(0x20) if i != 9} | {"\x7f"}
SHORT_ESCAPES = {"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}

Draw = Callable[[st.SearchStrategy[Any]], Any]
GeneratedDoc = Tuple[str, Dict[str, Any], Dict[Path, int]]

text_chars = st.characters(exclude_categories=("Cs",))
comment_chars = st.characters(exclude_categories=("Cs",), exclude_characters="".join(CONTROL))
scalars = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(),
    st.booleans(),
    st.text(text_chars, max_size=8),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(text_chars, max_size=4), children, max_size=3),
    ),
    max_leaves=8,
)
keys = st.one_of(st.text(BARE, min_size=1, max_size=6), st.text(text_chars, max_size=5))


# ---------------------------------------------------------------------- rendering
def underscored(draw: Draw, digits: str) -> str:
    out = digits[0]
    for d in digits[1:]:
        if draw(st.integers(0, 4)) == 0:
            out += "_"
        out += d
    return out


def render_int(draw: Draw, n: int) -> str:
    form = draw(st.sampled_from(["dec", "hex", "oct", "bin"]) if n >= 0 else st.just("dec"))
    if form == "dec":
        sign = "-" if n < 0 else draw(st.sampled_from(["", "+"]))
        return sign + underscored(draw, str(abs(n)))
    digits = {"hex": f"{n:x}", "oct": f"{n:o}", "bin": f"{n:b}"}[form]
    if form == "hex" and draw(st.booleans()):
        digits = digits.upper()
    return "0" + {"hex": "x", "oct": "o", "bin": "b"}[form] + underscored(draw, digits)


def render_float(draw: Draw, x: float) -> str:
    if math.isnan(x):
        return draw(st.sampled_from(["nan", "+nan", "-nan"]))
    if math.isinf(x):
        return "-inf" if x < 0 else draw(st.sampled_from(["inf", "+inf"]))
    text = repr(x)
    if draw(st.booleans()):
        text = text.replace("e", "E")
    if not text.startswith("-") and draw(st.booleans()):
        text = "+" + text
    return text


def render_basic(draw: Draw, s: str) -> str:
    out = []
    for c in s:
        choice = draw(st.integers(0, 9))
        if c == '"':
            out.append('\\"' if choice else "\\u0022")
        elif c == "\\":
            out.append("\\\\")
        elif c in SHORT_ESCAPES and choice < 7:
            out.append(SHORT_ESCAPES[c])
        elif c in CONTROL or choice == 0:
            out.append(f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08X}")
        elif choice == 1:
            out.append(f"\\U{ord(c):08x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def can_be_literal(s: str) -> bool:
    return "'" not in s and not any(c in CONTROL for c in s)


def render_string(draw: Draw, s: str) -> str:
    if can_be_literal(s) and draw(st.booleans()):
        return "'" + s + "'"
    return render_basic(draw, s)


def render_key(draw: Draw, key: str) -> str:
    if key and all(c in BARE for c in key) and draw(st.integers(0, 3)):
        return key
    return render_string(draw, key)


class Renderer:
    """Renders a model as TOML text and records the line of every key and element."""

    def __init__(self, draw: Draw) -> None:
        self.draw = draw
        self.parts: List[str] = []
        self.line = 1
        self.lines: Dict[Path, int] = {}

    def emit(self, text: str) -> None:
        self.parts.append(text)
        self.line += text.count("\n")

    def comment(self) -> str:
        return "#" + self.draw(st.text(comment_chars, max_size=6))

    def gap(self) -> None:
        """Blank lines, comment lines and indentation between statements."""
        for _ in range(self.draw(st.integers(0, 2))):
            self.emit(self.draw(st.sampled_from(["", " ", "\t"])))
            if self.draw(st.booleans()):
                self.emit(self.comment())
            self.emit("\n")
        self.emit(self.draw(st.sampled_from(["", "  ", "\t"])))

    def end_line(self) -> None:
        self.emit(self.draw(st.sampled_from(["", " ", "\t "])))
        if self.draw(st.booleans()):
            self.emit(self.comment())
        self.emit("\n")

    def key_value(self, key: str, value: Any, path: Path) -> None:
        self.lines[path] = self.line
        self.emit(render_key(self.draw, key))
        self.emit(self.draw(st.sampled_from([" = ", "=", "\t=  "])))
        self.value(value, path)

    def value(self, v: Any, path: Path) -> None:
        draw = self.draw
        if isinstance(v, bool):
            self.emit("true" if v else "false")
        elif isinstance(v, int):
            self.emit(render_int(draw, v))
        elif isinstance(v, float):
            self.emit(render_float(draw, v))
        elif isinstance(v, str):
            self.emit(render_string(draw, v))
        elif isinstance(v, list):
            multi = draw(st.booleans())
            trailing = bool(v) and draw(st.booleans())
            self.emit("[")
            for i, item in enumerate(v):
                if multi:
                    self.emit("\n  ")
                    if draw(st.integers(0, 3)) == 0:
                        self.emit(self.comment() + "\n  ")
                else:
                    self.emit(draw(st.sampled_from(["", " "])))
                self.lines[(*path, i)] = self.line
                self.value(item, (*path, i))
                if i < len(v) - 1 or trailing:
                    self.emit(",")
                    if multi and draw(st.booleans()):
                        self.emit(" " + self.comment())
            self.emit("\n]" if multi else "]")
        else:
            assert isinstance(v, dict)
            if not v:
                self.emit(draw(st.sampled_from(["{}", "{ }"])))
                return
            self.emit("{ ")
            for i, (k, item) in enumerate(v.items()):
                if i:
                    self.emit(draw(st.sampled_from([", ", ","])))
                self.key_value(k, item, (*path, k))
            self.emit(" }")


@st.composite
def documents(draw: Draw) -> GeneratedDoc:
    """(text, expected data, expected lines) for a document in the subset."""
    r = Renderer(draw)
    root = draw(st.dictionaries(keys, values, max_size=4))
    data: Dict[str, Any] = {}
    for k, v in root.items():
        r.gap()
        r.key_value(k, v, (k,))
        r.end_line()
        data[k] = v
    names = draw(st.lists(keys.filter(lambda k: k not in root), unique=True, max_size=3))
    kinds = {name: draw(st.booleans()) for name in names}  # True: array of tables
    order = draw(st.lists(st.sampled_from(names), max_size=5)) if names else []
    seen_tables = set()
    for name in order:
        if not kinds[name] and name in seen_tables:
            continue
        seen_tables.add(name)
        table = draw(st.dictionaries(keys, values, max_size=3))
        r.gap()
        if kinds[name]:
            data.setdefault(name, []).append(table)
            path: Path = (name, len(data[name]) - 1)
            if len(data[name]) == 1:
                r.lines[(name,)] = r.line
            r.lines[path] = r.line
            r.emit(f"[[{draw(st.sampled_from(['', ' ']))}{render_key(draw, name)}]]")
        else:
            data[name] = table
            path = (name,)
            r.lines[path] = r.line
            r.emit(f"[{draw(st.sampled_from(['', ' ']))}{render_key(draw, name)} ]")
        r.end_line()
        for k, v in table.items():
            r.gap()
            r.key_value(k, v, (*path, k))
            r.end_line()
    text = "".join(r.parts)
    if draw(st.booleans()):
        text = text.replace("\n", "\r\n")
    if draw(st.booleans()):
        text = text.rstrip("\r\n")  # no newline at the end of the file
    return text, data, r.lines


SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(documents())
def test_generated_documents_agree_with_tomllib(doc: GeneratedDoc) -> None:
    text, expected, lines = doc
    ours = loads(text)
    assert same_value(tomllib.loads(text), expected), "the generator made a wrong model"
    assert same_value(ours.data, expected)
    for path, line in lines.items():
        assert ours.lines.get(path) == line, (path, text)


MUTATION_CHARS = [*list("[]{}=,.#\"'\\\n\r \tx0_+-eE:a1"), "\x00", "\x7f", "é", '"""', "'''"]


@st.composite
def mutated(draw: Draw) -> str:
    text = draw(documents())[0]
    for _ in range(draw(st.integers(1, 3))):
        pos = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        piece = draw(st.sampled_from(MUTATION_CHARS) | st.text(text_chars, min_size=1, max_size=1))
        if op == "insert":
            text = text[:pos] + piece + text[pos:]
        elif op == "delete":
            text = text[:pos] + text[pos + 1 :]
        else:
            text = text[:pos] + piece + text[pos + 1 :]
    return text


TOKENS = [
    "a", "b", "'q'", '"s"', " = ", "=", "1", "-0", "0x1F", "0o7", "0b1", "1_000", "1.5", "1e3",
    "inf", "-nan", "true", "false", "[", "]", "[[", "]]", "{", "}", ",", ".", "\n", "\r\n",
    " ", "#c", '"""', "'''", "1979-05-27", "07:32:00", "\\", '"\\u00e9"', "_", "+",
]  # fmt: skip


def check_agreement(text: str) -> None:
    try:
        reference: Any = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        reference = None
    try:
        ours = loads(text)
    except TomlError as err:
        assert 1 <= err.line <= text.count("\n") + 1 and err.column >= 1
        return
    assert reference is not None, f"the subset accepted invalid TOML: {text!r}"
    assert same_value(ours.data, reference), text


@SETTINGS
@given(mutated())
def test_mutated_documents_never_disagree(text: str) -> None:
    check_agreement(text)


@SETTINGS
@given(st.lists(st.sampled_from(TOKENS), max_size=14).map("".join))
def test_token_soup_never_disagrees(text: str) -> None:
    check_agreement(text)


# ---------------------------------------------------------------------- the subset, by hand
@pytest.mark.parametrize(
    "text",
    [
        "",
        "a = 1\n",
        "a = +1\nb = -0\nc = 1_000\nd = 0xDEAD_beef\ne = 0o755\nf = 0b1010",
        "a = 1.5\nb = -1e-3\nc = 6.02E+23\nd = inf\ne = -inf\nf = nan\ng = 1_0.0_1",
        'a = "tab\\there \\u00e9 \\U0001F600 \\"q\\" \\\\"\nb = \'C:\\path\\*\'',
        "a = [1, 'x', [2, 3], {k = 1}]\nb = []\nc = [\n  1, # one\n  2,\n]",
        'a = {}\nb = { x = 1, "y z" = [1,\n 2] }',
        '"quoted key" = 1\n\'lit key\' = 2\n"" = 3\n1234 = 4\n-_- = 5',
        "[t]\na = 1\n[u]\n[[s]]\nx = 1\n[[s]]\n[[ s ]]\ny = 2",
        "a = 1 # comment é\n# only a comment\n\n\t  b = 2\r\n",
        "a = true\nb = false",
    ],
)
def test_accepted_like_tomllib(text: str) -> None:
    assert same_value(loads(text).data, tomllib.loads(text))


@pytest.mark.parametrize(
    ("text", "line", "column", "words"),
    [
        ('a = "abc\nb = 1', 1, 5, "unterminated string"),
        ("a = 1\nb = 'x", 2, 5, "unterminated string"),
        ("a = 1\na = 2", 2, 1, "defined twice (first on line 1)"),
        ("[t]\n\n[t]", 3, 1, "already defined as a table on line 1"),
        ("t = 1\n[t]", 2, 1, "already defined as a value on line 1"),
        ("[[t]]\n[t]", 2, 1, "already defined as an array of tables on line 1"),
        ("t = []\n[[t]]", 2, 1, "already defined as a value"),
        ("[a.b]", 1, 3, "nested table headers"),
        ("x = 1\na.b = 1", 2, 2, "dotted keys"),
        ("when = 1979-05-27", 1, 8, "dates and times"),
        ("at = 07:32:00", 1, 6, "dates and times"),
        ('s = """x"""', 1, 5, "multi-line strings"),
        ("s = '''x'''", 1, 5, "multi-line strings"),
        ("t = {a = 1,}", 1, 12, "trailing comma"),
        ("t = {a = 1,\nb = 2}", 1, 12, "one line"),
        ("a = [1, 2", 1, 5, "unterminated array"),
        ("a = [1 2]", 1, 8, "expected ',' or ']'"),
        ('a = "\\x41"', 1, 6, "invalid escape"),
        ('a = "\\uD800"', 1, 6, "not a Unicode scalar value"),
        ('a = "\\u12"', 1, 6, "needs 4 hex digits"),
        ("a = 1 # bell \x07", 1, 14, "control character U+0007 in a comment"),
        ("a = 'x\x00'", 1, 7, "control character U+0000 in a string"),
        ("a = 1\rb = 2", 1, 6, "unexpected U+000D"),
        ("a =\nb = 1", 1, 4, "expected a value after '='"),
        ("a = 1x", 1, 6, "unexpected 'x' after the value"),
        ("a = 01", 1, 6, "unexpected '1' after the value"),
        ("a = .5", 1, 5, "expected a value, found '.'"),
        ("= 1", 1, 1, "unexpected '='"),
        ("a 1", 1, 3, "expected '=' after the key 'a'"),
        ("[t] x", 1, 5, "after the table header"),
        ("[[t]", 1, 4, "expected ']]'"),
        ("a = 1\r\nb = \r\n", 2, 5, "expected a value"),
    ],
)
def test_errors_name_line_and_column(text: str, line: int, column: int, words: str) -> None:
    with pytest.raises(TomlError) as info:
        loads(text, "c.toml")
    err = info.value
    assert (err.line, err.column) == (line, column), str(err)
    assert words in err.reason
    assert str(err).startswith(f"c.toml:{line}:{column}: ")
    if any(w in words for w in OUTSIDE_THE_SUBSET):
        tomllib.loads(text)  # valid TOML that the subset leaves out, said so clearly
    else:
        with pytest.raises(tomllib.TOMLDecodeError):
            tomllib.loads(text)


OUTSIDE_THE_SUBSET = ("nested table headers", "dotted keys", "dates and times", "multi-line")


def test_errors_are_invalid_input() -> None:
    with pytest.raises(InvalidInput):
        loads("a = ")


def test_load_reads_utf8_and_names_bad_bytes(tmp_path: Any) -> None:
    good = tmp_path / "good.toml"
    good.write_text("a = 'é'\n", encoding="utf-8")
    assert tomlsubset.load(str(good)).data == {"a": "é"}
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"a = 1\nb = '\xff'\n")
    with pytest.raises(TomlError) as info:
        tomlsubset.load(str(bad))
    assert (info.value.line, info.value.column) == (2, 6)
    assert str(info.value).startswith(f"{bad}:2:6: the file is not valid UTF-8")


def test_lines_of_keys_headers_and_elements() -> None:
    doc = loads(
        "top = 1\n"
        "[target]\n"
        "pid = 5\n"
        "\n"
        "[[steps]]\n"
        "inject = 'nmi'\n"
        "vcpus = [\n"
        "  0,\n"
        "  # one more\n"
        "  1,\n"
        "]\n"
        "[[steps]]\n"
        "t = { a = 1, b = 2 }\n"
    )
    assert doc.lines[("top",)] == 1
    assert doc.lines[("target",)] == 2
    assert doc.lines[("target", "pid")] == 3
    assert doc.lines[("steps",)] == 5
    assert doc.lines[("steps", 0)] == 5
    assert doc.lines[("steps", 0, "vcpus")] == 7
    assert doc.lines[("steps", 0, "vcpus", 0)] == 8
    assert doc.lines[("steps", 0, "vcpus", 1)] == 10
    assert doc.lines[("steps", 1)] == 12
    assert doc.lines[("steps", 1, "t", "b")] == 13
    # unknown paths fall back to their nearest known ancestor
    assert doc.line(("steps", 1, "nope")) == 12
    assert doc.line(("nope",)) == 1


def test_format_path_counts_from_one_and_quotes_odd_keys() -> None:
    assert format_path(("steps", 2, "severity")) == "steps[3].severity"
    assert format_path(("steps", 0, "vcpus", 1)) == "steps[1].vcpus[2]"
    assert format_path(("a b", 'q"')) == '"a b"."q\\""'
    assert format_path(()) == ""


def test_same_value_semantics() -> None:
    assert same_value({"a": [float("nan")]}, {"a": [float("nan")]})
    assert not same_value(0.0, -0.0)
    assert not same_value(1, 1.0)
    assert not same_value(True, 1)
    assert not same_value([1], [1, 2])


def test_document_is_plain_data() -> None:
    doc = loads("[[s]]\na = [1, {b = 'c'}]")
    assert isinstance(doc, Document)
    assert doc.data == {"s": [{"a": [1, {"b": "c"}]}]}
    assert type(doc.data["s"][0]["a"]) is list
