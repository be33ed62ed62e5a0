"""The public Python API: its examples, its types, its wheel, and real VMs.

- docs/api.md's examples run, in order, against the built-in test VM;
- a typed user script passes ``mypy --strict`` against the *installed wheel*
  (built here from the checkout, offline), and a wrong one fails it;
- the wheel declares no runtime dependency beyond the command's own, ships
  ``py.typed`` and the pytest11 entry point;
- ``import serrinj`` stays cheap: nothing beyond the package itself is
  imported until an API name is used, and the command line never imports it;
- finding by pid, libvirt domain and fd; a session holds the VM lock; the
  exceptions carry the exit codes the command exits with.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

import serrinj
from serrinj import errors
from serrinj.target import discover
from serrinj.testvm.process import TestVmProcess
from tests.helpers import serrinj_cli
from tests.helpers.testvm import VmFactory
from tests.test_campaign import ROOT, LoggedVm

DOC = Path(ROOT) / "docs" / "api.md"
HOST_ARCH = "arm64" if os.uname().machine == "aarch64" else "x86_64"
X86 = pytest.mark.skipif(HOST_ARCH != "x86_64", reason="x86_64 faults (NMI, MCE)")


# ---------------------------------------------------------------------- the docs
def doc_blocks() -> List[Tuple[str, str]]:
    """(info string, code) of every ```python block of docs/api.md, in order."""
    text = DOC.read_text()
    return [
        (m.group(1).strip(), m.group(2))
        for m in re.finditer(r"```python([^\n]*)\n(.*?)```", text, re.S)
    ]


@pytest.fixture
def test_vm(start_vm: VmFactory) -> TestVmProcess:
    return start_vm(vcpus=2, mode="halt", ready=False)


@pytest.mark.kvm
def test_the_documented_examples_run(
    test_vm: TestVmProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    blocks = doc_blocks()
    assert len(blocks) >= 8
    ran = 0
    namespace: Dict[str, Any] = {"PID": test_vm.pid}
    for info, code in blocks:
        if info and info != HOST_ARCH:
            assert info in ("arm64", "x86_64"), f"unknown block tag {info!r}"
            continue
        exec(compile(code, f"{DOC}:block{ran}", "exec"), namespace)
        ran += 1
    assert ran == len([b for b in blocks if b[0] in ("", HOST_ARCH)])
    out = capsys.readouterr().out
    assert "NMIs/s" in out and "NMI taken after" in out
    # what the examples sent, the guest saw
    nmis = [e for e in test_vm.events_seen if e.get("event") == "nmi"]
    assert len(nmis) >= 2  # the single NMI on vCPU 1, and the session's (merged or not)
    mces = [e for e in test_vm.events_seen if e.get("event") == "mce"]
    assert mces and mces[0]["banks"][0]["status"] == 0xBD000000000000C0
    assert test_vm.alive()


def test_every_public_name_is_documented() -> None:
    text = DOC.read_text()
    for name in serrinj.__all__:
        value = getattr(serrinj, name)
        if name.startswith("__"):
            continue
        assert f"`{name}" in text or f"serrinj.{name}" in text or f".{name}(" in text, name
        if callable(value):
            assert (value.__doc__ or "").strip(), f"serrinj.{name} has no docstring"
    for name in ("Vm", "Session"):
        cls = getattr(serrinj, name)
        for attr in dir(cls):
            if not attr.startswith("_"):
                assert (getattr(cls, attr).__doc__ or "").strip(), f"{name}.{attr}"


def test_each_exception_carries_the_commands_exit_code() -> None:
    table = {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"^\| `(\w+)`(?: \([^)]*\))? \| (\d+) \|", DOC.read_text(), re.M)
    }
    classes = {n: getattr(serrinj, n) for n in serrinj.__all__ if n in table}
    assert set(table) == {
        n for n in serrinj.__all__ if isinstance(getattr(serrinj, n), type)
        and issubclass(getattr(serrinj, n), errors.SerrinjError)
    }  # fmt: skip
    for name, code in table.items():
        assert int(classes[name].exit_code) == code, name


