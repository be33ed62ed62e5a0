"""The command line imports only what its command needs (its start-up is most of an
NMI's wall time, and all of ``--help``'s).

Each check runs the command in a fresh Python, exactly as the ``serrinj`` script
does (:func:`serrinj.cli.main`), and reads ``sys.modules`` when it is done: an x86
NMI must not load the arm64 fault modules, the arm64 KVM tables or the syndrome
codec; ``status`` no fault kind at all; root never builds the policy's classes;
``--help`` no use case. Re-adding one eager import turns a check red.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from typing import Callable, FrozenSet, Sequence, Tuple

import pytest

from serrinj.testvm.process import TestVmProcess

#: what no command below may import unless it is about arm64, a machine check,
#: a campaign, a policy file or a "did you mean" suggestion
ARM64 = frozenset(
    {
        "serrinj.faults.serror",
        "serrinj.faults.ext_dabt",
        "serrinj.kvm.arm64",
        "serrinj.vcpu.arm64",
        "serrinj.vcpu.probe",
        "serrinj.codec.esr",
    }
)
NOT_NEEDED = frozenset(
    {
        "serrinj.faults.mce",
        "serrinj.codec.mce",
        "serrinj.codec.tomlsubset",
        "serrinj.ops.policy_model",
        "serrinj.kvm.vmm_structs",
        "serrinj.campaign",
        "serrinj.testvm",
        "difflib",
        "rich",
    }
)

#: the NMI and the arm64 checks are about an x86_64 host's test VM (the arm64 lab
#: does not run this file; its arm64 status imports the arm64 modules by design)
X86 = platform.machine() == "x86_64"

_PROBE = """
import json, sys
from serrinj.cli import main
try:
    main({argv!r})
except SystemExit as done:
    code = done.code
sys.stdout.flush()
sys.stderr.write("\\nMODULES " + json.dumps([code, sorted(sys.modules)]) + "\\n")
"""


def modules_of(argv: Sequence[str]) -> Tuple[str, FrozenSet[str]]:
    """Run ``serrinj ARGV`` in a fresh Python: (its stdout, the modules it imported).
    The command must succeed."""
    res = subprocess.run(
        [sys.executable, "-c", _PROBE.format(argv=list(argv))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    line = [x for x in res.stderr.splitlines() if x.startswith("MODULES ")]
    assert line, res.stderr
    code, modules = json.loads(line[-1][len("MODULES ") :])
    assert code in (0, None), f"serrinj {' '.join(argv)} exited {code}: {res.stderr}"
    return res.stdout, frozenset(modules)


def run_probe(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh Python; it must succeed."""
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )


def loaded(modules: FrozenSet[str], names: FrozenSet[str]) -> Sequence[str]:
    """The ``names`` (packages with everything under them) that ``modules`` holds."""
    return sorted(m for m in modules for n in names if m == n or m.startswith(n + "."))


def test_help_imports_no_use_case() -> None:
    _out, mods = modules_of(["--help"])
    serrinj = sorted(m for m in mods if m.startswith("serrinj"))
    assert serrinj == [
        "serrinj",
        "serrinj.cli",
        "serrinj.cli.options",
        "serrinj.cli.render",
        "serrinj.errors",
    ]
    assert not loaded(mods, NOT_NEEDED)


def test_esr_decode_imports_only_the_codec() -> None:
    out, mods = modules_of(["--json", "esr", "decode", "0x1811"])
    assert json.loads(out)["command"] == "esr decode"
    assert "serrinj.codec.esr" in mods
    assert not loaded(
        mods,
        frozenset({"serrinj.ops", "serrinj.target", "serrinj.remote", "serrinj.faults"})
        | frozenset({"serrinj._native", "serrinj.kvm", "cffi", "_cffi_backend"}),
    )
    assert not loaded(mods, NOT_NEEDED)


