"""Raw ``OSError`` stays below the use cases.

The rule of docs/ARCHITECTURE.md: the layer that calls the OS turns an ``OSError``
into a :class:`~serrinj.errors.SerrinjError` right there, once, with the pid or the
path; the layers above (faults/, campaign/, cli/, api.py and the use cases of ops/)
catch ``SerrinjError`` subclasses only. Every ``except`` clause (and every
``contextlib.suppress(...)``) of those files that names ``OSError`` or one of its
subclasses is read with ``ast`` and must be one of the true boundaries in
:data:`BOUNDARIES`, each with the reason it is one.
"""

from __future__ import annotations

import ast
import builtins
import errno
import os
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "serrinj"

#: the files above the OS boundary (all of ops/: its boundaries are listed below)
UPPER = ("faults", "campaign", "cli", "ops", "api.py")

#: ``OSError`` and every builtin subclass or alias of it
OS_ERRORS = frozenset(
    name
    for name, value in vars(builtins).items()
    if isinstance(value, type) and issubclass(value, OSError)
)

Site = Tuple[str, str, str]  # (file, function, exception name)

#: the true boundaries: a module that makes the system call itself, on a file or
#: process it owns. One a line: file, function, exception, why it is handled there.
_TABLE = """
ops/lock.py       _holder           OSError            its own lock file; unreadable: vaguer holder
ops/lock.py       vm_lock           FileNotFoundError  its own lock file: first lock makes the dir
ops/lock.py       vm_lock           OSError            its own lock file -> PermissionDenied, path
ops/audit.py      record            FileNotFoundError  the audit log: first record makes the dir
ops/audit.py      record            OSError            writes the audit log -> problem naming it
ops/audit.py      read              FileNotFoundError  reads the audit log: none yet, no records
ops/policy.py     load_system       FileNotFoundError  opens the policy file: none is no policy
ops/policy.py     load_system       OSError            opens the policy file -> PermissionDenied
ops/events.py     OutputFile.commit OSError            writes the events file -> InvalidInput, path
ops/events.py     read_file         OSError            reads events file/stdin -> InvalidInput, path
ops/demo.py       _testvm_children  OSError            /proc of its own children: exited, not one
ops/demo.py       _end_child        ProcessLookupError signals its own child test VM: gone is done
ops/demo.py       _end_child        ChildProcessError  reaps its own child: reaped elsewhere is done
campaign/junit.py JunitReport.write OSError            writes the JUnit report; failure only warned
cli/__init__.py   _run              BrokenPipeError    its own stdout: the reader went away (| head)
"""

BOUNDARIES: Dict[Site, str] = {
    (f, fn, exc): reason
    for f, fn, exc, reason in (line.split(None, 3) for line in _TABLE.strip().splitlines())
}


def _files() -> Iterator[Path]:
    for name in UPPER:
        path = PKG / name
        yield from sorted(path.rglob("*.py")) if path.is_dir() else [path]


def _names(node: ast.expr | None) -> List[str]:
    """The exception names an ``except`` type or a ``suppress`` argument names."""
    if node is None:
        return []
    if isinstance(node, ast.Tuple):
        return [n for elt in node.elts for n in _names(elt)]
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, ast.Attribute):
        return [node.attr]
    return []


class _Scan(ast.NodeVisitor):
    def __init__(self, rel: str) -> None:
        self.rel = rel
        self.stack: List[str] = []
        self.found: List[Tuple[Site, int]] = []

    def _scope(self, node: ast.AST, name: str) -> None:
        self.stack.append(name)
        self.generic_visit(node)
        self.stack.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._scope(node, node.name)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._scope(node, node.name)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._scope(node, node.name)

    def _add(self, names: List[str], line: int) -> None:
        for name in names:
            if name in OS_ERRORS:
                self.found.append(((self.rel, ".".join(self.stack) or "<module>", name), line))

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        self._add(_names(node.type), node.lineno)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name == "suppress":
            self._add([n for arg in node.args for n in _names(arg)], node.lineno)
        self.generic_visit(node)


def scan() -> List[Tuple[Site, int]]:
    out: List[Tuple[Site, int]] = []
    for path in _files():
        rel = path.relative_to(PKG).as_posix()
        visitor = _Scan(rel)
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
        out.extend(visitor.found)
    return out


def test_os_errors_are_known() -> None:
    # the set the scan looks for: a scan that looks for nothing passes everything
    assert {"OSError", "IOError", "FileNotFoundError", "PermissionError"} <= OS_ERRORS
    assert {"ProcessLookupError", "ChildProcessError", "IsADirectoryError"} <= OS_ERRORS
    assert "ValueError" not in OS_ERRORS


def test_the_scan_sees_except_and_suppress() -> None:
    code = (
        "import contextlib\n"
        "class C:\n"
        "    def m(self):\n"
        "        try:\n"
        "            pass\n"
        "        except (ValueError, FileNotFoundError):\n"
        "            pass\n"
        "        with contextlib.suppress(OSError):\n"
        "            pass\n"
        "def f():\n"
        "    try:\n"
        "        pass\n"
        "    except KeyError:\n"
        "        pass\n"
    )
    visitor = _Scan("x.py")
    visitor.visit(ast.parse(code))
    assert visitor.found == [
        (("x.py", "C.m", "FileNotFoundError"), 6),
        (("x.py", "C.m", "OSError"), 8),
    ]


