"""JUnit XML from campaign results: valid against the Jenkins schema, and saying the right things.

The schema is ``tests/data/junit/junit-10.xsd`` (see the README beside it for
where it came from). Real runs are checked the same way in test_campaign.py.
"""

from __future__ import annotations

import hashlib
import os
import xml.etree.ElementTree as ET
from typing import Any, Dict, Iterator

import pytest
import xmlschema

from serrinj.campaign import CampaignResult, Execution
from serrinj.errors import InvalidInput, NotDelivered, TargetGone

HERE = os.path.dirname(os.path.abspath(__file__))
XSD = os.path.join(HERE, "data", "junit", "junit-10.xsd")
XSD_SHA256 = "a1a816f58d1bf95ebabf371994df0b9246dee66ea9572fbec4f9296f1b2c0ff6"


@pytest.fixture(scope="module")
def schema() -> Iterator[xmlschema.XMLSchema]:
    yield xmlschema.XMLSchema(XSD)


def validate(schema: xmlschema.XMLSchema, text: str) -> ET.Element:
    schema.validate(text)
    return ET.fromstring(text.encode("utf-8"))


def _ex(index: int, **kw: Any) -> Execution:
    base: Dict[str, Any] = dict(
        index=index,
        step=index,
        line=10 * index,
        kind="inject",
        label="inject nmi",
        step_name=None,
        vcpu=0,
        repetition=1,
        repetitions=1,
    )
    base.update(kw)
    return Execution(**base)


def sample() -> CampaignResult:
    injection = {"kind": "nmi", "vcpu_id": 0, "tid": 1234, "delivery": {"delivered": True}}
    return CampaignResult(
        name="lab.smoke",
        source="/srv/campaigns/smoke.toml",
        description="a & b <c>",
        started_at="2026-01-02T03:04:05+00:00",
        duration_s=12.3456789,
        dry_run=False,
        vm={"pid": 42, "name": "vm-a", "vmm": "qemu", "arch": "x86_64"},
        executions=(
            _ex(1, outcome="passed", duration_s=0.0123456, injections=(injection,),
                step_name="NMI", vcpu=1, repetition=2, repetitions=3),
            _ex(2, kind="expect", label="expect log /x/", vcpu=None, outcome="failed",
                message="no line matched \x1b[31mred\x1b[0m & <tags>",
                detail={"file": "/var/log/c", "matched": []}),
            _ex(3, outcome="failed", message="still pending",
                error={"kind": NotDelivered("x").kind, "message": "still pending",
                       "hint": "the fault stays pending", "exit_code": 7}),
            _ex(4, outcome="error", message="VM gone",
                error={"kind": TargetGone("x").kind, "message": "VM gone", "exit_code": 3,
                       "traceback": "Traceback ...\n  boom"}),
            _ex(5, kind="wait", label="wait 1 s", vcpu=None, outcome="skipped",
                message="not run: step 4 ended the campaign"),
        ),
        hostname="lab-1",
    )  # fmt: skip


def test_the_schema_is_the_recorded_file() -> None:
    with open(XSD, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == XSD_SHA256


def test_report_is_valid_and_complete(schema: xmlschema.XMLSchema) -> None:
    result = sample()
    root = validate(schema, result.junit_xml())
    assert root.tag == "testsuites"
    assert (root.get("tests"), root.get("failures"), root.get("errors")) == ("5", "2", "1")
    (suite,) = root.findall("testsuite")
    assert suite.get("name") == "lab.smoke"
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("5", "2", "1")
    assert suite.get("skipped") == "1"
    assert suite.get("time") == "12.346"
    assert suite.get("timestamp") == "2026-01-02T03:04:05+00:00"
    assert suite.get("hostname") == "lab-1"
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert props["vm.pid"] == "42" and props["vm.name"] == "vm-a"
    assert props["campaign.description"] == "a & b <c>"
    assert props["dry_run"] == "false"
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == [e.name for e in result.executions]
    assert cases[0].get("name") == "step 01: inject nmi [vcpu 1] [2/3] - NMI"
    assert cases[0].get("classname") == "serrinj.lab_smoke"
    assert cases[0].get("time") == "0.012"
    assert cases[0].find("failure") is None and cases[0].find("skipped") is None
    out = cases[0].findtext("system-out") or ""
    assert '"tid": 1234' in out and '"delivered": true' in out
    failure = cases[1].find("failure")
    assert failure is not None
    assert failure.get("message") == "no line matched \\x1b[31mred\\x1b[0m & <tags>"
    assert "/var/log/c" in (cases[1].findtext("system-out") or "")
    failure = cases[2].find("failure")
    assert failure is not None and failure.get("type") == "not-delivered"
    assert "hint: the fault stays pending" in (failure.text or "")
    assert "/srv/campaigns/smoke.toml:30: step 3" in (failure.text or "")
    error = cases[3].find("error")
    assert error is not None and error.get("type") == "target-gone"
    assert "Traceback ...\n  boom" in (error.text or "")
    skipped = cases[4].find("skipped")
    assert skipped is not None and skipped.get("message", "").startswith("not run: step 4")


def test_exit_code_follows_the_worst_outcome() -> None:
    result = sample()
    assert result.exit_code == 3  # the error's own code wins over failures
    failed_only = CampaignResult(**{**result.__dict__, "executions": result.executions[:3]})
    assert failed_only.exit_code == 9
    passed = CampaignResult(**{**result.__dict__, "executions": result.executions[:1]})
    assert passed.exit_code == 0 and passed.passed
    skipped = CampaignResult(**{**result.__dict__, "executions": result.executions[4:]})
    assert skipped.exit_code == 0


def test_a_campaign_that_could_not_start_still_reports(schema: xmlschema.XMLSchema) -> None:
    err = InvalidInput("c.toml:3: key 'steps[1].x': unknown key")
    result = CampaignResult.from_error(err, "/tmp/c.toml")
    root = validate(schema, result.junit_xml())
    case = root.find("testsuite/testcase")
    assert case is not None and case.get("name") == "step 00: load and check the campaign"
    error = case.find("error")
    assert error is not None and error.get("type") == "invalid-input"
    assert "unknown key" in (error.get("message") or "")
    assert result.exit_code == 2
    assert result.as_dict()["exit_code"] == 2


def test_every_control_character_is_made_printable(schema: xmlschema.XMLSchema) -> None:
    nasty = "".join(chr(i) for i in range(32)) + "\ufffe end"
    result = CampaignResult(
        **{
            **sample().__dict__,
            "executions": (_ex(1, outcome="failed", message=nasty, step_name=nasty),),
        }
    )
    root = validate(schema, result.junit_xml())
    failure = root.find("testsuite/testcase/failure")
    assert failure is not None
    message = failure.get("message") or ""
    assert "\\x00" in message and "\\x1f" in message and "\\xfffe" in message
    assert message.endswith(" end")


def test_the_schema_check_can_fail(schema: xmlschema.XMLSchema) -> None:
    """The validator is strict about what Jenkins needs (so passing means something)."""
    good = sample().junit_xml()
    for bad in (
        good.replace('time="12.346"', 'time="12.3456"', 1),  # Surefire time: 3 decimals
        good.replace('<testcase classname="serrinj.lab_smoke" name=', "<testcase label=", 1),
        good.replace('tests="5" failures="2" errors="1" skipped', "skipped", 1),
    ):
        assert bad != good
        with pytest.raises(xmlschema.XMLSchemaValidationError):
            schema.validate(bad)
