"""What serrinj needs, and what it says when it lacks it.

serrinj runs as a less privileged user (``setpriv``, from util-linux) against a
real test VM: every command that touches a VM or /dev/kvm must exit 4 with a
message naming what is missing (ptrace permission, /dev/kvm access,
/proc/PID/fd access, CAP_SYS_ADMIN for seccomp filters), after nothing more
than the permission check: a real ``strace`` of serrinj shows no ptrace, no
process_vm_* and no KVM ioctl, and the guest took nothing. The minimal
privileges really are enough: with no capability at all, serrinj injects into a
VMM of its own uid.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import pytest

from serrinj.errors import ExitCode
from serrinj.testvm.process import TestVmProcess
from tests.conftest import need_tool
from tests.helpers import serrinj_cli
from tests.helpers.rootpaths import bind_prefix, private_state, world_writable_dir
from tests.helpers.serrinj_cli import Result

pytestmark = [pytest.mark.kvm, pytest.mark.root]
X86 = os.uname().machine == "x86_64"
NOBODY = 65534
AS_NOBODY = ["--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups"]
NO_CAPS = ["--bounding-set=-all", "--inh-caps=-all"]


@pytest.fixture(scope="module")
def shared_dir() -> Iterator[Path]:
    """A directory every uid may write: the audit log and the locks of these runs."""
    with world_writable_dir() as d:
        yield d


#: the packages an unprivileged serrinj imports
_PACKAGES = (
    "serrinj", "click", "rich", "markdown_it", "mdurl", "pygments", "cffi", "_cffi_backend",
    "pycparser", "typing_extensions",
)  # fmt: skip
_readable: List[str] = []


@pytest.fixture(scope="module", autouse=True)
def _world_readable_packages() -> Iterator[None]:
    """A copy of serrinj and what it imports that any user may read.

    The checkout (and its venv) may sit in a directory only root can enter, such
    as CI's fresh clone made with ``mktemp -d``: an unprivileged serrinj must not
    fail to *import* there, or these tests would test nothing.
    """
    import importlib.util

    base = tempfile.mkdtemp(prefix="serrinj-priv-")
    try:
        for name in _PACKAGES:
            spec = importlib.util.find_spec(name)
            if spec is None or spec.origin is None:
                continue
            if spec.submodule_search_locations:
                src = next(iter(spec.submodule_search_locations))
                shutil.copytree(
                    src, os.path.join(base, name), ignore=shutil.ignore_patterns("__pycache__")
                )
            else:
                shutil.copy2(spec.origin, base)
        for root, _dirs, files in os.walk(base):
            os.chmod(root, 0o755)
            for f in files:
                os.chmod(os.path.join(root, f), 0o644 if not f.endswith(".so") else 0o755)
        _readable.append(base)
        yield
    finally:
        _readable.clear()
        shutil.rmtree(base, ignore_errors=True)


def run_as(
    setpriv_args: Sequence[str],
    *args: object,
    shared: Path,
    strace_to: Optional[Path] = None,
    prefix: Sequence[str] = (),
) -> Result:
    """``[PREFIX] setpriv ARGS python -m serrinj ARGS``, optionally under a real strace."""
    strace: List[str] = []
    if strace_to is not None:
        strace = [need_tool("strace", "strace"), "-f", "-qq", "-o", str(strace_to)]
    env = {
        "PYTHONPATH": os.pathsep.join(_readable),
        "SERRINJ_AUDIT_LOG": str(shared / "audit.jsonl"),
        "SERRINJ_LOCK_DIR": str(shared / "locks"),
        "HOME": str(shared),
    }
    return serrinj_cli.run(
        *args,
        prefix=[*prefix, *strace, need_tool("setpriv", "util-linux"), *setpriv_args],
        serrinj=[sys.executable, "-m", "serrinj"],
        env=env,
        cwd="/",
    )


def audit_records(shared: Path) -> List[Dict[str, Any]]:
    try:
        with open(shared / "audit.jsonl") as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


@pytest.fixture
def nocap_python(tmp_path: Path) -> str:
    """A python that runs as root but with no capability at all (a minimal VMM)."""
    setpriv = need_tool("setpriv", "util-linux")
    script = tmp_path / "python-nocaps"
    script.write_text(f'#!/bin/sh\nexec {setpriv} {" ".join(NO_CAPS)} {sys.executable} "$@"\n')
    script.chmod(0o755)
    return str(script)


def guest_counts(vm: TestVmProcess) -> List[tuple]:  # type: ignore[type-arg]
    out = []
    for v in (0, 1):
        mark = vm.mark()
        vm.command({"cmd": "heartbeat", "vcpu": v})
        hb = vm.wait_event(
            lambda e, v=v: e.get("event") == "heartbeat" and e["vcpu"] == v, since=mark
        )
        out.append((hb["nmi_count"], hb["mce_count"], hb["poll_count"], hb["check_failures"]))
    return out


def assert_refused(r: Result, *words: str) -> None:
    assert r.rc == ExitCode.PERMISSION, r
    assert r.stderr.startswith("error: "), r
    assert "Traceback" not in r.stderr + r.stdout, r
    for w in words:
        assert w in r.stderr, (w, str(r))


ROOT = Path(__file__).resolve().parent.parent


def _commands(pid: int, shared: Optional[Path] = None) -> Dict[str, List[object]]:
    events_file = (shared or Path("/nonexistent")) / "events.json"
    campaign = ROOT / "examples" / "x86-smoke.toml"
    if shared is not None:
        # the checkout may be unreadable to the unprivileged user (see above)
        copy = shared / "x86-smoke.toml"
        shutil.copyfile(campaign, copy)
        copy.chmod(0o644)
        campaign = copy
    return {
        "list": ["list"],
        "list-json": ["list", "--json"],
        "list-pid": ["list", "--pid", pid],
        "status": ["status", "--pid", pid],
        "status-any": ["status"],
        "nmi": ["nmi", "--pid", pid, "--vcpu", 0],
        "nmi-any": ["nmi", "--vcpu", 0],
        "mce": ["mce", "--pid", pid, "--vcpu", 1, "--bank", 1, "--preset", "uc"],
        "mce-dry-run": [
            "mce",
            "--pid",
            pid,
            "--vcpu",
            1,
            "--bank",
            1,
            "--preset",
            "ce",
            "--dry-run",
        ],
        "inject": ["inject", "--pid", pid, "--vcpu", 0],
        "demo": ["demo"],
        "events-save": ["events", "save", "--pid", pid],
        "events-load": ["events", "load", events_file, "--pid", pid],
        "run": ["run", campaign, "--pid", pid],
    }


#: command -> what its message must name
MISSING = {
    # the test VM (a root process with vCPU threads named like QEMU's) is named first
    "list": ["/proc/PID/fd access is missing", "likely VMMs"],
    "list-json": ["/proc/PID/fd access is missing"],
    "list-pid": ["cannot read the fds of process", "uid 0"],
    "status": ["/dev/kvm"],
    "status-any": ["/dev/kvm"],
    "nmi": ["cannot read the fds of process", "uid 0"],
    "nmi-any": ["/proc/PID/fd access is missing"],
    "mce": ["cannot read the fds of process", "uid 0"],
    "mce-dry-run": ["cannot read the fds of process"],
    "inject": ["cannot read the fds of process"],
    "demo": ["/dev/kvm"],
    "events-save": ["cannot read the fds of process", "uid 0"],
    "events-load": ["cannot read the fds of process", "uid 0"],
    "run": ["cannot read the fds of process", "uid 0"],
}


# ====================================================================== an unprivileged user
@pytest.mark.skipif(not X86, reason="x86_64 commands")
def test_unprivileged_user_gets_exit_4_for_every_vm_command(
    start_vm: Callable[..., TestVmProcess], shared_dir: Path
) -> None:
    vm = start_vm()
    before = guest_counts(vm)
    audit_before = len(audit_records(shared_dir))
    saved = subprocess.run(
        [sys.executable, "-m", "serrinj", "events", "save", "--pid", str(vm.pid)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    (shared_dir / "events.json").write_text(saved)
    (shared_dir / "events.json").chmod(0o644)
    commands = _commands(vm.pid, shared_dir)
    for name, args in commands.items():
        r = run_as(AS_NOBODY, *args, shared=shared_dir)
        assert_refused(r, *MISSING[name])
    # the injection attempts are audited as refused, by uid 65534
    records = audit_records(shared_dir)[audit_before:]
    assert [(x["action"], x["outcome"]) for x in records] == [
        ("inject-nmi", "refused"),
        ("inject-nmi", "refused"),
        ("inject-mce", "refused"),
        ("inject-mce", "refused"),
        ("inject-serror", "refused"),
        ("events-load", "refused"),
        ("campaign-run", "refused"),
    ], records
    assert all(x["user"]["uid"] == NOBODY for x in records)
    assert all(x["error"]["exit_code"] == ExitCode.PERMISSION for x in records)
    assert guest_counts(vm) == before


@pytest.mark.skipif(not X86, reason="x86_64 commands")
@pytest.mark.parametrize("name", ["list", "status", "nmi", "mce"])
def test_unprivileged_user_attempts_nothing_beyond_the_permission_check(
    start_vm: Callable[..., TestVmProcess], shared_dir: Path, tmp_path: Path, name: str
) -> None:
    """strace of the refused command: no ptrace, no process_vm_*, no KVM ioctl."""
    vm = start_vm()
    trace = tmp_path / "strace.out"
    r = run_as(AS_NOBODY, *_commands(vm.pid)[name], shared=shared_dir, strace_to=trace)
    assert_refused(r)
    calls = trace.read_text()
    assert "execve(" in calls  # the trace did follow serrinj
    for forbidden in ("ptrace(", "process_vm_readv(", "process_vm_writev(", "pidfd_getfd("):
        assert forbidden not in calls, [x for x in calls.splitlines() if forbidden in x][:5]
    kvm_ioctls = [x for x in calls.splitlines() if "ioctl(" in x and ("KVM" in x or "0xae" in x)]
    assert kvm_ioctls == []


def test_pure_commands_need_no_privilege(shared_dir: Path) -> None:
    r = run_as(AS_NOBODY, "esr", "decode", "--json", "0x1811", shared=shared_dir)
    assert r.rc == 0, r
    assert json.loads(r.stdout)["syndrome"]["aet_name"] == "CE"
    r = run_as(AS_NOBODY, "esr", "encode", "--severity", "uer", shared=shared_dir)
    assert r.rc == 0 and "0xc11" in r.stdout, r
    r = run_as(AS_NOBODY, "--help", shared=shared_dir)
    assert r.rc == 0, r


# ====================================================================== one privilege missing
@pytest.mark.skipif(not X86, reason="x86_64 commands")
def test_no_capability_at_all_is_enough_for_a_vmm_of_the_same_uid(
    start_vm: Callable[..., TestVmProcess], nocap_python: str, shared_dir: Path
) -> None:
    """The minimal privileges: the VMM's uid (here 0, but with no capability, like an
    ordinary user's VMM) and read access to /dev/kvm. No CAP_SYS_PTRACE needed."""
    vm = start_vm(python=nocap_python)
    r = run_as(NO_CAPS, "status", "--json", "--pid", vm.pid, shared=shared_dir)
    assert r.rc == 0, r
    assert [v["registers_restored"] for v in json.loads(r.stdout)["vcpus"]] == [True, True]
    r = run_as(NO_CAPS, "nmi", "--pid", vm.pid, "--vcpu", 1, "--wait", shared=shared_dir)
    assert r.rc == 0, r
    r = run_as(NO_CAPS, "mce", "--pid", vm.pid, "--vcpu", 0, "--bank", 2, "--preset", "uc",
               "--wait", shared=shared_dir)  # fmt: skip
    assert r.rc == 0, r
    assert guest_counts(vm) == [(0, 1, 0, 0), (1, 0, 0, 0)]


