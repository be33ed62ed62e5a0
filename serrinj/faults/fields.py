"""The fields of a fault request, read the same way from every front end.

The command line hands over text (``--status val,uc,en``), a campaign file TOML
values (``status = "val,uc,en"``, ``status = 0xbd00...``, ``status = ["val", "uc"]``),
and the Python API numbers. :class:`Fields` reads any of them with one set of rules,
so a field means the same thing everywhere. A value that is absent or ``None`` is
not given.

Problems are collected, not raised one by one: :meth:`Fields.done` raises them
together as :class:`FieldErrors`. Each names its field, and its text may name other
fields as ``{field}``; :meth:`FieldError.render` spells them as the front end does
(``--mcg-status`` on the command line, ``mcg_status`` in a campaign file).
"""

from __future__ import annotations

import json
import math
import re
from types import MappingProxyType
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple

from serrinj.codec.numbers import parse_int
from serrinj.errors import InvalidInput

#: how a value of each type is named in messages (TOML's words)
TYPE_NAMES: Mapping[type, str] = MappingProxyType(
    {
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        list: "an array",
        dict: "a table",
    }
)

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def type_name(value: object) -> str:
    return TYPE_NAMES.get(type(value), type(value).__name__)


def show(value: object) -> str:
    """A value as it was written: strings quoted, booleans in TOML's words."""
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        text = json.dumps(value)
        return text if len(text) <= 40 else text[:37] + "..."
    return str(value)


def suggest(word: str, choices: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for a close choice, else nothing."""
    import difflib  # only when a suggestion is made: it is slow to import

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def option_name(field: str) -> str:
    """The command-line spelling of a field: ``mcg_status`` is ``--mcg-status``."""
    return "--" + field.replace("_", "-")


def key_name(field: str) -> str:
    """The campaign-file spelling of a field: ``mcg_status``."""
    return field


class FieldError(InvalidInput):
    """One field of a request that cannot be used.

    ``text`` may name fields as ``{field}``; ``missing`` lists the fields of which
    one is required and none was given (``field`` is then empty).
    """

    def __init__(
        self,
        field: str,
        text: str,
        hint: Optional[str] = None,
        *,
        missing: Tuple[str, ...] = (),
        fault_kind: str = "",
    ) -> None:
        self.field = field
        self.text = text
        self.missing = missing
        self.fault_kind = fault_kind
        super().__init__(self.render(), hint=hint)

    @property
    def kind(self) -> str:
        return "invalid-input"

    def render(self, cli: bool = True) -> str:
        """The message with each field spelled as on the command line (``--mcg-status``)
        or, ``cli=False``, as in a campaign file (``mcg_status``)."""
        name = option_name if cli else key_name
        if self.missing:
            if cli:
                if len(self.missing) == 1:
                    return f"{name(self.missing[0])} is required"
                return "give " + " or ".join(name(f) for f in self.missing)
            quoted = " or ".join(repr(name(f)) for f in sorted(self.missing))
            return f"an {self.fault_kind} step needs {quoted}" + (
                f" ({self.text})" if self.text else ""
            )
        text = _PLACEHOLDER.sub(lambda m: name(m.group(1)), self.text)
        if cli and self.field and "{" not in self.text:
            return f"{name(self.field)}: {text}"
        return text


class FieldErrors(InvalidInput):
    """Every problem of one request; its message is the first one's."""

    @property
    def kind(self) -> str:
        return "invalid-input"

    def __init__(self, problems: Sequence[FieldError]) -> None:
        self.problems = tuple(problems)
        first = self.problems[0]
        super().__init__(first.message, hint=first.hint)


class Fields:
    """Reads the fields of one request of fault ``kind`` from ``data``."""

    def __init__(self, kind: str, data: Mapping[str, Any]) -> None:
        self.kind = kind
        self.data = data
        self.problems: List[FieldError] = []

    def given(self, key: str) -> bool:
        return self.data.get(key) is not None

    def fail(self, key: str, text: str, hint: Optional[str] = None) -> None:
        self.problems.append(FieldError(key, text, hint, fault_kind=self.kind))

    def need(self, keys: Tuple[str, ...], detail: str = "", hint: Optional[str] = None) -> None:
        """One of ``keys`` is required and none was given."""
        self.problems.append(FieldError("", detail, hint, missing=keys, fault_kind=self.kind))

    def wrong_type(self, key: str, value: object, expected: str) -> None:
        self.fail(key, f"must be {expected}, not {type_name(value)} ({show(value)})")

    def parse(self, key: str, parser: Callable[[], Optional[int]]) -> Optional[int]:
        """``parser()``, with an :class:`InvalidInput` it raises recorded against ``key``."""
        try:
            return parser()
        except InvalidInput as err:
            self.fail(key, err.message, err.hint)
            return None

    def done(self) -> None:
        if self.problems:
            raise FieldErrors(self.problems)

    # ---- typed readers: None when absent or wrong (the problem is recorded)
    def _typed(self, key: str, types: Tuple[type, ...], expected: str) -> object:
        """The value of ``key`` if its type is one of ``types`` (exactly: ``True`` is not an
        int here), else None, with a wrong type recorded as ``expected``."""
        value = self.data.get(key)
        if value is None or type(value) in types:
            return value
        self.wrong_type(key, value, expected)
        return None

    def boolean(self, key: str) -> bool:
        return self._typed(key, (bool,), "true or false") is True

    def number(self, key: str, bits: int = 64) -> Optional[int]:
        """An integer, or text in decimal, hex, binary or octal
        (:func:`~serrinj.codec.numbers.parse_int`)."""
        value = self.data.get(key)
        if value is None:
            return None
        if type(value) is int:
            if not 0 <= value < 1 << bits:
                self.fail(key, f"{value} is out of range: it must be a {bits}-bit value, 0 or more")
                return None
            return value
        if type(value) is str:
            return self.parse(key, lambda: parse_int(value, what="", bits=bits))
        self.wrong_type(key, value, "a number")
        return None

    def flags(self, key: str, names: Mapping[str, int]) -> Optional[int]:
        """A 64-bit register value: a number, or flag names joined by commas or in an array
        (:func:`~serrinj.codec.mce.parse_value`)."""
        value = self.data.get(key)
        if value is None:
            return None
        if type(value) is int:
            return self.number(key)
        if type(value) is list and value and all(type(w) is str for w in value):
            value = ",".join(value)
        if type(value) is not str:
            self.wrong_type(key, value, "a number or flag names")
            return None
        text = value
        from serrinj.codec import mce  # the machine-check fields only

        return self.parse(key, lambda: mce.parse_value(text, "", names))

    def seconds(self, key: str) -> Optional[float]:
        """A positive number of seconds."""
        value = self._typed(key, (int, float), "a number of seconds")
        if not isinstance(value, (int, float)):
            return None
        if not math.isfinite(value) or value <= 0:
            self.fail(key, f"{show(value)} seconds: it must be positive")
            return None
        return float(value)

    def choice(self, key: str, choices: Sequence[str]) -> Optional[str]:
        """One of ``choices`` (case-insensitive)."""
        value = self._typed(key, (str,), "a string")
        if not isinstance(value, str):
            return None
        word = value.strip().lower()
        if word not in choices:
            shown = ", ".join(repr(c) for c in choices)
            self.fail(key, f"{value!r} is not one of {shown}{suggest(word, choices)}")
            return None
        return word
