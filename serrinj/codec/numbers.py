"""Numbers the way users type them: decimal, hex, binary and octal, with ``_`` separators.

Pure code: no I/O.
"""

from __future__ import annotations

import re

from serrinj.errors import InvalidInput

#: compiled on first use (by ``re``'s cache), not when the module is imported
_INT_PATTERN = r"0[xX][0-9a-fA-F_]+|0[bB][01_]+|0[oO][0-7_]+|[0-9][0-9_]*"


def parse_int(text: str, *, what: str = "value", bits: int = 64) -> int:
    """Parse a non-negative integer the way a user types it.

    Accepts decimal (``6161``), hex (``0x1811``), binary (``0b1_1000_0001_0001``)
    and octal (``0o14021``), with ``_`` separators. A decimal number with a
    leading zero (``0011``) is refused: it is most likely hex without its prefix.
    Raises :class:`InvalidInput` for junk, negatives and values wider than ``bits``; its
    message starts with ``what`` (nothing when ``what`` is empty).
    """
    at = f"{what}: " if what else ""
    s = text.strip()
    if not s:
        raise InvalidInput(f"{at}empty number")
    if s.startswith("-"):
        raise InvalidInput(f"{at}{text!r} is negative", hint="give a value of 0 or more")
    if not re.fullmatch(_INT_PATTERN, s):
        raise InvalidInput(
            f"{at}{text!r} is not a number",
            hint="write it in decimal (6161), hex (0x1811) or binary (0b1100000010001)",
        )
    if len(s) > 1 and s[0] == "0" and s[1].isdigit():
        raise InvalidInput(
            f"{at}{text!r} has a leading zero",
            hint=f"write 0x{s.lstrip('0_') or '0'} for hex, or drop the leading zeros for decimal",
        )
    try:
        value = int(s, 0)
    except ValueError:
        # only misplaced underscores get past the regex
        raise InvalidInput(
            f"{at}{text!r} is not a number",
            hint="underscores may only separate digits",
        ) from None
    if value >> bits:
        raise InvalidInput(
            f"{at}{text} is wider than {bits} bits",
            hint=f"the largest {bits}-bit value is {hex((1 << bits) - 1)}",
        )
    return value
