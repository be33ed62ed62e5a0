"""serrinj granted through sudo, for real: Debian's sudo, a test user, a sudoers.d rule.

The fixture creates a user (and a group of its own, the policy's "ras" group),
a rule in /etc/sudoers.d that lets it run this checkout's serrinj (the venv's
``bin/serrinj``) as root, with ``SETENV`` so that it *can* pass SERRINJ_*
variables (a permissive lab's rule: serrinj itself must ignore them), and
removes all three afterwards, whatever happens.

Every command runs in a private mount namespace where /etc/serrinj,
/var/log/serrinj and /run/serrinj are this test's own directories: the policy
file serrinj reads is /etc/serrinj/policy.toml, the audit log it appends to is
/var/log/serrinj/audit.jsonl and its locks go to /run/serrinj, as on any host,
but no other process on the machine sees them (the host's audit log is never
written, and no policy ever applies to anyone else's sudo).

The guests are the built-in test VM, in its own process, named so that the
policy's VM names match; what they observed is read from the guest itself.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import pytest

from serrinj.errors import ExitCode
from serrinj.testvm.process import TestVmProcess
from tests.conftest import missing, need_tool
from tests.helpers import serrinj_cli
from tests.helpers.rootpaths import bind_prefix, private_state
from tests.helpers.serrinj_cli import Result
from tests.helpers.testvm import VmFactory

pytestmark = [pytest.mark.kvm, pytest.mark.root]
X86 = os.uname().machine == "x86_64"
ROOT = Path(__file__).resolve().parent.parent
SERRINJ = Path(sys.executable).parent / "serrinj"


@dataclass
class SudoUser:
    name: str
    uid: int
    gid: int
    group: str
    state: Path  # etc/, log/, run/: what serrinj sees at PRIVATE

    @property
    def policy_file(self) -> Path:
        return self.state / "etc" / "policy.toml"

    def audit(self) -> List[Dict[str, Any]]:
        try:
            text = (self.state / "log" / "audit.jsonl").read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def run(self, *args: object, env: Mapping[str, str] = {}, root: bool = False) -> Result:
        """``sudo -n [VAR=value...] serrinj ARGS`` as the test user (``root``: serrinj
        run by root itself, with ``env`` in its environment), in the private namespace."""
        argv = [str(a) for a in args]
        if root:
            inner = [str(SERRINJ)]
        else:
            setpriv = need_tool("setpriv", "util-linux")
            inner = [setpriv, "--reuid", str(self.uid), "--regid", str(self.gid),
                     "--init-groups", "--", need_tool("sudo", "sudo"), "-n",
                     *(f"{k}={v}" for k, v in env.items()), str(SERRINJ)]  # fmt: skip
        cmd = bind_prefix(need_tool("unshare", "util-linux"), self.state)
        base = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "NO_COLOR": "1"}
        return serrinj_cli.run(
            *argv,
            prefix=cmd,
            serrinj=inner,
            env={**base, **env} if root else base,
            inherit_env=False,
            cwd="/",
        )


def _must(*cmd: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise AssertionError(f"{cmd}: {proc.stderr}")


@pytest.fixture(scope="module")
def sudo_user() -> Iterator[SudoUser]:
    """A user, its group, a sudoers.d rule for this checkout's serrinj, the private
    state directories; all removed afterwards."""
    for tool, package in (("sudo", "sudo"), ("visudo", "sudo"), ("useradd", "passwd"),
                          ("userdel", "passwd"), ("groupadd", "passwd"),
                          ("unshare", "util-linux"), ("setpriv", "util-linux")):  # fmt: skip
        need_tool(tool, package)
    if not SERRINJ.exists():
        missing(f"{SERRINJ} does not exist; run `make setup` (the venv's serrinj script)")
    name = f"sjt{secrets.token_hex(4)}"
    group = f"{name}ras"
    rule = Path(f"/etc/sudoers.d/serrinj-test-{name}")  # no dot: sudo would skip it
    with contextlib.ExitStack() as stack:
        state = stack.enter_context(private_state("serrinj-sudo-"))
        stack.callback(_remove_user, name, group, rule)
        _must("groupadd", group)
        _must("useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", "--user-group",
              "--groups", group, name)  # fmt: skip
        rule.write_text(f"{name} ALL=(root) NOPASSWD:SETENV: {SERRINJ}\n")
        rule.chmod(0o440)
        _must("visudo", "-c", "-q", "-f", str(rule))
        pw = pwd.getpwnam(name)
        yield SudoUser(name, pw.pw_uid, pw.pw_gid, group, state)


def _remove_user(name: str, group: str, rule: Path) -> None:
    rule.unlink(missing_ok=True)
    subprocess.run(["userdel", name], capture_output=True)
    subprocess.run(["groupdel", group], capture_output=True)
    subprocess.run(["groupdel", name], capture_output=True)  # the user's own, if left


@pytest.fixture
def dirs(sudo_user: SudoUser) -> Iterator[Tuple[Path, Path, Path]]:
    """(open, mine, closed): a directory anyone may read, one the test user owns, and
    one only root may enter."""
    base = Path(tempfile.mkdtemp(prefix="serrinj-sudo-files-"))
    try:
        base.chmod(0o755)
        mine, closed = base / "mine", base / "closed"
        mine.mkdir()
        os.chown(mine, sudo_user.uid, sudo_user.gid)
        closed.mkdir(mode=0o700)
        closed.chmod(0o700)
        yield base, mine, closed
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def named_vm(sudo_user: SudoUser, start_vm: VmFactory) -> Callable[..., TestVmProcess]:
    """Start a test VM named ``name`` (after ``sudo_user``: each VM is stopped first)."""

    def start(
        name: str, mode: str = "halt", extra: Tuple[str, ...] = (), vcpus: int = 1
    ) -> TestVmProcess:
        return start_vm(vcpus, mode, ["--name", name, *extra])

    return start


def observed(vm: TestVmProcess) -> Tuple[int, int]:
    """(NMIs, machine checks) the guest has taken, as it reports them itself."""
    mark = vm.mark()
    vm.command({"cmd": "heartbeat", "vcpu": 0})
    hb = vm.wait_event(lambda e: e.get("event") == "heartbeat" and e["vcpu"] == 0, since=mark)
    return hb["nmi_count"], hb["mce_count"]


def refused(r: Result, *words: str) -> None:
    assert r.rc == ExitCode.PERMISSION, r
    assert "error: " in r.stderr and "Traceback" not in r.stderr + r.stdout, r
    for w in words:
        assert w in r.stderr, (w, str(r))


def write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def campaign(pid: int, log: Optional[object], *extra_steps: str) -> str:
    target = f"[target]\npid = {pid}\n" + (f'log = "{log}"\n' if log else "")
    return target + '[[steps]]\ninject = "nmi"\nwait = 2.0\n' + "".join(extra_steps)


PROBE = '[[steps]]\nexpect = "log"\nmatch = "^root:"\nsince = "beginning"\ntimeout = 0.5\n'


# ====================================================================== files as the caller
@pytest.mark.skipif(not X86, reason="the test VM's NMI is x86_64")
def test_a_caller_cannot_learn_whether_a_pattern_matches_a_file_it_cannot_read(
    sudo_user: SudoUser, dirs: Tuple[Path, Path, Path], named_vm: Callable[..., TestVmProcess]
) -> None:
    base, _mine, closed = dirs
    vm = named_vm(f"ras-{sudo_user.name}")
    probe = write(base / "probe.toml", campaign(vm.pid, "/etc/shadow", PROBE))
    r = sudo_user.run("run", probe)
    refused(r, "guest log /etc/shadow", f"uid {sudo_user.uid} ({sudo_user.name})",
            "nothing was sent")  # fmt: skip
    assert observed(vm) == (0, 0)  # the NMI step before the probe was not sent either
    rec = sudo_user.audit()[-1]
    assert (rec["action"], rec["outcome"]) == ("campaign-run", "refused"), rec
    assert rec["user"]["caller"] == {
        "uid": sudo_user.uid, "gid": sudo_user.gid, "name": sudo_user.name, "via": "sudo"
    }  # fmt: skip
    assert rec["user"]["sudo_user"] == sudo_user.name

    # the same campaign on a log the caller may read runs: the refusal was the file's.
    # It is root's, readable by the caller's supplementary group only: sudo's group list.
    readable = write(base / "guest.log", "root:x:0:0\n", 0o640)
    os.chown(readable, 0, grp.getgrnam(sudo_user.group).gr_gid)
    ok = write(base / "ok.toml", campaign(vm.pid, readable, PROBE))
    r = sudo_user.run("run", ok)
    assert r.rc == 0, r
    assert observed(vm) == (1, 0)

    # root itself, without sudo, reads what it likes, as before
    secret = write(closed / "secret.log", "root:only\n", 0o600)
    as_root = write(closed / "root.toml", campaign(vm.pid, secret, PROBE), 0o600)
    r = sudo_user.run("run", as_root, root=True)
    assert r.rc == 0, r
    assert observed(vm) == (2, 0)

    # the campaign file and the pid file are the caller's to read, too
    refused(sudo_user.run("run", as_root), f"campaign file {as_root}", "Permission denied")
    pid_file = write(closed / "vm.pid", f"{vm.pid}\n", 0o600)
    refused(sudo_user.run("run", ok, "--pid-file", pid_file), f"pid file {pid_file}")
    assert observed(vm) == (2, 0)


@pytest.mark.skipif(not X86, reason="the test VM's NMI is x86_64")
def test_a_caller_cannot_write_a_junit_or_events_file_where_it_may_not(
    sudo_user: SudoUser, dirs: Tuple[Path, Path, Path], named_vm: Callable[..., TestVmProcess]
) -> None:
    base, mine, closed = dirs
    vm = named_vm(f"ras-{sudo_user.name}")
    c = write(base / "c.toml", campaign(vm.pid, None))
    report = closed / "report.xml"
    refused(sudo_user.run("run", c, "--junit", report), f"JUnit report {report}")
    assert not report.exists()
    assert observed(vm) == (0, 0)  # refused before the campaign's NMI
    r = sudo_user.run("run", c, "--junit", mine / "report.xml")
    assert r.rc == 0, r
    assert (mine / "report.xml").stat().st_uid == sudo_user.uid  # created as the caller
    assert "<testsuites" in (mine / "report.xml").read_text()
    assert observed(vm) == (1, 0)

    saved = closed / "events.json"
    refused(sudo_user.run("events", "save", "--pid", vm.pid, "-o", saved), f"events file {saved}")
    assert os.listdir(closed) == []  # not even its temporary file
    r = sudo_user.run("events", "save", "--pid", vm.pid, "-o", mine / "events.json")
    assert r.rc == 0, r
    assert (mine / "events.json").stat().st_uid == sudo_user.uid
    # a root-only events file cannot be loaded by the caller (nor read through serrinj)
    shutil.copyfile(mine / "events.json", saved)
    saved.chmod(0o600)
    refused(sudo_user.run("events", "load", saved, "--pid", vm.pid), f"events file {saved}")
    assert sorted(os.listdir(closed)) == ["events.json"]


@pytest.mark.skipif(not X86, reason="the test VM's NMI is x86_64")
def test_a_caller_cannot_redirect_the_audit_log_or_the_lock_directory(
    sudo_user: SudoUser, dirs: Tuple[Path, Path, Path], named_vm: Callable[..., TestVmProcess]
) -> None:
    _base, mine, _closed = dirs
    vm = named_vm(f"ras-{sudo_user.name}")
    env = {"SERRINJ_AUDIT_LOG": str(mine / "audit.jsonl"), "SERRINJ_LOCK_DIR": str(mine / "locks")}
    before = len(sudo_user.audit())
    r = sudo_user.run("nmi", "--pid", vm.pid, "--vcpu", 0, "--wait", env=env)
    assert r.rc == 0, r
    for variable in env:
        assert f"warning: {variable} is ignored: serrinj runs as root for uid {sudo_user.uid}" in (
            r.stderr
        ), r
    assert os.listdir(mine) == []  # neither the audit log nor a lock went there
    assert observed(vm) == (1, 0)
    (rec,) = sudo_user.audit()[before:]
    assert (rec["action"], rec["outcome"], rec["user"]["caller"]["name"]) == (
        "inject-nmi", "ok", sudo_user.name
    )  # fmt: skip
    assert any(f.startswith(f"vm-{vm.pid}-") for f in os.listdir(sudo_user.state / "run"))
    # without a policy file the caller keeps every right, and status says so
    r = sudo_user.run("status", "--pid", vm.pid, "--json")
    assert r.rc == 0, r
    pol = json.loads(r.stdout)["policy"]
    assert pol["file"] is None and pol["applies"].startswith("none: no /etc/serrinj/policy.toml")
    # root, without sudo, may still put its audit log and locks where it likes
    r = sudo_user.run("nmi", "--pid", vm.pid, "--vcpu", 0, "--wait", env=env, root=True)
    assert r.rc == 0 and "warning" not in r.stderr, r
    assert sorted(os.listdir(mine)) == ["audit.jsonl", "locks"]
    assert observed(vm) == (2, 0)


# ====================================================================== the policy file
@pytest.fixture
def policy(sudo_user: SudoUser) -> Iterator[Path]:
    """/etc/serrinj/policy.toml (in the private namespace) for the test user's group."""
    example = (ROOT / "docs" / "policy-example.toml").read_text()  # the README's
    # the example's "ras" group is the test user's own
    path = write(sudo_user.policy_file, example.replace('"ras"', f'"{sudo_user.group}"'))
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