@pytest.mark.skipif(not X86, reason="x86_64 commands")
def test_real_uid_that_differs_is_named_as_the_ptrace_problem(
    start_vm: Callable[..., TestVmProcess], nocap_python: str, shared_dir: Path
) -> None:
    """A set-uid-like serrinj (real uid 65534, effective uid 0, no capability): it may
    read the fds (file-system ids match) but PTRACE_SEIZE checks the real ids."""
    vm = start_vm(python=nocap_python)
    setuid_like = ["--ruid", str(NOBODY), "--euid", "0", "--clear-groups", *NO_CAPS]
    # root acting for another uid ignores SERRINJ_AUDIT_LOG: its audit log (and locks)
    # are this test's own, bind-mounted in a private mount namespace
    with private_state("serrinj-priv-") as state:
        private = bind_prefix(need_tool("unshare", "util-linux"), state)
        for args in (["nmi", "--pid", vm.pid, "--vcpu", 0], ["status", "--pid", vm.pid]):
            r = run_as(setuid_like, *args, shared=shared_dir, prefix=private)
            assert_refused(r, "ptrace of process", f"serrinj as uid {NOBODY}", "real ids",
                           "CAP_SYS_PTRACE")  # fmt: skip
        assert [rec["action"] for rec in audit_records(state / "log")] == ["inject-nmi"]
    assert guest_counts(vm) == [(0, 0, 0, 0), (0, 0, 0, 0)]