def test_fault_kinds_load_on_first_use() -> None:
    probe = (
        "import json, sys\n"
        "from serrinj.faults import KINDS\n"
        "kinds = list(KINDS); has = 'nmi' in KINDS\n"
        "before = sorted(m for m in sys.modules if m.startswith('serrinj.faults.'))\n"
        "KINDS['nmi']\n"
        "after = sorted(m for m in sys.modules if m.startswith('serrinj.faults.'))\n"
        "from serrinj.faults import SError\n"
        "print(json.dumps([kinds, has, before, after, SError.kind]))\n"
    )
    res = run_probe(probe)
    kinds, has, before, after, serror = json.loads(res.stdout)
    assert kinds == ["serror", "ext-dabt", "mce", "nmi"] and has
    # listing the kinds imports none of them; asking for the NMI imports the NMI alone
    assert not set(before) & {"serrinj.faults.nmi", "serrinj.faults.serror", "serrinj.faults.mce"}
    assert "serrinj.faults.nmi" in after
    assert not {"serrinj.faults.serror", "serrinj.faults.ext_dabt", "serrinj.faults.mce"} & set(
        after
    )
    assert serror == "serror"


@pytest.mark.skipif(not X86, reason="an x86_64 NMI needs an x86_64 test VM")
@pytest.mark.kvm
@pytest.mark.root
def test_x86_nmi_imports_no_arm64_no_mce_no_policy(
    start_vm: Callable[..., TestVmProcess],
) -> None:
    vm = start_vm(vcpus=2, mode="halt")
    out, mods = modules_of(["--json", "nmi", "--pid", str(vm.pid), "--vcpu", "1"])
    (injection,) = json.loads(out)["injections"]
    assert injection["kind"] == "nmi" and injection["vcpu_id"] == 1
    assert "serrinj.faults.nmi" in mods
    assert not loaded(mods, ARM64)
    assert not loaded(mods, NOT_NEEDED)


@pytest.mark.kvm
@pytest.mark.root
def test_status_imports_no_fault_kind(
    start_vm: Callable[..., TestVmProcess],
) -> None:
    vm = start_vm(vcpus=2, mode="halt")
    out, mods = modules_of(["status", "--json", "--pid", str(vm.pid)])
    assert [v["vcpu_id"] for v in json.loads(out)["vcpus"]] == [0, 1]
    assert not loaded(mods, frozenset({"serrinj.faults", "serrinj.ops.inject"}))
    assert not loaded(mods, NOT_NEEDED)
    if X86:
        assert not loaded(mods, ARM64)


def test_the_script_collects_young_objects_less_often() -> None:
    """The console script raises the youngest generation's threshold before the command
    line's modules load (about 40 collections of objects that are never garbage,
    otherwise, 17 of them while click and ``serrinj.cli`` load)."""
    probe = (
        "import gc, sys\n"
        "seen = []\n"
        "gc.callbacks.append(lambda phase, info: seen.append(phase) if phase == 'start' else 0)\n"
        "import serrinj.__main__ as script\n"
        "sys.argv = ['serrinj', '--version']\n"
        "try:\n"
        "    script.main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(gc.get_threshold()[0], script.GC_THRESHOLD_YOUNG, len(seen),"
        " 'serrinj.cli' in sys.modules)\n"
    )
    res = run_probe(probe)
    now, wanted, collections, loaded = res.stdout.split()[-4:]
    assert int(now) == int(wanted) >= 5000
    assert loaded == "True" and int(collections) <= 6, res.stdout


def test_difflib_only_for_a_suggestion() -> None:
    """Every fault kind and codec imports without ``difflib``; a misspelt flag still
    gets its "did you mean"."""
    probe = (
        "import sys\n"
        "from serrinj.faults import KINDS\n"
        "from serrinj.codec import esr, mce, tomlsubset\n"
        "dict(KINDS.items())\n"
        "print('difflib' in sys.modules)\n"
        "try:\n"
        "    mce.parse_value('VAL,UCC', 'status', mce.STATUS_BITS)\n"
        "except Exception as err:\n"
        "    print(err)\n"
    )
    res = run_probe(probe)
    before, message = res.stdout.splitlines()[:2]
    assert before == "False"
    assert "did you mean 'uc'" in message
