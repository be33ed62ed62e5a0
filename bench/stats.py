"""Statistics and formatting for the benchmarks (pure functions, unit-tested).

Every comparison in ``make bench`` is made of samples taken in the same run,
interleaved (see :func:`interleave`), summarised by the median and a spread
(p10/p90 and the interquartile range). Ratios are given two ways: the ratio
of the medians, and the distribution of the ratios of neighbouring pairs
(sample *i* of A over sample *i* of B, taken moments apart), which cancels
slow drifts of the machine.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

__all__ = [
    "Fit",
    "Ratio",
    "Summary",
    "fmt_bytes",
    "fmt_duration_us",
    "fmt_ratio",
    "interleave",
    "linear_fit",
    "log2_histogram_us",
    "markdown_table",
    "percentile",
    "ratio",
    "summarize",
    "text_table",
]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), interpolating linearly between order statistics.

    The same definition as numpy's default ("linear"): the median of an even
    count is the mean of the two middle values.
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    if lo == hi:
        return float(ordered[lo])
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class Summary:
    """Order statistics of one sample set."""

    n: int
    median: float
    p10: float
    p90: float
    q1: float
    q3: float
    min: float
    max: float
    mean: float

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    def as_dict(self) -> Dict[str, float]:
        out: Dict[str, float] = asdict(self)
        out["iqr"] = self.iqr
        return out


def summarize(values: Sequence[float]) -> Summary:
    """Median, p10/p90, quartiles, extremes and mean of ``values`` (at least one)."""
    if not values:
        raise ValueError("summary of no values")
    return Summary(
        n=len(values),
        median=percentile(values, 50),
        p10=percentile(values, 10),
        p90=percentile(values, 90),
        q1=percentile(values, 25),
        q3=percentile(values, 75),
        min=float(min(values)),
        max=float(max(values)),
        mean=sum(values) / len(values),
    )


@dataclass(frozen=True)
class Ratio:
    """How many times larger A is than B."""

    of_medians: float
    pairs: Summary  # the ratios a[i] / b[i] of neighbouring samples

    def as_dict(self) -> Dict[str, object]:
        return {"of_medians": self.of_medians, "pairs": self.pairs.as_dict()}


def summaries_ms(seconds: Mapping[str, Sequence[float]]) -> Dict[str, Dict[str, float]]:
    """Each non-empty series of seconds, summarised in milliseconds (a results file's
    ``summary_ms``)."""
    return {k: summarize([x * 1000 for x in v]).as_dict() for k, v in seconds.items() if v}


def ratio(a: Sequence[float], b: Sequence[float]) -> Ratio:
    """A / B: the ratio of the medians and of each interleaved pair.

    ``a`` and ``b`` are in the order they were taken; pairs are formed up to
    the shorter length. Values must be positive.
    """
    n = min(len(a), len(b))
    if n == 0:
        raise ValueError("a ratio needs samples on both sides")
    if any(x <= 0 for x in list(a[:n]) + list(b[:n])):
        raise ValueError("ratios of non-positive samples are meaningless")
    pairs = [a[i] / b[i] for i in range(n)]
    return Ratio(of_medians=percentile(a, 50) / percentile(b, 50), pairs=summarize(pairs))


def interleave(rounds: int, variants: Sequence[str]) -> Iterator[Tuple[int, str]]:
    """The order to run ``variants`` in: ``rounds`` rounds, each running every
    variant once, the order rotated by one each round (A B, B A, A B ... for
    two), so neither variant always runs first after a pause.

    Yields ``(round, variant)``.
    """
    if not variants:
        return
    k = len(variants)
    for r in range(rounds):
        for j in range(k):
            yield r, variants[(j + r) % k]


@dataclass(frozen=True)
class Fit:
    """A least-squares line ``y = slope * x + intercept``."""

    slope: float
    intercept: float
    r: float  # Pearson correlation (0 when either side is constant)
    n: int

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> Fit:
    """Ordinary least squares of ``ys`` on ``xs`` (at least two distinct x)."""
    if len(xs) != len(ys):
        raise ValueError("xs and ys differ in length")
    n = len(xs)
    if n < 2:
        raise ValueError("a line needs at least two points")
    mx = sum(xs) / n
    my = sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    if sxx == 0:
        raise ValueError("a line needs at least two distinct x values")
    slope = sxy / sxx
    r = sxy / math.sqrt(sxx * syy) if syy > 0 else 0.0
    return Fit(slope=slope, intercept=my - slope * mx, r=r, n=n)


def log2_histogram_us(counts: Sequence[int], tsc_khz: int) -> List[Dict[str, float]]:
    """The probe's bit-length histogram as ``[{"from_us", "to_us", "count"}]``.

    Bucket ``b`` counts gaps in ``[2**b, 2**(b+1))`` TSC ticks; empty buckets
    are left out.
    """
    if tsc_khz <= 0:
        raise ValueError("tsc_khz must be positive")
    out = []
    for b, count in enumerate(counts):
        if count:
            out.append(
                {
                    "from_us": (1 << b) * 1000.0 / tsc_khz,
                    "to_us": (1 << (b + 1)) * 1000.0 / tsc_khz,
                    "count": count,
                }
            )
    return out


def fmt_duration_us(us: float) -> str:
    """A duration in microseconds, in the unit that reads best (3 significant digits)."""
    if us != us:  # NaN
        return "n/a"
    sign = "-" if us < 0 else ""
    us = abs(us)
    if us < 1:
        return f"{sign}{us * 1000:.0f} ns"
    if us < 1000:
        return f"{sign}{_sig3(us)} µs"
    if us < 1_000_000:
        return f"{sign}{_sig3(us / 1000)} ms"
    return f"{sign}{_sig3(us / 1_000_000)} s"


def _sig3(x: float) -> str:
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def fmt_bytes(n: float) -> str:
    """A byte count in KiB/MiB (binary units)."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    if n < 1024:
        return f"{sign}{n:.0f} B"
    if n < 1024 * 1024:
        return f"{sign}{_sig3(n / 1024)} KiB"
    return f"{sign}{_sig3(n / (1024 * 1024))} MiB"


def fmt_ratio(x: float) -> str:
    """``12.3x`` or ``0.45x``."""
    if x != x:
        return "n/a"
    return f"{_sig3(x)}x"


def _cell(value: object) -> str:
    return "" if value is None else str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table; ``|`` inside cells is escaped."""
    if any(len(r) != len(headers) for r in rows):
        raise ValueError("every row needs one cell per header")

    def line(cells: Sequence[object]) -> str:
        return "| " + " | ".join(_cell(c).replace("|", "\\|") for c in cells) + " |"

    out = [line(headers), "|" + "|".join("---" for _ in headers) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def text_table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], width: Optional[int] = None
) -> str:
    """A plain aligned table for a terminal; body cells longer than ``width`` are cut."""
    if any(len(r) != len(headers) for r in rows):
        raise ValueError("every row needs one cell per header")
    body = [[_cell(c) for c in r] for r in rows]
    if width is not None:
        body = [[c if len(c) <= width else c[: width - 1] + "…" for c in r] for r in body]
    cells = [[_cell(c) for c in headers], *body]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