@pytest.mark.skipif(not X86, reason="the test VM's NMI and machine checks are x86_64")
def test_the_policy_allows_the_ras_vm_and_refuses_the_rest(
    sudo_user: SudoUser,
    policy: Path,
    dirs: Tuple[Path, Path, Path],
    named_vm: Callable[..., TestVmProcess],
) -> None:
    base, _mine, _closed = dirs
    ras = named_vm(f"ras-{sudo_user.name}")
    prod = named_vm(f"prod-{sudo_user.name}")
    before = len(sudo_user.audit())

    # allowed: an NMI into the ras VM, and the guest takes it
    r = sudo_user.run("nmi", "--pid", ras.pid, "--vcpu", 0, "--wait")
    assert r.rc == 0, r
    assert observed(ras) == (1, 0)

    # a fatal machine check into a VM the caller does not own (root's): refused
    fatal = ["mce", "--vcpu", 0, "--bank", 1, "--preset", "uc-fatal"]
    r = sudo_user.run(*fatal, "--pid", ras.pid)
    refused(r, 'rule "no-fatal-into-others" (line 1) refuses mce (fatal)', sudo_user.name,
            "nothing was sent")  # fmt: skip
    # any VM not named ras-*: refused, status allowed
    r = sudo_user.run("nmi", "--pid", prod.pid, "--vcpu", 0)
    refused(r, f"no rule allows nmi (survivable) on VM 'prod-{sudo_user.name}'")
    r = sudo_user.run("events", "save", "--pid", prod.pid)
    refused(r, "no rule allows events-save")
    r = sudo_user.run("status", "--pid", prod.pid)
    assert r.rc == 0, r
    assert 'rule "ras-look-elsewhere" (line 14) allows status' in r.stdout, r
    assert f"{sudo_user.name} may do here: status" in r.stdout, r
    # a campaign is checked whole: its allowed NMI is not sent when a later step is refused
    c = write(base / "c.toml", campaign(ras.pid, None,
              '[[steps]]\ninject = "mce"\nbank = 1\npreset = "uc-fatal"\n'))  # fmt: skip
    refused(sudo_user.run("run", c), "no-fatal-into-others")
    assert observed(ras) == (1, 0) and observed(prod) == (0, 0)

    records = sudo_user.audit()[before:]
    assert [(x["action"], x["outcome"]) for x in records] == [
        ("inject-nmi", "ok"),
        ("inject-mce", "refused"),
        ("inject-nmi", "refused"),
        ("events-save", "refused"),
        ("campaign-run", "refused"),
    ], records
    assert all(x["user"]["caller"]["name"] == sudo_user.name for x in records)
    assert records[1]["detail"]["policy"]["rule"] == "no-fatal-into-others"
    assert records[2]["detail"]["policy"]["rule"] is None
    assert "ras-look-elsewhere" not in json.dumps(records)

    # root without sudo: no policy applies
    r = sudo_user.run("nmi", "--pid", prod.pid, "--vcpu", 0, "--wait", root=True)
    assert r.rc == 0, r
    assert observed(prod) == (1, 0)

    # a policy file the caller's group or anyone could write is not trusted: refused
    policy.chmod(0o666)
    r = sudo_user.run("status", "--pid", ras.pid)
    refused(r, "the policy /etc/serrinj/policy.toml cannot be trusted", "writable")
    r = sudo_user.run("nmi", "--pid", ras.pid, "--vcpu", 0)
    refused(r, "cannot be trusted")
    assert observed(ras) == (1, 0)


