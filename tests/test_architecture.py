"""The layers of docs/ARCHITECTURE.md, held against the code.

Every ``import`` in serrinj/ (those inside functions too) is read with ``ast`` and
checked against :data:`ALLOWED`: which layers each layer may import. A third-party
package with a home (cffi, click, rich, pytest) may be imported by that home only.
The table is also the one in docs/ARCHITECTURE.md, so the document cannot drift.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Dict, FrozenSet, Iterator, List, Set, Tuple

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "serrinj"
DOC = ROOT / "docs" / "ARCHITECTURE.md"

_BELOW_VCPU = frozenset({"errors", "_lazy", "_native", "kvm", "host", "remote"})

#: layer -> the layers it may import (itself and the standard library always)
ALLOWED: Dict[str, FrozenSet[str]] = {
    "errors": frozenset(),
    "_lazy": frozenset(),
    "kvm": frozenset({"_lazy"}),
    "_native": frozenset({"errors"}),
    "codec": frozenset({"errors", "kvm"}),
    "host": frozenset({"errors", "_native", "kvm"}),
    "remote": frozenset({"errors", "_native", "kvm", "host"}),
    "vcpu": _BELOW_VCPU,
    "target": _BELOW_VCPU | {"vcpu"},
    "faults": frozenset({"errors", "_lazy", "kvm", "codec", "host", "remote", "vcpu", "target"}),
    "testvm": frozenset({"errors", "_native", "kvm", "remote", "vcpu"}),
    "ops": _BELOW_VCPU | {"codec", "vcpu", "target", "faults", "testvm"},
    "campaign": _BELOW_VCPU | {"serrinj", "codec", "vcpu", "target", "faults", "ops"},
    "api": frozenset({"errors", "kvm", "codec", "host", "target", "faults", "ops"}),
    "cli": frozenset({"serrinj", "errors", "codec", "faults", "ops", "campaign"}),
    "pytest_plugin": frozenset({"serrinj", "errors", "api", "host", "ops", "testvm"}),
    "serrinj": frozenset({"errors", "api"}),
    "__main__": frozenset({"cli"}),
}

#: third-party packages and the one layer that may import each
HOMES: Dict[str, str] = {
    "cffi": "_native",
    "_cffi_backend": "_native",
    "click": "cli",
    "rich": "cli",
    "pytest": "pytest_plugin",
    "_pytest": "pytest_plugin",
    "pluggy": "pytest_plugin",
}


def layer_of(path: Path, pkg: Path = PKG) -> str:
    """``serrinj/faults/mce.py`` is in ``faults``; ``serrinj/api.py`` is ``api``;
    ``serrinj/__init__.py`` is the package root, ``serrinj``."""
    rel = path.relative_to(pkg).parts
    if len(rel) > 1:
        return rel[0]
    return "serrinj" if rel[0] == "__init__.py" else rel[0][: -len(".py")]


def imports(path: Path) -> Iterator[Tuple[int, str]]:
    """(line, dotted name) of every import in ``path``, nested ones included;
    ``from serrinj import ops`` yields ``serrinj.ops``."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{path}:{node.lineno}: a relative import"
            assert node.module is not None
            if node.module == "serrinj":
                for alias in node.names:
                    yield node.lineno, f"serrinj.{alias.name}"
            else:
                yield node.lineno, node.module


def target_layer(name: str) -> str:
    """The layer a ``serrinj...`` import reaches (``serrinj.__version__``: the root)."""
    parts = name.split(".")
    if len(parts) == 1:
        return "serrinj"
    head = parts[1]
    if head in ALLOWED:
        return head
    return "serrinj"  # a name of the package root, such as __version__


def violations(pkg: Path = PKG) -> List[str]:
    out: List[str] = []
    for path in sorted(pkg.rglob("*.py")):
        here = layer_of(path, pkg)
        assert here in ALLOWED, f"{path}: layer {here!r} is missing from the table"
        for line, name in imports(path):
            where = f"{path.relative_to(pkg.parent)}:{line}"
            top = name.split(".")[0]
            if top == "serrinj":
                there = target_layer(name)
                if there != here and there not in ALLOWED[here]:
                    out.append(f"{where}: {here} imports {name} ({there})")
            elif top in HOMES and HOMES[top] != here:
                out.append(f"{where}: {here} imports {top}, which only {HOMES[top]} may")
    return out


def test_every_import_keeps_to_the_layers() -> None:
    assert violations() == []


def test_the_table_names_every_layer_there_is() -> None:
    layers: Set[str] = {layer_of(p) for p in PKG.rglob("*.py")}
    assert layers == set(ALLOWED)


def test_the_check_catches_a_broken_rule(tmp_path: Path) -> None:
    """A package with one import too many of each sort goes red, lazy imports included."""
    fake = tmp_path / "serrinj"
    for d in ("codec", "cli", "ops"):
        (fake / d).mkdir(parents=True)
    (fake / "codec" / "esr.py").write_text("def f():\n    from serrinj.ops import inject\n")
    (fake / "ops" / "show.py").write_text("import rich.console\n")
    (fake / "cli" / "views.py").write_text("from serrinj.target import discover\n")
    found = violations(fake)
    assert len(found) == 3, found
    assert any("codec imports serrinj.ops" in v for v in found)
    assert any("ops imports rich, which only cli may" in v for v in found)
    assert any("cli imports serrinj.target" in v for v in found)


def test_architecture_md_states_the_same_table() -> None:
    """Each row of the table in docs/ARCHITECTURE.md ("| `faults/` | ... |") lists exactly
    the layers :data:`ALLOWED` gives it."""
    rows: Dict[str, FrozenSet[str]] = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"\|\s*`([\w.]+?)/?(?:\.py)?`\s*\|\s*([^|]*)\|", line)
        name = m and {"__init__": "serrinj"}.get(m.group(1), m.group(1))
        if m and name in ALLOWED:
            rows[name] = frozenset(re.findall(r"`([\w.]+?)/?(?:\.py)?`", m.group(2)))
    assert rows == ALLOWED
