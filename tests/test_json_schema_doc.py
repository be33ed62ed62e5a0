"""docs/json-schema.md against the real ``--json`` output, so the document cannot drift.

Every object the document draws (the ```text blocks: ``{ "schema", "command": "list",
"vms": [VM, ...] }``) is parsed for its top-level keys, and the commands are run for
real: each documented key must be in the output, and each key of the output must be
documented. The commands that need no VM always run; the others run against the
built-in test VM (``kvm``/``root``), except ``inject`` (an arm64 command), which runs
on fakes of the arm64 host and engine (``tests/test_cli_unit.py``). A command the
document describes and this test does not run is a failure, not a skip.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, FrozenSet, List, Optional, Sequence, Set

import pytest

from serrinj.testvm.process import TestVmProcess
from tests import test_cli_unit
from tests.helpers import serrinj_cli
from tests.helpers.testvm import VmFactory

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "json-schema.md"
X86 = os.uname().machine == "x86_64"

#: the fixture with the fakes of an arm64 host and engine, shared with the CLI unit tests
arm64_fakes = test_cli_unit.fake_host


# ====================================================================== the document
@dataclass(frozen=True)
class Shape:
    """One documented object: its top-level keys, those in ``[, ...]`` being optional."""

    keys: FrozenSet[str]
    optional: FrozenSet[str]
    command: Optional[str]  # its "command": "..." value, when the drawing gives one
    text: str

    def problems(self, data: Dict[str, Any]) -> List[str]:
        """What is wrong with ``data`` for this shape (nothing: it matches)."""
        out = []
        missing = self.keys - self.optional - set(data)
        if missing:
            out.append(f"documented but missing: {sorted(missing)}")
        extra = set(data) - self.keys
        if extra:
            out.append(f"present but not documented: {sorted(extra)}")
        return out


def shapes_of(block: str) -> List[Shape]:
    """The top-level ``{...}`` drawings of a text block.

    A quoted word at brace depth 1 is a key unless a ``:`` precedes it (then it is the
    value of the key before); keys inside ``[, ...]`` are optional. Nested ``{...}`` and
    unquoted words (``[VM, ...]``, ``bool``) are not keys.
    """
    out: List[Shape] = []
    depth = 0
    start = 0
    keys: List[str] = []
    optional: List[str] = []
    brackets: List[bool] = []  # for each open [ at depth 1: does it start with ","?
    command: Optional[str] = None
    last_key = ""
    i = 0
    while i < len(block):
        ch = block[i]
        if ch == "{":
            depth += 1
            if depth == 1:
                start, keys, optional, brackets, command, last_key = i, [], [], [], None, ""
        elif ch == "}":
            depth -= 1
            if depth == 0:
                text = block[start : i + 1]
                out.append(Shape(frozenset(keys), frozenset(optional), command, text))
        elif depth == 1 and ch == "[":
            brackets.append(block[i + 1 :].lstrip().startswith(","))
        elif depth == 1 and ch == "]" and brackets:
            brackets.pop()
        elif ch == '"':
            end = block.index('"', i + 1)
            word = block[i + 1 : end]
            if depth == 1:
                if block[:i].rstrip().endswith(":"):
                    if last_key == "command":
                        command = word
                else:
                    keys.append(word)
                    last_key = word
                    if any(brackets):
                        optional.append(word)
            i = end
        i += 1
    return out


def documented() -> Dict[str, List[Shape]]:
    """Command -> the object shapes the document gives for it."""
    text = DOC.read_text()
    out: Dict[str, List[Shape]] = {}
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        heading, _, body = section.partition("\n")
        commands = re.findall(r"`([a-z ]+)`", heading)
        for block in re.findall(r"```text\n(.*?)```", body, flags=re.S):
            for shape in shapes_of(block):
                for command in [shape.command] if shape.command else commands:
                    out.setdefault(command, []).append(shape)
    return out


def documented_error() -> Dict[str, Any]:
    section = DOC.read_text().split("\n## Errors\n", 1)[1]
    block = re.search(r"```json\n(.*?)```", section, flags=re.S)
    assert block is not None, "the Errors section has no JSON example"
    example = json.loads(block.group(1))
    assert isinstance(example, dict)
    return example


# ====================================================================== running serrinj
def serrinj(*args: object, check: bool = True) -> List[Dict[str, Any]]:
    """Run ``serrinj ARGS`` and return its JSON: one object, or JSON lines."""
    r = serrinj_cli.run(*args, timeout=120)
    if check:
        assert r.rc == 0, r
    return r.lines


def check(command: str, outputs: Sequence[Dict[str, Any]]) -> Set[int]:
    """Every output object matches a documented shape of ``command``; returns which
    shapes (their indexes in the document's order) were matched."""
    shapes = documented().get(command)
    assert shapes, f"docs/json-schema.md draws no object for {command!r}"
    matched: Set[int] = set()
    for data in outputs:
        assert data.get("schema") == "serrinj/1" and data.get("command") == command, data
        problems = [shape.problems(data) for shape in shapes]
        fits = {i for i, p in enumerate(problems) if not p}
        assert fits, f"{command}: {sorted(data)} matches no documented object: {problems}"
        matched |= fits
    return matched


#: every command the document describes, and the test below that runs it
RUN_BY = {
    "esr decode": "test_commands_without_a_vm",
    "esr encode": "test_commands_without_a_vm",
    "list": "test_commands_without_a_vm",
    "inject": "test_inject_on_a_fake_arm64_host",
    "status": "test_commands_on_the_test_vm",
    "nmi": "test_commands_on_the_test_vm",
    "mce": "test_commands_on_the_test_vm",
    "events save": "test_commands_on_the_test_vm",
    "events load": "test_commands_on_the_test_vm",
    "run": "test_commands_without_a_vm (--check-only), test_commands_on_the_test_vm",
    "demo": "test_demo",
}


# ====================================================================== the tests
def test_the_document_is_parsed_as_drawn() -> None:
    (shape,) = shapes_of('{ "schema", "command": "demo", "ok": bool, "t": {"x": 1} [, "e": 1] }')
    assert shape.keys == {"schema", "command", "ok", "t", "e"} and shape.optional == {"e"}
    assert shape.command == "demo"
    docs = documented()
    # a command the document describes must be run by one of the tests here
    assert set(docs) == set(RUN_BY)
    assert len(docs["run"]) == 3  # the event lines, the result line, --check-only
    assert [len(docs[c]) for c in RUN_BY if c != "run"] == [1] * (len(RUN_BY) - 1)


def test_commands_without_a_vm(tmp_path: Path) -> None:
    assert check("esr decode", serrinj("esr", "decode", "0xbe001811", "--json")) == {0}
    assert check("esr decode", serrinj("esr", "decode", "--json", "0x96000010")) == {0}
    assert check("esr encode", serrinj("esr", "encode", "--severity", "uer", "--json")) == {0}
    assert check("list", serrinj("list", "--json")) == {0}
    campaign = tmp_path / "c.toml"
    campaign.write_text("[[steps]]\ninject = 'nmi'\n[[steps]]\nexpect = 'delivered'\n")
    assert check("run", serrinj("run", campaign, "--check-only", "--json")) == {2}
    # the error object: its keys and the error's keys, as the Errors section shows them
    example = documented_error()
    (err,) = serrinj("nmi", "--pid", 2**22 + 1, "--json", check=False)
    assert list(err) == list(example) == ["schema", "command", "error"]
    assert list(err["error"]) == list(example["error"])


def test_inject_on_a_fake_arm64_host(arm64_fakes: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from serrinj import cli

    for args in (["--severity", "ce"], ["--esr", "0x11", "--dry-run"]):
        arm64_fakes("aarch64")  # a fresh vCPU: the first SError stays pending on the fake
        assert cli.run(["inject", "--json", *args]) == 0
        assert check("inject", [json.loads(capsys.readouterr().out)]) == {0}


@pytest.fixture
def vm(start_vm: VmFactory) -> TestVmProcess:
    return start_vm(vcpus=2, mode="halt")


@pytest.mark.kvm
@pytest.mark.root
@pytest.mark.skipif(not X86, reason="the x86_64 test VM; arm64 runs in the lab")
def test_commands_on_the_test_vm(vm: TestVmProcess, tmp_path: Path) -> None:
    pid = ["--pid", vm.pid]
    assert check("status", serrinj("status", *pid, "--json")) == {0}
    assert check("nmi", serrinj("nmi", *pid, "--vcpu", "all", "--wait", "--json")) == {0}
    mce = ["mce", *pid, "--vcpu", 0, "--bank", 1, "--preset", "corrected", "--json"]
    assert check("mce", serrinj(*mce)) == {0}
    saved = tmp_path / "events.json"
    assert check("events save", serrinj("events", "save", *pid, "-o", saved, "--json")) == {0}
    assert check("events load", serrinj("events", "load", saved, *pid, "--json")) == {0}
    campaign = tmp_path / "c.toml"
    campaign.write_text(
        "[[steps]]\ninject = 'nmi'\nvcpus = [1]\nwait = 5\n[[steps]]\nexpect = 'delivered'\n"
    )
    lines = serrinj("run", campaign, *pid, "--junit", tmp_path / "r.xml", "--json")
    assert [line.get("event", {}).get("event") for line in lines] == [
        "campaign-started",
        *["step-started", "step-finished"] * 2,
        "campaign-finished",
        None,  # the result, last
    ]
    assert check("run", lines[:-1]) == {0}  # event lines
    assert check("run", lines[-1:]) == {1}  # the result line
    assert lines[-1]["exit_code"] == 0 and lines[-1]["junit"] == str(tmp_path / "r.xml")


@pytest.mark.kvm
def test_demo() -> None:
    assert check("demo", serrinj("demo", "--json")) == {0}
