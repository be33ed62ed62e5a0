"""Output of the ``serrinj`` command: JSON, plain text, and rich on a terminal.

Every command hands its result to :meth:`Ui.emit` as one JSON-ready dict (the
``as_dict()`` of the use case's result). The same dict is either

- dumped as JSON (``--json``), with ``"schema": "serrinj/1"`` and
  ``"command"`` added at the top, or
- turned by a *view* (a ``view_*`` function of :mod:`serrinj.cli.views`) into a small document of
  headings, key/value fields and tables, which is printed as plain aligned
  text when stdout is not a terminal (no ANSI codes, easy to grep), or with
  rich on a terminal.

So the human output is computed from exactly the data the JSON carries.
rich is imported only when something is drawn on a terminal: ``--json`` and
piped output never load its rendering machinery, which keeps start-up fast.

Data goes to stdout; errors, warnings and progress go to stderr.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    TextIO,
    Tuple,
    Union,
)

SCHEMA = "serrinj/1"


# ====================================================================== document model
class Styled:
    """Text with a rich style; plain output drops the style."""

    __slots__ = ("style", "text")

    def __init__(self, text: str, style: str = "") -> None:
        self.text = text
        self.style = style

    def __repr__(self) -> str:
        return f"Styled({self.text!r}, {self.style!r})"


Cell = Union[str, Styled]

OK = "green"
BAD = "bold red"
WARN = "yellow"
DIM = "dim"
STRONG = "bold"

# The document blocks are plain classes rather than dataclasses: creating
# dataclasses costs milliseconds at import, and every run of serrinj pays it.


class Heading:
    """Starts a group; a blank line separates groups."""

    __slots__ = ("text",)

    def __init__(self, text: Cell) -> None:
        self.text = text


class Fields:
    """``key  value`` rows; a value may span lines."""

    __slots__ = ("rows",)

    def __init__(self, rows: Sequence[Tuple[str, Cell]]) -> None:
        self.rows = rows


class Table:
    """Columns and rows; a cell may span lines."""

    __slots__ = ("columns", "rows")

    def __init__(self, columns: Sequence[str], rows: Sequence[Sequence[Cell]]) -> None:
        self.columns = columns
        self.rows = rows


class Line:
    """A paragraph."""

    __slots__ = ("text",)

    def __init__(self, text: Cell) -> None:
        self.text = text


Block = Union[Heading, Fields, Table, Line]
Doc = List[Block]
View = Callable[[Mapping[str, Any]], Doc]


def _text(cell: Cell) -> str:
    return cell.text if isinstance(cell, Styled) else cell


def to_plain(doc: Sequence[Block]) -> str:
    """The document as plain aligned text (what a pipe gets)."""
    out: List[str] = []
    indent = ""
    for i, block in enumerate(doc):
        if isinstance(block, Heading):
            if i:
                out.append("")
            out.append(_text(block.text))
            indent = "  "
        elif isinstance(block, Line):
            out.extend(indent + line for line in _text(block.text).splitlines() or [""])
        elif isinstance(block, Fields):
            width = max((len(k) for k, _ in block.rows), default=0)
            for key, value in block.rows:
                lines = _text(value).splitlines() or [""]
                out.append(f"{indent}{key + ':':<{width + 1}}  {lines[0]}".rstrip())
                out.extend(f"{indent}{'':<{width + 1}}  {line}".rstrip() for line in lines[1:])
        else:
            # a cell may hold several lines; a row is then as tall as its tallest cell
            cells = [[_text(c).splitlines() or [""] for c in row] for row in block.rows]
            widths = [len(c) for c in block.columns]
            for row in cells:
                for j, c in enumerate(row):
                    widths[j] = max([widths[j], *(len(x) for x in c)])
            tall = any(len(c) > 1 for row in cells for c in row)
            for i, row in enumerate([[[c] for c in block.columns], *cells]):
                if tall and i > 1:
                    out.append("")
                for k in range(max(len(c) for c in row)):
                    parts = [c[k] if k < len(c) else "" for c in row]
                    line = "  ".join(f"{p:<{widths[j]}}" for j, p in enumerate(parts))
                    out.append((indent + line).rstrip())
    return "\n".join(out) + "\n" if out else ""


def print_rich(doc: Sequence[Block], console: Any) -> None:
    """Draw the document with rich (tables, colours) on ``console``."""
    from rich import box
    from rich.padding import Padding
    from rich.table import Table as RichTable
    from rich.text import Text

    def text(cell: Cell) -> Text:
        return Text(cell.text, style=cell.style) if isinstance(cell, Styled) else Text(cell)

    indent = 0
    for i, block in enumerate(doc):
        if isinstance(block, Heading):
            if i:
                console.print()
            t = text(block.text)
            t.stylize(STRONG)
            console.print(t)
            indent = 2
        elif isinstance(block, Line):
            console.print(Padding(text(block.text), (0, 0, 0, indent), expand=False))
        elif isinstance(block, Fields):
            grid = RichTable.grid(padding=(0, 2))
            grid.add_column(style="cyan", no_wrap=True)
            grid.add_column()
            for key, value in block.rows:
                grid.add_row(key, text(value))
            console.print(Padding(grid, (0, 0, 0, indent), expand=False))
        else:
            tall = any("\n" in _text(c) for row in block.rows for c in row)
            table = RichTable(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, show_lines=tall)
            for col in block.columns:
                table.add_column(col, header_style="bold cyan")
            for row in block.rows:
                table.add_row(*(text(c) for c in row))
            console.print(Padding(table, (0, 0, 0, indent), expand=False))


# ====================================================================== the UI object
def _tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Ui:
    """How this run of ``serrinj`` talks to the user; built once by the CLI (``ctx.obj``).

    ``color`` is ``auto`` (rich and colours when the stream is a terminal and
    ``NO_COLOR`` is unset), ``always`` or ``never``. ``command`` names the
    command in JSON output.
    """

    def __init__(
        self, json: bool = False, debug: bool = False, color: str = "auto", command: str = ""
    ) -> None:
        self.json = json
        self.debug = debug
        self.color = color
        self.command = command

    # ------------------------------------------------------------ streams
    @property
    def stdout(self) -> TextIO:
        return sys.stdout

    @property
    def stderr(self) -> TextIO:
        return sys.stderr

    def _rich_for(self, stream: TextIO) -> bool:
        if self.color == "always":
            return True
        return self.color == "auto" and _tty(stream)

    def _colour_for(self, stream: TextIO) -> bool:
        return self._rich_for(stream) and (self.color == "always" or "NO_COLOR" not in os.environ)

    def _console(self, stream: TextIO) -> Any:
        from rich.console import Console

        force = self.color == "always"
        return Console(
            file=stream,
            force_terminal=True if force else None,
            no_color=not self._colour_for(stream),
            highlight=False,
            soft_wrap=False,
        )

    # ------------------------------------------------------------ data
    def emit(self, data: Mapping[str, Any], view: View) -> None:
        """Print a command's result: JSON, or the view as text or rich."""
        if self.json:
            self.stdout.write(dump_json(envelope(self.command, data)))
            self.stdout.flush()
            return
        doc = view(data)
        if not doc:
            return
        if self._rich_for(self.stdout):
            print_rich(doc, self._console(self.stdout))
        else:
            self.stdout.write(to_plain(doc))
        self.stdout.flush()

    # ------------------------------------------------------------ diagnostics
    def _label(self, word: str, style: str) -> str:
        if not self._colour_for(self.stderr):
            return word
        code = {"bold red": "1;31", "yellow": "33", "dim": "2"}.get(style, "1")
        return f"\x1b[{code}m{word}\x1b[0m"

    def note(self, text: str) -> None:
        """An informational line on stderr (not data)."""
        self.stderr.write(f"{text}\n")

    def warn(self, text: str) -> None:
        self.stderr.write(f"{self._label('warning:', WARN)} {text}\n")

    def error(
        self,
        kind: str,
        message: str,
        hint: Optional[str],
        exit_code: int,
        *,
        details: Optional[Mapping[str, Any]] = None,
        stdout: bool = True,
    ) -> None:
        """``error:``/``hint:`` on stderr; with ``--json`` also an error object on stdout
        (unless ``stdout`` is false: the command's JSON already carries the error)."""
        self.stderr.write(f"{self._label('error:', BAD)} {message}\n")
        if hint:
            self.stderr.write(f"{self._label('hint:', DIM)} {hint}\n")
        self.stderr.flush()
        if self.json and stdout:
            err: Dict[str, Any] = {
                "kind": kind,
                "message": message,
                "hint": hint,
                "exit_code": exit_code,
            }
            if details:
                err.update(details)
            self.stdout.write(dump_json(envelope(self.command, {"error": err})))
            self.stdout.flush()

    def emit_line(self, data: Mapping[str, Any]) -> None:
        """One compact JSON line on stdout (streamed output, e.g. campaign events)."""
        import json

        self.stdout.write(
            json.dumps(envelope(self.command, data), default=_json_default, separators=(",", ":"))
            + "\n"
        )
        self.stdout.flush()

    @contextlib.contextmanager
    def progress_bar(self, text: str) -> Iterator[Callable[[int, int, str], None]]:
        """A progress bar on stderr (terminal only); yields ``update(done, total, text)``."""
        if not _tty(self.stderr) or self.color == "never" or self.json:
            yield lambda _done, _total, _text: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            console=self._console(self.stderr),
            transient=True,
        )
        with bar:
            task = bar.add_task(text, total=None)

            def update(done: int, total: int, what: str) -> None:
                bar.update(task, completed=done, total=total or None, description=what)

            yield update

    def step_line(
        self,
        index: int,
        total: int,
        outcome: str,
        name: str,
        seconds: Optional[float],
        message: str = "",
    ) -> None:
        """A finished step as one line on stderr, when stderr is not a terminal (a CI
        job's log): what the progress bar shows on a terminal, with the step's full
        name. Nothing with --json, whose step events are data on stdout."""
        if self.json or _tty(self.stderr):
            return
        took = f" ({seconds:.3f} s)" if seconds is not None else ""
        line = f"[{index:>{len(str(total))}}/{total}] {outcome.upper()} {name}{took}"
        if outcome != "passed" and message:
            line += f"\n    {message}"
        self.stderr.write(line + "\n")
        self.stderr.flush()

    @contextlib.contextmanager
    def progress(self, text: str) -> Iterator[Callable[[str], None]]:
        """A spinner with ``text`` on stderr, only when stderr is a terminal.

        Yields a function that replaces the text (a step of long work).
        """
        if not _tty(self.stderr) or self.color == "never":
            yield lambda _text: None
            return
        console = self._console(self.stderr)
        with console.status(text) as status:
            yield lambda t: status.update(t)


# ====================================================================== JSON
def envelope(command: str, data: Mapping[str, Any]) -> Dict[str, Any]:
    """The top-level JSON object: schema, command, then the command's data."""
    out: Dict[str, Any] = {"schema": SCHEMA, "command": command}
    out.update(data)
    return out


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, (bytes, bytearray)):
        return obj.hex()
    if hasattr(obj, "as_dict"):
        return obj.as_dict()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def dump_json(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=2, default=_json_default) + "\n"