@pytest.mark.skipif(not X86, reason="x86_64 commands")
def test_missing_cap_sys_ptrace_against_a_more_privileged_vmm(
    start_vm: Callable[..., TestVmProcess], shared_dir: Path
) -> None:
    """Root without CAP_SYS_PTRACE (e.g. in a container) against a root VMM that holds
    capabilities serrinj lacks: the kernel refuses even reading its fds."""
    vm = start_vm()
    no_ptrace = ["--bounding-set=-sys_ptrace", "--inh-caps=-sys_ptrace"]
    r = run_as(no_ptrace, "nmi", "--pid", vm.pid, "--vcpu", 0, shared=shared_dir)
    assert_refused(r, f"cannot read the fds of process {vm.pid}", "capabilities serrinj lacks")
    assert guest_counts(vm) == [(0, 0, 0, 0), (0, 0, 0, 0)]


def kvm_for_everyone(node_dir: Path) -> List[str]:
    """A command prefix: a private mount namespace whose /dev/kvm any user may open (a
    node of the same device, mode 0666, bind-mounted over it), as a distribution's
    ``kvm`` group gives its members. The machine's /dev/kvm is untouched."""
    node = node_dir / "kvm"
    os.mknod(node, 0o666 | stat.S_IFCHR, os.stat("/dev/kvm").st_rdev)
    node.chmod(0o666)
    script = 'mount --bind "$0" /dev/kvm && exec "$@"'
    unshare = need_tool("unshare", "util-linux")
    return [unshare, "-m", "--propagation", "private", "sh", "-c", script, str(node)]


