"""The audit trail and the per-VM lock."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import syslog
import time
from pathlib import Path
from typing import Any, List, Tuple

import pytest

from serrinj.errors import Conflict, ExitCode, PermissionDenied, Unsupported
from serrinj.ops import audit, inject, lock
from serrinj.target import attach as target
from serrinj.testvm.process import TestVmProcess
from tests.helpers.testvm import VmFactory

X86 = os.uname().machine == "x86_64"


def test_lock_excludes_another_process_and_names_it(tmp_path: Path) -> None:
    env = dict(os.environ, SERRINJ_LOCK_DIR=str(tmp_path))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from serrinj.ops import lock\n"
            "with lock.vm_lock(1, 2, 'x', wait=1):\n"
            "    print('held', flush=True); time.sleep(30)",
        ],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        os.environ["SERRINJ_LOCK_DIR"], old = str(tmp_path), os.environ["SERRINJ_LOCK_DIR"]
        try:
            t0 = time.monotonic()
            with pytest.raises(Conflict) as err, lock.vm_lock(1, 2, "vm x", wait=0.3):
                pass
            assert time.monotonic() - t0 >= 0.3
            assert f"serrinj process {holder.pid}" in err.value.message
            # another VM is free, and the lock is re-entrant within a process
            with lock.vm_lock(1, 3, "another vm", wait=0.3), lock.vm_lock(1, 3, "vm", wait=0.3):
                pass
        finally:
            os.environ["SERRINJ_LOCK_DIR"] = old
    finally:
        holder.kill()
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()


def test_the_lock_file_names_its_holder_exactly_while_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a holder that did not release (killed) left behind, longer than this holder's
    own line, is cut off; the file is emptied on release."""
    monkeypatch.setenv("SERRINJ_LOCK_DIR", str(tmp_path))
    path = tmp_path / "vm-1-2.lock"
    path.write_text(json.dumps({"pid": 1, "argv": ["a-much-longer-command-line"] * 20}))
    for _ in range(2):
        with lock.vm_lock(1, 2, "pid 1", wait=0.1):
            assert json.loads(path.read_text()) == {"pid": os.getpid(), "argv": sys.argv}
        assert path.read_text() == ""


def test_a_lock_directory_serrinj_may_not_write_is_a_permission_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SERRINJ_LOCK_DIR", str(tmp_path))

    def refuse(path: str, *args: Any) -> int:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(PermissionDenied) as err, lock.vm_lock(1, 2, "pid 1", wait=0.1):
        pytest.fail("the lock was taken")
    assert err.value.exit_code == ExitCode.PERMISSION
    assert err.value.message == (
        f"cannot take the lock of VM pid 1: {tmp_path}/vm-1-2.lock: Permission denied"
    )
    assert err.value.hint is not None and "SERRINJ_LOCK_DIR" in err.value.hint