# ---------------------------------------------------------------------- import cost
def _modules_after(code: str) -> List[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"import sys; {code}; print(' '.join(sorted(sys.modules)))"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return out.stdout.split()


def test_import_serrinj_imports_nothing_until_a_name_is_used() -> None:
    mods = _modules_after("import serrinj")
    assert [m for m in mods if m.startswith("serrinj")] == ["serrinj"]
    mods = _modules_after("import serrinj; serrinj.SerrinjError")
    assert "serrinj.errors" in mods and "serrinj.api" not in mods
    mods = _modules_after("import serrinj; serrinj.find")
    assert "serrinj.api" in mods and "serrinj.cli" not in mods and "click" not in mods
    with pytest.raises(AttributeError):
        serrinj.no_such_name  # noqa: B018


def test_the_command_line_does_not_import_the_api() -> None:
    code = (
        "import sys; from serrinj.cli import run; rc = run(['--json', 'esr', 'decode', '0x11']);"
        " sys.stdout.flush(); print('MODULES', ' '.join(sorted(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    mods = out.stdout.split("MODULES", 1)[1].split()
    assert "serrinj.api" not in mods and "serrinj.pytest_plugin" not in mods


def test_the_api_and_the_plugin_keep_the_layers() -> None:
    """click and rich stay the command line's; pytest only the plugin's; the API imports
    neither (it calls the use cases)."""
    import ast

    pkg = Path(ROOT) / "serrinj"
    for path in pkg.rglob("*.py"):
        rel = path.relative_to(pkg).as_posix()
        tops = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                tops.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                tops.add(node.module.split(".")[0])
        if not rel.startswith("cli/"):
            assert not tops & {"click", "rich"}, rel
        if rel != "pytest_plugin.py":
            assert not tops & {"pytest", "_pytest", "pluggy"}, rel


# ---------------------------------------------------------------------- the wheel
USER_SCRIPT = """
from __future__ import annotations

from typing import List, Optional

import serrinj


def nmis(pid: int, vcpu: int, count: int) -> List[Optional[float]]:
    vm: serrinj.Vm = serrinj.find(pid=pid)
    latencies: List[Optional[float]] = []
    with vm.session() as s:
        for _ in range(count):
            inj: serrinj.Injection = s.nmi(vcpu=vcpu, wait=5.0)
            latencies.append(inj.delivery.latency_s if inj.delivery else None)
    return latencies


def check(pid: int) -> int:
    try:
        report: serrinj.StatusReport = serrinj.find(pid=pid).status()
    except serrinj.SerrinjError as err:
        code: serrinj.ExitCode = err.exit_code
        return int(code)
    states: List[str] = [v.state for v in report.vcpus]
    snap: serrinj.EventsSnapshot = serrinj.find(pid=pid).save_events()
    missing: Optional[str] = serrinj.capability_missing("ras")
    print(states, snap.arch, missing, serrinj.__version__)
    return 0
"""
BAD_SCRIPT = """
import serrinj

vm = serrinj.find(pid="1234")
inj = vm.nmi(vcpu="1")
latency: int = inj.delivered
"""


def build_wheel(out: Path) -> Path:
    """serrinj's wheel, built offline from a clean copy of the checkout's sources (an in-tree
    build would reuse a stale build/ directory)."""
    src = out / "src"
    shutil.copytree(
        os.path.join(ROOT, "serrinj"), src / "serrinj",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )  # fmt: skip
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout + build.stderr
    (whl,) = out.glob("serrinj-*.whl")
    return whl


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.mark.slow
def test_the_wheel_adds_no_runtime_dependency(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    requires = [
        line.split(":", 1)[1].strip()
        for line in meta.splitlines()
        if line.startswith("Requires-Dist:")
    ]
    runtime = sorted(
        r.split(";")[0].split(">")[0].split("=")[0].strip() for r in requires if "extra ==" not in r
    )
    assert runtime == ["cffi", "click", "rich"], requires
    assert "serrinj/py.typed" in names
    assert "serrinj/api.py" in names and "serrinj/pytest_plugin.py" in names
    assert "[pytest11]" in entry and "serrinj.pytest_plugin = serrinj.pytest_plugin" in entry


@pytest.mark.slow
def test_a_typed_script_passes_mypy_strict_against_the_installed_wheel(
    wheel: Path, tmp_path: Path
) -> None:
    """Installed into a fresh environment (no source tree on the path), as a user has it."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(site),
         str(wheel)],
        check=True, capture_output=True,
    )  # fmt: skip
    work = tmp_path / "user"
    work.mkdir()
    (work / "good.py").write_text(textwrap.dedent(USER_SCRIPT))
    (work / "bad.py").write_text(textwrap.dedent(BAD_SCRIPT))

    def mypy(script: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mypy", "--strict", "--no-incremental",
             "--python-executable", str(venv / "bin" / "python"), script],
            capture_output=True, text=True, cwd=work, timeout=300,
            env={k: v for k, v in os.environ.items() if k not in ("MYPYPATH", "PYTHONPATH")},
        )  # fmt: skip

    good = mypy("good.py")
    assert good.returncode == 0, good.stdout + good.stderr
    bad = mypy("bad.py")
    assert bad.returncode == 1, bad.stdout
    for error in ('"find" has incompatible type "str"', 'Argument "vcpu" to "nmi"',
                  'expression has type "bool | None", variable has type "int"'):  # fmt: skip
        assert error in bad.stdout, bad.stdout
    # the types came from the installed wheel, not from this checkout
    assert str(site) in subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import serrinj; print(serrinj.__file__)"],
        capture_output=True, text=True, cwd=work, check=True,
    ).stdout  # fmt: skip


# ---------------------------------------------------------------------- real VMs
@pytest.mark.kvm
@X86
def test_find_by_fd_and_by_libvirt_domain(
    test_vm: TestVmProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fd1 = test_vm.vcpu(1).fd
    vm = serrinj.find(pid=test_vm.pid, fd=fd1)
    assert vm.pid == test_vm.pid
    mark = test_vm.mark()
    assert vm.nmi(wait=5.0).vcpu_id == 1  # the fd's vCPU is the default
    test_vm.wait_event(lambda e: e.get("event") == "nmi" and e["vcpu"] == 1, since=mark)
    with pytest.raises(serrinj.InvalidInput):
        serrinj.find(pid=test_vm.pid, fd=0)  # not a vCPU fd
    # libvirt keeps /run/libvirt/qemu/DOMAIN.pid; here a directory of the same shape
    run = tmp_path / "libvirt-qemu"
    run.mkdir()
    (run / "lab-vm.pid").write_text(f"{test_vm.pid}\n")
    monkeypatch.setattr(discover, "LIBVIRT_RUN_DIRS", (str(run),))
    assert serrinj.find(domain="lab-vm").pid == test_vm.pid
    with pytest.raises(serrinj.TargetNotFound) as err:
        serrinj.find(domain="other-vm")
    assert "no running libvirt domain 'other-vm'" in err.value.message
    assert err.value.exit_code == 3


@pytest.mark.kvm
@X86
def test_a_vm_handle_notices_its_vm_is_gone() -> None:
    # not the start_vm fixture: the VM must end inside the test, while the handle lives
    with TestVmProcess.start(vcpus=1) as tv:
        vm = serrinj.find(pid=tv.pid)
        assert vm.nmi(wait=5.0).delivered
    with pytest.raises(serrinj.TargetGone) as err:
        vm.nmi()
    assert err.value.exit_code == 3 and "is gone" in err.value.message


@pytest.mark.kvm
@pytest.mark.root
@X86
def test_a_session_holds_the_vm_lock(tmp_path: Path) -> None:
    with LoggedVm(str(tmp_path), vcpus=2) as lvm:
        vm = serrinj.find(pid=lvm.pid)
        s = vm.session()
        with pytest.raises(serrinj.InvalidInput):
            s.nmi(vcpu=0)  # not open yet
        with s:
            assert s.nmi(vcpu=0, wait=5.0).delivered
            cli = serrinj_cli.run(
                "--json", "--lock-wait", "0", "nmi", "--pid", lvm.pid, "--vcpu", "1"
            )
            assert cli.rc == 8, cli
            assert cli.data["error"]["kind"] == "conflict"
            assert s.nmi(vcpu=1, wait=5.0).delivered
        cli = serrinj_cli.run("--json", "nmi", "--pid", lvm.pid, "--vcpu", "1", "--wait")
        assert cli.rc == 0, cli  # released at the end of the block
        assert len([e for e in lvm.events() if e["event"] == "nmi"]) == 3


@pytest.mark.kvm
@X86
def test_the_api_and_the_command_fail_alike(test_vm: TestVmProcess) -> None:
    vm = serrinj.find(pid=test_vm.pid)
    cases = [
        (lambda: vm.mce(99, preset="corrected", vcpu=0),
         ["mce", "--bank", "99", "--preset", "ce", "--vcpu", "0"]),
        (lambda: vm.inject_serror(severity="ce", vcpu=0),
         ["inject", "--severity", "ce", "--vcpu", "0"]),
        (lambda: vm.nmi(vcpu=7), ["nmi", "--vcpu", "7"]),
        (lambda: vm.nmi(), ["nmi"]),
    ]  # fmt: skip
    for call, argv in cases:
        with pytest.raises(serrinj.SerrinjError) as err:
            call()
        cli = serrinj_cli.run("--json", *argv, "--pid", test_vm.pid)
        data = cli.data["error"]
        assert (err.value.kind, int(err.value.exit_code)) == (data["kind"], cli.rc), argv
        assert err.value.message == data["message"], argv