#: uid 65534 holding CAP_SYS_PTRACE and nothing else (ambient, so it survives the exec)
ONLY_PTRACE = [*AS_NOBODY, "--inh-caps=-all,+sys_ptrace", "--ambient-caps=+sys_ptrace"]


@pytest.fixture
def kvm_prefix(tmp_path: Path) -> List[str]:
    return kvm_for_everyone(tmp_path)


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """The audit log and locks of uid 65534's runs (the module's shared directory may
    hold a lock directory that an earlier root run made)."""
    with world_writable_dir() as d:
        yield d


@pytest.fixture
def nobody_vmm_python(tmp_path: Path, kvm_prefix: List[str]) -> str:
    """A python that runs as uid 65534 holding CAP_NET_ADMIN (as a VMM given the right
    to set up its tap devices), where it may open /dev/kvm."""
    setpriv = need_tool("setpriv", "util-linux")
    caps = ["--inh-caps=-all,+net_admin", "--ambient-caps=+net_admin"]
    script = tmp_path / "python-nobody-vmm"
    argv = [*kvm_prefix, setpriv, *AS_NOBODY, *caps, sys.executable]
    script.write_text(f'#!/bin/sh\nexec {shlex.join(argv)} "$@"\n')
    script.chmod(0o755)
    return str(script)