def test_every_record_also_goes_to_syslog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sent: List[Tuple[str, Any]] = []
    monkeypatch.setattr(syslog, "openlog", lambda *a: sent.append(("openlog", a)))
    monkeypatch.setattr(syslog, "syslog", lambda *a: sent.append(("syslog", a)))
    monkeypatch.setattr(audit, "problems", [])
    log = tmp_path / "audit.jsonl"
    monkeypatch.setenv("SERRINJ_AUDIT_LOG", str(log))
    vm = {"pid": 4242, "name": "web1", "vmm": "qemu", "arch": "x86_64"}
    request = {"bank": 9, "status": 0xBD000000000000C0, "wait": 5.0}
    entry = audit.record(
        action="inject-mce",
        outcome="refused",
        vm=vm,
        vcpu_id=1,
        request=request,
        error={"kind": "conflict", "message": "vCPU 1: this machine check would be dropped"},
    )
    assert sent == [
        ("openlog", ("serrinj", syslog.LOG_PID, syslog.LOG_USER)),
        (
            "syslog",
            (
                syslog.LOG_NOTICE,
                f"inject-mce refused user={entry['user']['name']} vm={vm} vcpu=1"  # type: ignore[index]
                f" request={json.dumps(request)}"
                " error=vCPU 1: this machine check would be dropped",
            ),
        ),
    ]
    assert audit.read(log=str(log)) == [json.loads(json.dumps(entry))]
    # a record without a VM, request or error, and one the file cannot take: syslog has both
    sent.clear()
    audit.record(action="inject-nmi", outcome="ok")
    monkeypatch.setenv("SERRINJ_AUDIT_LOG", str(log / "not-a-directory.jsonl"))
    audit.record(action="campaign-run", outcome="failed", error={"message": "gone"})
    user = entry["user"]["name"]  # type: ignore[index]
    assert [a for kind, a in sent if kind == "syslog"] == [
        (syslog.LOG_NOTICE, f"inject-nmi ok user={user} vcpu=None request=-"),
        (syslog.LOG_NOTICE, f"campaign-run failed user={user} vcpu=None request=- error=gone"),
    ]
    assert len(audit.problems) == 1 and "cannot write the audit log" in audit.problems[0]
    assert len(audit.read(log=str(log))) == 2


@pytest.fixture
def vm(start_vm: VmFactory) -> TestVmProcess:
    return start_vm(vcpus=1, mode="halt")


@pytest.mark.kvm
@pytest.mark.root
@pytest.mark.skipif(not X86, reason="x86_64 injections; arm64 is covered in the lab")
def test_every_attempt_is_audited_with_its_outcome(vm: TestVmProcess) -> None:
    n = len(audit.read())
    tgt = target.resolve(pid=vm.pid)
    inject.inject_nmi(tgt, wait=5.0)
    inject.inject_nmi(tgt, dry_run=True)
    with pytest.raises(Unsupported):
        inject.inject_serror(tgt, inject.SErrorRequest(0x1811))
    records = audit.read()[n:]
    assert [(r["action"], r["outcome"]) for r in records] == [
        ("inject-nmi", "ok"),
        ("inject-nmi", "dry-run"),
        ("inject-serror", "refused"),
    ]
    ok = records[0]
    assert ok["vm"]["pid"] == vm.pid and ok["vcpu_id"] == 0  # type: ignore[index]
    assert ok["detail"]["delivery"]["delivered"] is True  # type: ignore[index]
    assert ok["user"]["uid"] == os.getuid()  # type: ignore[index]
    assert records[2]["error"]["kind"] == "unsupported"  # type: ignore[index]
    assert records[2]["request"]["esr"] == 0x1811  # type: ignore[index]


@pytest.mark.kvm
@pytest.mark.root
@pytest.mark.skipif(not X86, reason="x86_64 injections; arm64 is covered in the lab")
def test_root_injects_without_importing_the_policy(vm: TestVmProcess, tmp_path: Path) -> None:
    """The policy binds callers who are not root: root's injection, locked and audited as
    always, never imports its module or the TOML reader it needs."""
    log = tmp_path / "audit.jsonl"
    code = (
        "import sys\n"
        "from serrinj.ops import inject\n"
        "from serrinj.target import attach as target\n"
        f"inject.inject_nmi(target.resolve(pid={vm.pid}), wait=5.0)\n"
        "print(sorted(m for m in sys.modules"
        " if m in ('serrinj.ops.policy', 'serrinj.codec.tomlsubset')))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("SUDO_UID", "SUDO_GID", "SUDO_USER")}
    env.update(SERRINJ_AUDIT_LOG=str(log), SERRINJ_LOCK_DIR=str(tmp_path))
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]", run.stdout
    records = audit.read(log=str(log))
    assert [(r["action"], r["outcome"]) for r in records] == [("inject-nmi", "ok")]
    assert records[0]["detail"]["delivery"]["delivered"] is True  # type: ignore[index]
