"""The fleet playbook, run for real: ansible-playbook -c local on this machine.

The playbook builds serrinj's wheel from this checkout on the controller,
installs it offline (pip --no-index) into a fresh virtual environment whose
dependencies come from the distribution's Python packages, copies the x86
example campaign, runs it against a test VM started here, and fetches the
JUnit report to the controller, where it is validated and read. A second run
with a failing campaign must mark the host failed and still bring its report
back. A third runs the pytest suite of examples/pytest from a given wheel.
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
from tests.test_api import build_wheel
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


#: the system Python the playbook's venv is made from; its Debian packages provide
#: serrinj's dependencies (the hosts install offline)
SYSTEM_PYTHON = "/usr/bin/python3"
SYSTEM_MODULES = ("click", "rich", "cffi", "pytest")


def _system_python() -> str:
    probe = subprocess.run(
        [SYSTEM_PYTHON, "-c", f"import venv, {', '.join(SYSTEM_MODULES)}"],
        capture_output=True, text=True,
    )  # fmt: skip
    if probe.returncode != 0:
        missing(
            f"{SYSTEM_PYTHON} lacks serrinj's dependencies ({probe.stderr.strip()[-120:]});"
            " run `make deps` (python3-click python3-rich python3-cffi python3-pytest)"
        )
    return SYSTEM_PYTHON


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
            "serrinj_python": _system_python(),
            "serrinj_run_args": f"--pid {vm.pid} --log {vm.log_path}",
            "serrinj_workdir": os.path.join(tmp, "host-work"),
            "serrinj_reports": reports,
            "serrinj_environment": {
                "SERRINJ_AUDIT_LOG": os.environ["SERRINJ_AUDIT_LOG"],
                "SERRINJ_LOCK_DIR": os.environ["SERRINJ_LOCK_DIR"],
            },
        }
        # the default install: a wheel built from this checkout, installed offline
        run = _play(
            tmp,
            {
                **common,
                "campaign": os.path.join(EXAMPLES, "x86-smoke.toml"),
                "serrinj_source": ROOT,
            },
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert "failed=0" in run.stdout
        # serrinj came from the wheel, into the playbook's own virtual environment
        _check_installed_from_wheel(venv)
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


def _check_installed_from_wheel(venv: str) -> None:
    assert os.path.exists(os.path.join(venv, "bin", "serrinj"))
    where = subprocess.run(
        [os.path.join(venv, "bin", "python"), "-c",
         "import serrinj, importlib.metadata as m; print(serrinj.__file__);"
         " print(m.distribution('serrinj').read_text('INSTALLER'))"],
        capture_output=True, text=True, cwd="/", check=True,
    ).stdout.split()  # fmt: skip
    assert where[0].startswith(venv) and where[0].endswith("site-packages/serrinj/__init__.py")
    assert where[1] == "pip"


def test_the_playbook_runs_a_pytest_suite_from_a_wheel(tmp_path: Any) -> None:
    tmp = str(tmp_path)
    wheel = str(build_wheel(tmp_path / "dist"))
    venv = os.path.join(tmp, "venv")
    reports = os.path.join(tmp, "reports")
    with LoggedVm(tmp, vcpus=2) as vm:
        run = _play(
            tmp,
            {
                "ansible_python_interpreter": sys.executable,
                "serrinj_become": False,
                "serrinj_venv": venv,
                "serrinj_python": _system_python(),
                "serrinj_wheel": wheel,
                "suite": os.path.join(EXAMPLES, "pytest"),
                "serrinj_pytest_args": f"--serrinj-pid {vm.pid} --serrinj-console {vm.log_path}",
                "serrinj_workdir": os.path.join(tmp, "host-work"),
                "serrinj_reports": reports,
                "serrinj_environment": {
                    "SERRINJ_AUDIT_LOG": os.environ["SERRINJ_AUDIT_LOG"],
                    "SERRINJ_LOCK_DIR": os.environ["SERRINJ_LOCK_DIR"],
                },
            },
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert "failed=0" in run.stdout
        assert "4 passed, 2 skipped" in run.stdout
        assert len([e for e in vm.events() if e["event"] == "nmi"]) == 1
    _check_installed_from_wheel(venv)
    report = os.path.join(reports, "localhost.xml")
    xmlschema.XMLSchema(XSD).validate(report)
    root = ET.parse(report).getroot()
    cases = {c.get("name"): [x.tag for x in c] for c in root.iter("testcase")}
    assert (
        cases["test_an_nmi_is_handled"] == []
        and cases["test_an_uncorrected_machine_check_is_logged"] == []
    )
    assert cases["test_a_corrected_serror_is_survived"] == ["skipped"]
    props = {p.get("name"): p.get("value") for p in root.iter("property")}
    assert any(
        k.endswith("serrinj.injection.1") and v.startswith("nmi vm pid") for k, v in props.items()
    )


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
    from serrinj import campaign

    for host, hv in hosts.items():
        assert hv["serrinj_install"] == "wheel"
        assert ("campaign" in hv) != ("suite" in hv), host
        if "suite" in hv:
            # the suite the inventory names exists, with its tests
            path = os.path.normpath(os.path.join(os.path.dirname(PLAYBOOK), hv["suite"]))
            assert any(f.startswith("test_") for f in os.listdir(path)), path
            continue
        # every campaign the inventory names exists and fits its group's arch
        path = os.path.normpath(os.path.join(os.path.dirname(PLAYBOOK), hv["campaign"]))
        arch = "aarch64" if "arm64" in host else "x86_64"
        campaign.load(path, arch=arch)
