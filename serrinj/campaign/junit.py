"""The JUnit XML report of a campaign run (Jenkins, GitLab)."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from typing import (
    IO,
    TYPE_CHECKING,
    Callable,
    List,
    Optional,
    Tuple,
)

from serrinj import __version__
from serrinj.errors import FileError

if TYPE_CHECKING:
    from serrinj.campaign.results import CampaignResult, Execution


# ---------------------------------------------------------------------- JUnit
# XML 1.0 cannot carry most control characters; console logs are full of them.
_XML_BAD = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")


def _xml_text(text: str) -> str:
    return _XML_BAD.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _junit_time(seconds: float) -> str:
    return f"{max(seconds, 0.0):.3f}"


def _junit(result: CampaignResult) -> str:
    suites = ET.Element("testsuites")
    suites.set("name", "serrinj")
    suites.set("tests", str(len(result.executions)))
    suites.set("failures", str(result.count("failed")))
    suites.set("errors", str(result.count("error")))
    suites.set("time", _junit_time(result.duration_s))
    suite = ET.SubElement(suites, "testsuite")
    attrs = {
        "name": result.name,
        "tests": str(len(result.executions)),
        "failures": str(result.count("failed")),
        "errors": str(result.count("error")),
        "skipped": str(result.count("skipped")),
        "time": _junit_time(result.duration_s),
        "timestamp": result.started_at,
        "hostname": result.hostname,
        "file": result.source,
    }
    for name, value in attrs.items():
        suite.set(name, _xml_text(value))
    props = ET.SubElement(suite, "properties")
    properties: List[Tuple[str, object]] = [
        ("serrinj.version", __version__),
        ("campaign.file", result.source),
        ("campaign.description", result.description),
        ("dry_run", "true" if result.dry_run else "false"),
    ]
    properties += [(f"vm.{k}", v) for k, v in result.vm.items() if v is not None]
    for k, v in properties:
        prop = ET.SubElement(props, "property")
        prop.set("name", k)
        prop.set("value", _xml_text(str(v)))
    classname = "serrinj." + result.name.replace(".", "_")
    for ex in result.executions:
        case = ET.SubElement(suite, "testcase")
        case.set("classname", _xml_text(classname))
        case.set("name", _xml_text(ex.name))
        case.set("time", _junit_time(ex.duration_s))
        if ex.outcome in ("failed", "error", "skipped"):
            tag = {"failed": "failure", "error": "error", "skipped": "skipped"}[ex.outcome]
            el = ET.SubElement(case, tag)
            el.set("message", _xml_text(ex.message))
            if ex.error:
                el.set("type", _xml_text(str(ex.error.get("kind", ""))))
            body = [ex.message]
            if ex.error and ex.error.get("hint"):
                body.append(f"hint: {ex.error['hint']}")
            if ex.error and ex.error.get("traceback"):
                body.append(str(ex.error["traceback"]))
            body.append(f"{result.source}:{ex.line}: step {ex.step}")
            el.text = _xml_text("\n".join(body))
        out = _system_out(ex)
        if out:
            so = ET.SubElement(case, "system-out")
            so.text = _xml_text(out)
    ET.indent(suites)
    text = ET.tostring(suites, encoding="unicode")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + text + "\n"


def _system_out(ex: Execution) -> str:
    parts: List[str] = []
    if ex.injections:
        parts.append(json.dumps(list(ex.injections), indent=2, sort_keys=True, default=str))
    if ex.detail:
        parts.append(json.dumps(dict(ex.detail), indent=2, sort_keys=True, default=str))
    return "\n".join(parts)


class JunitReport:
    """The JUnit report file, opened (created) with the caller's rights before the run.

    Under sudo, a place the caller may not write raises
    :class:`~serrinj.errors.PermissionDenied` here, before anything is sent; any
    other failure to open or write it is only reported through ``warn``.
    """

    def __init__(self, path: str, warn: Callable[[str], None]) -> None:
        from serrinj.host import privilege

        self.path = path
        self.warn = warn
        self.f: Optional[IO[str]] = None
        try:
            self.f = privilege.open_file(path, "w", "JUnit report", encoding="utf-8")
        except FileError as err:
            warn(f"cannot write the JUnit report {path}: {err.strerror}")

    def write(self, result: CampaignResult) -> None:
        if self.f is None:
            return
        try:
            with self.f:
                self.f.write(result.junit_xml())
        except OSError as err:
            self.warn(f"cannot write the JUnit report {self.path}: {err.strerror}")
        self.f = None