@pytest.mark.skipif(not X86, reason="x86_64 commands")
def test_a_user_with_only_cap_sys_ptrace_injects_into_a_vmm_with_more_capabilities(
    start_vm: Callable[..., TestVmProcess],
    nobody_vmm_python: str,
    kvm_prefix: List[str],
    nobody_dir: Path,
) -> None:
    """uid 65534 with CAP_SYS_PTRACE alone, against a VMM of the same uid that holds a
    capability it lacks: the kernel lets only CAP_SYS_PTRACE trace such a process. It
    lists, reads and injects; the guest observes the NMI and the machine check. The
    control, the same user without the capability, is refused and sends nothing."""
    vm = start_vm(python=nobody_vmm_python, env={**os.environ, "PYTHONPATH": _readable[0]})
    with open(f"/proc/{vm.pid}/status") as f:
        st = f.read()
    assert f"Uid:\t{NOBODY}\t" in st and "CapEff:\t0000000000001000" in st, st
    setpriv = need_tool("setpriv", "util-linux")
    caps = subprocess.run(
        [*kvm_prefix, setpriv, *ONLY_PTRACE, "grep", "^Cap", "/proc/self/status"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "CapEff:\t0000000000080000" in caps and "CapPrm:\t0000000000080000" in caps, caps
    nocaps = [*AS_NOBODY, *NO_CAPS]
    r = run_as(nocaps, "nmi", "--pid", vm.pid, "--vcpu", 1, shared=nobody_dir, prefix=kvm_prefix)
    assert_refused(r, "capabilities serrinj lacks")
    assert guest_counts(vm) == [(0, 0, 0, 0), (0, 0, 0, 0)]

    def run(*args: object) -> Result:
        return run_as(ONLY_PTRACE, *args, shared=nobody_dir, prefix=kvm_prefix)

    r = run("list", "--json", "--pid", vm.pid)
    assert r.rc == 0, r
    listed = json.loads(r.stdout)["vms"][0]
    assert listed["uid"] == NOBODY
    assert [v["tid"] for v in listed["vcpus"]] == [v.tid for v in vm.vcpus]
    r = run("status", "--json", "--pid", vm.pid)
    assert r.rc == 0, r
    assert [v["registers_restored"] for v in json.loads(r.stdout)["vcpus"]] == [True, True]
    assert run("nmi", "--pid", vm.pid, "--vcpu", 1, "--wait").rc == 0
    r = run("mce", "--pid", vm.pid, "--vcpu", 0, "--bank", 2, "--preset", "uc", "--wait")
    assert r.rc == 0, r
    assert guest_counts(vm) == [(0, 1, 0, 0), (1, 0, 0, 0)]


@pytest.mark.skipif(not X86, reason="x86_64 commands")
def test_cap_sys_ptrace_alone_cannot_list_another_uids_fds(
    start_vm: Callable[..., TestVmProcess], kvm_prefix: List[str], nobody_dir: Path
) -> None:
    """Against a root VMM, uid 65534 with CAP_SYS_PTRACE alone may trace it but may not
    list its /proc/PID/fd (mode 0500, owned by uid 0): that is a file-mode check, which
    needs CAP_DAC_READ_SEARCH. serrinj says so and sends nothing."""
    vm = start_vm()
    r = run_as(ONLY_PTRACE, "nmi", "--pid", vm.pid, "--vcpu", 1, shared=nobody_dir,
               prefix=kvm_prefix)  # fmt: skip
    assert_refused(r, f"cannot read the fds of process {vm.pid}", "uid 0", "CAP_DAC_READ_SEARCH")
    assert guest_counts(vm) == [(0, 0, 0, 0), (0, 0, 0, 0)]


@pytest.mark.skipif(not X86, reason="x86_64 commands")
def test_seccomp_filters_need_cap_sys_admin_only_when_every_thread_is_filtered(
    start_vm: Callable[..., TestVmProcess], shared_dir: Path
) -> None:
    no_admin = ["--bounding-set=-sys_admin", "--inh-caps=-sys_admin"]
    # vCPU threads filtered: another thread serves the call, no filter needs reading
    vm = start_vm(extra=["--seccomp", "trap"])
    r = run_as(no_admin, "nmi", "--pid", vm.pid, "--vcpu", 0, "--wait", shared=shared_dir)
    assert r.rc == 0, r
    assert guest_counts(vm)[0][0] == 1
    # every thread filtered: serrinj cannot check the filters and says why
    vm = start_vm(extra=["--seccomp", "trap", "--seccomp-threads", "all"])
    for args in (["nmi", "--pid", vm.pid, "--vcpu", 0], ["status", "--pid", vm.pid]):
        r = run_as(no_admin, *args, shared=shared_dir)
        assert_refused(r, "seccomp filter", "CAP_SYS_ADMIN", "nothing was sent")
    assert vm.alive()
    assert guest_counts(vm) == [(0, 0, 0, 0), (0, 0, 0, 0)]
