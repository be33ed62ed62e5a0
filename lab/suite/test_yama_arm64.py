"""Yama's ptrace_scope 0, 1 and 2, on the lab's Debian kernel (the x86 CI host has no Yama).

The lab is a VM of its own, so the test may set ``kernel.yama.ptrace_scope`` and
open /dev/kvm to every user there; both are put back afterwards. One arm64 test VM
runs as uid 65534 with no capability (an ordinary user's VMM). For each scope:

- serrinj as that same user (no capability; serrinj is not the VMM's ancestor):
  scope 0 lets it inject, scope 1 (descendants only) and 2 (admin only) refuse it
  with exit 4 and a message naming the scope, and nothing reaches the guest;
- serrinj as root (CAP_SYS_PTRACE, which Yama's scopes 1 and 2 accept) injects.

What reached the guest is what the guest read from its own ESR_EL1 (its ``serror``
reports). Scope 3 cannot be lowered again without a reboot: it is not set here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest

from lab.guest.testvm import EVENT_TIMEOUT_S, START_TIMEOUT_S, on, serrors, trouble
from serrinj.testvm.process import TestVmProcess

SCOPE = "/proc/sys/kernel/yama/ptrace_scope"
NOBODY = 65534
EC_SERROR = 0x2F
#: scope -> the words serrinj's refusal must hold for a same-uid user without capabilities
REFUSAL = {
    1: ["Yama ptrace_scope is 1 (descendants only)", "CAP_SYS_PTRACE"],
    2: ["Yama ptrace_scope is 2 (admin only)", "CAP_SYS_PTRACE"],
}
_IDS = f"{NOBODY}, {NOBODY}, {NOBODY}"
_DROP = (
    f"import os, sys; os.setgroups([]); os.setresgid({_IDS}); os.setresuid({_IDS});"
    " os.execv(sys.executable, [sys.executable] + sys.argv[1:])"
)


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    """A directory uid 65534 may write: its python wrapper, audit log and locks."""
    d = Path(tempfile.mkdtemp(prefix="serrinj-yama-"))
    d.chmod(0o777)
    script = d / "python-nobody"
    # setresuid from root drops every capability: an ordinary user's process
    script.write_text(f'#!/bin/sh\nexec {sys.executable} -c "{_DROP}" "$@"\n')
    script.chmod(0o755)
    try:
        yield d
    finally:
        subprocess.run(["rm", "-rf", str(d)], check=False)


@pytest.fixture(scope="module")
def yama() -> Iterator[str]:
    """The boot's ptrace_scope, restored after the module."""
    if not os.path.exists(SCOPE):
        pytest.fail("the lab kernel has no Yama (CONFIG_SECURITY_YAMA): this test needs it")
    with open(SCOPE) as f:
        before = f.read().strip()
    try:
        yield before
    finally:
        _write(SCOPE, before)


@pytest.fixture(scope="module")
def kvm_for_everyone() -> Iterator[None]:
    """/dev/kvm open to every user (as a distribution's kvm group does), then put back."""
    mode = os.stat("/dev/kvm").st_mode & 0o7777
    os.chmod("/dev/kvm", 0o666)
    try:
        yield
    finally:
        os.chmod("/dev/kvm", mode)


@pytest.fixture(scope="module")
def vm(workdir: Path, yama: str, kvm_for_everyone: None) -> Iterator[TestVmProcess]:
    """An arm64 test VM as uid 65534 with no capability."""
    proc = start_as_nobody(workdir)
    try:
        with open(f"/proc/{proc.pid}/status") as f:
            st = f.read()
        assert f"Uid:\t{NOBODY}\t" in st and "CapEff:\t0000000000000000" in st, st
        yield proc
    finally:
        proc.stop()


def start_as_nobody(workdir: Path) -> TestVmProcess:
    vm = TestVmProcess.start(
        arch="arm64", vcpus=1, mode="halt", timeout=START_TIMEOUT_S,
        python=str(workdir / "python-nobody"),
    )  # fmt: skip
    try:
        vm.wait_event(on("guest-ready", 0), EVENT_TIMEOUT_S)
    except BaseException:
        vm.stop()
        raise
    return vm


def serrinj_as(uid: int, workdir: Path, *args: str) -> Tuple[int, str, str]:
    """``python3 -m serrinj --json ARGS`` as ``uid`` (65534: no capability at all)."""
    env: Dict[str, str] = {
        **os.environ,
        "SERRINJ_AUDIT_LOG": str(workdir / f"audit-{uid}.jsonl"),
        "SERRINJ_LOCK_DIR": str(workdir / f"locks-{uid}"),
    }
    cmd: List[str] = [sys.executable, "-m", "serrinj", "--json", *args]
    if uid != 0:
        cmd = [str(workdir / "python-nobody"), "-m", "serrinj", "--json", *args]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    print(f"uid {uid}: serrinj {' '.join(args)}: rc={proc.returncode}"
          f" in {time.monotonic() - t0:.2f} s", file=sys.stderr)  # fmt: skip
    return proc.returncode, proc.stdout, proc.stderr


def _inject(uid: int, workdir: Path, vm: TestVmProcess) -> Tuple[int, str, str]:
    # the CPU's own syndrome: the same command on the boots with RAS and without
    return serrinj_as(uid, workdir, "inject", "--pid", str(vm.pid), "--vcpu", "0")


def _observed(vm: TestVmProcess, since: int) -> int:
    ev = vm.wait_event(on("serror", 0), EVENT_TIMEOUT_S, since=since)
    assert ev["esr"] >> 26 == EC_SERROR, ev
    return len(serrors(vm, 0, since))


@pytest.mark.parametrize("scope", [0, 1, 2])
def test_ptrace_scope(scope: int, vm: TestVmProcess, workdir: Path) -> None:
    _write(SCOPE, str(scope))
    mark = vm.mark()
    rc, out, err = _inject(NOBODY, workdir, vm)
    if scope == 0:
        assert rc == 0, (out, err)
        assert _observed(vm, mark) == 1
    else:
        assert rc == 4, (out, err)
        assert "Traceback" not in err, err
        for words in REFUSAL[scope]:
            assert words in err, (words, err)
        time.sleep(1.0)  # a stray injection would have been taken by now (the guest is unmasked)
        assert serrors(vm, 0, mark) == [], "a refused injection reached the guest"
    # root holds CAP_SYS_PTRACE, which every one of these scopes accepts
    mark = vm.mark()
    rc, out, err = _inject(0, workdir, vm)
    assert rc == 0, (out, err)
    assert _observed(vm, mark) == 1
    assert vm.alive() and trouble(vm) == []
