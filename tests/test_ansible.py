"""The fleet playbook, run for real: ansible-playbook -c local on this machine.

The playbook installs serrinj from this source tree into a fresh virtual
environment, copies the x86 example campaign, runs it against a test VM
started here, and fetches the JUnit report to the controller, where it is
validated and read. A second run with a failing campaign must mark the host
failed and still bring its report back.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from typing import Any, Dict

import pytest
import xmlschema

from tests.conftest import missing
from tests.test_campaign import EXAMPLES, ROOT, XSD, LoggedVm

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(os.uname().machine != "x86_64", reason="runs the x86_64 example"),
]

PLAYBOOK = os.path.join(EXAMPLES, "ansible", "run-campaign.yml")
INVENTORY = os.path.join(EXAMPLES, "ansible", "inventory.ini")


def _ansible(tool: str) -> str:
    found = shutil.which(tool, path=os.path.dirname(sys.executable)) or shutil.which(tool)
    if found:
        return found
    missing(f"{tool} is not installed; pip install 'ansible-core>=2.15' (a dev dependency)")


def _env(tmp: str) -> Dict[str, str]:
    env = dict(os.environ)
    env.update(
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_HOME=os.path.join(tmp, "ansible-home"),
        ANSIBLE_LOCAL_TEMP=os.path.join(tmp, "ansible-local"),
        ANSIBLE_REMOTE_TEMP=os.path.join(tmp, "ansible-remote"),
        ANSIBLE_RETRY_FILES_ENABLED="0",
        ANSIBLE_LOCALHOST_WARNING="0",
        ANSIBLE_INVENTORY_UNPARSED_WARNING="0",
    )
    return env


def _play(tmp: str, extra: Dict[str, Any]) -> subprocess.CompletedProcess[str]:
    argv = [_ansible("ansible-playbook"), "-i", "localhost,", "-c", "local", PLAYBOOK,
            "-e", json.dumps(extra)]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, env=_env(tmp), timeout=600)


def test_the_playbook_runs_the_campaign_and_fetches_the_report(tmp_path: Any) -> None:
    tmp = str(tmp_path)
    venv = os.path.join(tmp, "venv")
    reports = os.path.join(tmp, "reports")
    schema = xmlschema.XMLSchema(XSD)
    with LoggedVm(tmp, vcpus=2) as vm:
        common = {
            "ansible_python_interpreter": sys.executable,
            "serrinj_become": False,
            "serrinj_venv": venv,
            "serrinj_python": sys.executable,
            "serrinj_run_args": f"--pid {vm.pid} --log {vm.log_path}",
            "serrinj_workdir": os.path.join(tmp, "host-work"),
            "serrinj_reports": reports,
            "serrinj_environment": {
                "SERRINJ_AUDIT_LOG": os.environ["SERRINJ_AUDIT_LOG"],
                "SERRINJ_LOCK_DIR": os.environ["SERRINJ_LOCK_DIR"],
            },
        }
        run = _play(
            tmp,
            {
                **common,
                "campaign": os.path.join(EXAMPLES, "x86-smoke.toml"),
                "serrinj_install": "path",
                "serrinj_source": ROOT,
            },
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert "failed=0" in run.stdout
        # serrinj came from this tree, into the playbook's own virtual environment
        assert os.path.exists(os.path.join(venv, "bin", "serrinj"))
        report = os.path.join(reports, "localhost.xml")
        schema.validate(report)
        suite = ET.parse(report).getroot().find("testsuite")
        assert suite is not None and suite.get("name") == "x86-smoke"
        assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("9", "0", "0")
        props = {p.get("name"): p.get("value") for p in suite.iter("property")}
        assert props["vm.pid"] == str(vm.pid)
        names = [c.get("name") for c in suite.findall("testcase")]
        assert names[0] == (
            "step 01: inject nmi [vcpu 0] [1/2] - NMI on every vCPU, delivery confirmed"
        )
        assert len([e for e in vm.events() if e["event"] == "nmi"]) == 4
        assert len([e for e in vm.events() if e["event"] == "mce"]) == 1

        # A campaign that fails: the host fails, its report still comes back.
        failing = os.path.join(tmp, "failing.toml")
        with open(failing, "w", encoding="utf-8") as f:
            f.write(
                "[[steps]]\ninject = 'nmi'\nvcpus = [1]\nwait = 5\n"
                "[[steps]]\nexpect = 'log'\nmatch = 'never printed'\ntimeout = 0.2\n"
            )
        os.remove(report)
        run = _play(tmp, {**common, "campaign": failing, "serrinj_install": "none"})
        assert run.returncode != 0
        assert "the campaign exited with 9" in run.stdout
        assert "failed=1" in run.stdout
        schema.validate(report)
        suite = ET.parse(report).getroot().find("testsuite")
        assert suite is not None and suite.get("name") == "failing"
        assert (suite.get("tests"), suite.get("failures")) == ("2", "1")
        cases = suite.findall("testcase")
        assert cases[0].find("failure") is None
        failure = cases[1].find("failure")
        assert failure is not None and "never printed" in (failure.get("message") or "")


def test_the_example_inventory_parses() -> None:
    out = subprocess.run(
        [_ansible("ansible-inventory"), "-i", INVENTORY, "--list"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "ANSIBLE_NOCOLOR": "1"},
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    hosts = data["_meta"]["hostvars"]
    assert set(data["x86_labs"]["hosts"]) == {"lab-x86-1.example.net", "lab-x86-2.example.net"}
    assert hosts["lab-arm64-1.example.net"]["campaign"] == "../arm64-ras.toml"
    for host, hv in hosts.items():
        # every campaign the inventory names exists and fits its group's arch
        path = os.path.normpath(os.path.join(os.path.dirname(PLAYBOOK), hv["campaign"]))
        arch = "aarch64" if "arm64" in host else "x86_64"
        from serrinj.ops import campaign

        campaign.load(path, arch=arch)