def test_list_probe_stops_the_threads_of_a_vm_only_where_status_is_allowed(
    sudo_user: SudoUser, policy: Path, named_vm: Callable[..., TestVmProcess]
) -> None:
    """``list --probe`` briefly stops a VM's threads to map its vCPUs: a read of the VM."""
    spinning = ("--thread-names", "none")
    ras = named_vm(f"ras-{sudo_user.name}", "spin", spinning, 2)
    prod = named_vm(f"prod-{sudo_user.name}", "spin", spinning, 2)
    # only the ras-lab rule: nothing at all is allowed on the prod VM
    text = policy.read_text()
    write(policy, text[: text.index('[[rule]]\nname = "ras-look-elsewhere"')])
    r = sudo_user.run("list", "--json", "--probe", "--pid", ras.pid)
    assert r.rc == 0, r
    assert [v["mapped_by"] for v in json.loads(r.stdout)["vms"][0]["vcpus"]] == ["probe"] * 2
    r = sudo_user.run("list", "--json", "--probe", "--pid", prod.pid)
    refused(r, f"no rule allows status on VM 'prod-{sudo_user.name}'")
    rec = sudo_user.audit()[-1]
    assert (rec["action"], rec["outcome"], rec["user"]["caller"]["name"]) == (
        "list-probe", "refused", sudo_user.name
    )  # fmt: skip