def test_raw_os_errors_only_at_boundaries() -> None:
    stray = [
        f"serrinj/{site[0]}:{line}: {site[1]} catches {site[2]}"
        for site, line in scan()
        if site not in BOUNDARIES
    ]
    assert not stray, (
        "raw OSError handled above the OS boundary; make the layer that made the call raise"
        " a SerrinjError (with the pid or path) and catch that, or, if this module makes the"
        " call itself, list it in BOUNDARIES with the reason:\n" + "\n".join(stray)
    )


def test_every_boundary_is_still_there() -> None:
    seen = {site for site, _line in scan()}
    stale = sorted(set(BOUNDARIES) - seen)
    assert not stale, f"BOUNDARIES lists sites that no longer exist: {stale}"


def test_every_boundary_has_a_reason() -> None:
    assert all(reason.strip() for reason in BOUNDARIES.values())


# ------------------------------------------------- the boundary for users' files
# Each front door that reads or writes a file a user named gets the FileError of
# host/privilege.py and says what it always said, with the path and the exit code.


def test_privilege_turns_an_os_error_into_a_file_error(tmp_path: Path) -> None:
    from serrinj.errors import ExitCode, FileError
    from serrinj.host import privilege

    missing = tmp_path / "missing.toml"
    with pytest.raises(FileError) as info:
        privilege.open_file(str(missing), "r", "campaign file")
    err = info.value
    assert (err.errno, err.path, err.what) == (errno.ENOENT, str(missing), "campaign file")
    assert err.exit_code == ExitCode.USAGE
    assert str(err) == f"cannot use the campaign file {missing}: No such file or directory"
    assert isinstance(err.__cause__, FileNotFoundError)
    with pytest.raises(FileError) as info:
        privilege.replace(str(missing), str(tmp_path / "x"), "events file")
    assert info.value.errno == errno.ENOENT


def test_campaign_file_errors_keep_their_words(tmp_path: Path) -> None:
    from serrinj.campaign import schema
    from serrinj.errors import FileError, InvalidInput

    with pytest.raises(InvalidInput, match=r"campaign file .*missing\.toml does not exist$"):
        schema.load(str(tmp_path / "missing.toml"))
    with pytest.raises(InvalidInput, match=r"campaign file .* is a directory$"):
        schema.load(str(tmp_path))
    plain = tmp_path / "plain"
    plain.write_text("")
    # an errno without its own words keeps the kernel's (it was a raw OSError before)
    with pytest.raises(FileError, match=r"campaign file .*plain/c\.toml: Not a directory$"):
        schema.load(str(plain / "c.toml"))


def test_pid_file_errors_are_target_not_found(tmp_path: Path) -> None:
    from serrinj.campaign import runner
    from serrinj.errors import TargetNotFound

    with pytest.raises(TargetNotFound, match=r"pid file .*gone\.pid does not exist") as info:
        runner._read_pid_file(str(tmp_path / "gone.pid"))
    assert info.value.hint == "is the VM running?"
    with pytest.raises(TargetNotFound, match=r"cannot read pid file .*: Is a directory$"):
        runner._read_pid_file(str(tmp_path))


def test_events_file_errors_are_invalid_input(tmp_path: Path) -> None:
    import serrinj
    from serrinj.errors import InvalidInput
    from serrinj.ops import events

    missing = tmp_path / "missing.json"
    with pytest.raises(InvalidInput, match=rf"^cannot read {missing}: No such file or directory$"):
        serrinj.read_events(str(missing))
    with pytest.raises(InvalidInput, match=rf"^cannot read {missing}: No such file or directory$"):
        events.read_file(str(missing))
    out = tmp_path / "no-dir" / "e.json"
    with pytest.raises(InvalidInput, match=rf"^cannot write {out}: No such file or directory$"):
        events.OutputFile(str(out))
    into_dir = tmp_path / "d"
    into_dir.mkdir()
    f = events.OutputFile(str(tmp_path / "e.json"))
    f.path = str(into_dir)  # the final rename fails: a directory is in the way
    with pytest.raises(InvalidInput, match=rf"^cannot write {into_dir}: Is a directory$"):
        f.commit("{}")
    assert not os.path.exists(f.tmp)  # the temporary is gone


def test_junit_and_log_file_errors_are_quiet(tmp_path: Path) -> None:
    from serrinj.campaign.junit import JunitReport
    from serrinj.campaign.logwatch import _LogReader

    warnings: List[str] = []
    JunitReport(str(tmp_path / "no-dir" / "r.xml"), warnings.append)
    assert warnings == [
        f"cannot write the JUnit report {tmp_path}/no-dir/r.xml: No such file or directory"
    ]
    assert _LogReader(str(tmp_path / "later.log"), 0).lines() == []
