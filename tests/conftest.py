"""Shared pytest configuration: resource markers that fail, not skip, in CI.

A test marked ``kvm``, ``root``, ``qemu`` or ``cross`` needs that resource (``root``:
CAP_SYS_PTRACE in the effective set, whatever the uid).
Outside CI a missing resource skips the test with a reason that says how to
enable it. With ``CI=true`` (set by ``.ci/run``) or ``SERRINJ_REQUIRE_ALL=1``
a missing resource is a test failure: CI must never pass by skipping the
real-KVM tests.

A test that needs something no marker covers (a tool such as strace or gdb)
calls :func:`need_tool`, or :func:`missing` with its own reason: the same rule
applies.
"""

from __future__ import annotations

import os
import shutil
from typing import Callable, Dict, Iterator, List, NoReturn, Optional, Sequence

import pytest
from hypothesis import HealthCheck, settings

from tests.helpers.paused import Paused
from tests.helpers.testvm import VmFactory


def _inside_arm64_lab() -> bool:
    try:
        with open("/proc/cmdline") as f:
            return "lab.mode=" in f.read()
    except OSError:
        return False


# Inside the arm64 lab everything runs under full emulation (10-30x slower, three
# boots sharing two host CPUs): speed health checks and per-example deadlines
# would measure the emulator, not the code, so the lab turns them off and runs
# fewer examples. The properties themselves are unchanged.
settings.register_profile(
    "lab",
    deadline=None,
    max_examples=30,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# On CI's loaded 2-CPU machine one example of a property can take longer than
# hypothesis' default 200 ms deadline without anything being wrong: CI keeps the
# examples and health checks, without per-example deadlines.
settings.register_profile("ci", deadline=None)
if _inside_arm64_lab():
    settings.load_profile("lab")
elif os.environ.get("CI") == "true":
    settings.load_profile("ci")


def _strict() -> bool:
    return os.environ.get("CI") == "true" or os.environ.get("SERRINJ_REQUIRE_ALL") == "1"


def missing(reason: str, resource: str = "") -> NoReturn:
    """A resource the test needs is missing: a failure in CI, else a skip.

    ``reason`` says what is missing and how to get it (``run `make deps```).
    """
    if _strict():
        name = f" '{resource}'" if resource else ""
        pytest.fail(f"required resource{name} is missing in CI: {reason}", pytrace=False)
    pytest.skip(f"{reason} (CI=true makes this a failure)")


def need_tool(tool: str, package: str) -> str:
    """The path of ``tool``; when it is not installed, :func:`missing` (Debian ``package``)."""
    path = shutil.which(tool)
    if path is None:
        missing(f"{tool} is not installed; run `make deps` (apt-get install {package})")
    return path


#: PID_MAX_LIMIT (include/linux/threads.h) on 64-bit kernels: pid_max can be raised up
#: to it, never above
PID_MAX_LIMIT = 4 * 1024 * 1024


def no_such_pid() -> int:
    """A pid that no process has on this host, nor ever will: above PID_MAX_LIMIT and
    above this host's pid_max (and still a valid pid_t)."""
    with open("/proc/sys/kernel/pid_max") as f:
        pid_max = int(f.read())
    return max(pid_max, PID_MAX_LIMIT) + 1


#: where KVM's debugfs shows when debugfs is mounted (``make test`` runs the real-KVM
#: tests a second time with it mounted, in a private mount namespace)
DEBUGFS_KVM = "/sys/kernel/debug/kvm"


def debugfs_kvm() -> bool:
    """Whether KVM's debugfs is mounted (and readable) for this test run."""
    return os.access(DEBUGFS_KVM, os.R_OK | os.X_OK)


def without_debugfs(argv: Sequence[str]) -> List[str]:
    """``argv`` run where debugfs is not mounted: when this run has it mounted, in a
    private mount namespace of its own with debugfs unmounted (lazily: tracefs may
    sit below it); the machine's and this run's mounts are untouched."""
    if not debugfs_kvm():
        return list(argv)
    unshare = need_tool("unshare", "util-linux")
    script = 'umount -l /sys/kernel/debug && exec "$@"'
    return [unshare, "-m", "--propagation", "private", "sh", "-c", script, "sh", *argv]


def _kvm_missing() -> Optional[str]:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        return f"/dev/kvm is not usable ({err.strerror}); run on a host with KVM"
    os.close(fd)
    return None


#: capability(7) number of CAP_SYS_PTRACE
CAP_SYS_PTRACE = 19


def _effective_caps() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def _root_missing() -> Optional[str]:
    # What the tests need is the capability, not the uid: root in a container may
    # lack it, and a non-root user may hold it.
    if not _effective_caps() & (1 << CAP_SYS_PTRACE):
        return (
            "needs CAP_SYS_PTRACE (ptrace of another uid's VMM, /proc/PID/fd of any"
            " process); run as root"
        )
    return None


def _qemu_missing() -> Optional[str]:
    if not shutil.which("qemu-system-x86_64"):
        return "qemu-system-x86_64 is not installed; run `make deps`"
    return None


def _cross_missing() -> Optional[str]:
    if not shutil.which("aarch64-linux-gnu-gcc"):
        return "the arm64 cross toolchain is not installed; run `make deps`"
    if not os.path.exists("/usr/aarch64-linux-gnu/include/linux/kvm.h"):
        return "linux-libc-dev-arm64-cross is not installed; run `make deps`"
    return None


_RESOURCES: Dict[str, Callable[[], Optional[str]]] = {
    "kvm": _kvm_missing,
    "root": _root_missing,
    "qemu": _qemu_missing,
    "cross": _cross_missing,
}
_cache: Dict[str, Optional[str]] = {}


def pytest_runtest_setup(item: pytest.Item) -> None:
    for name, probe in _RESOURCES.items():
        if item.get_closest_marker(name) is None:
            continue
        if name not in _cache:
            _cache[name] = probe()
        reason = _cache[name]
        if reason is None:
            continue
        missing(reason, name)


@pytest.fixture(autouse=True, scope="session")
def _isolated_state(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the audit log and VM locks of the test run out of the real system paths.

    Set in os.environ so that serrinj subprocesses started by tests inherit them.
    """
    base = tmp_path_factory.mktemp("serrinj-state")
    os.environ.setdefault("SERRINJ_AUDIT_LOG", str(base / "audit.jsonl"))
    os.environ.setdefault("SERRINJ_LOCK_DIR", str(base / "locks"))


@pytest.fixture
def start_vm() -> Iterator[VmFactory]:
    """Start test VMs (``start_vm(vcpus=2, mode="halt", extra=())``, see
    :class:`tests.helpers.testvm.VmFactory`); every one is stopped by its pid when the
    test ends, whatever happens."""
    factory = VmFactory()
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def paused_runs() -> Iterator[List[Paused]]:
    """Paused serrinj runs (:class:`tests.helpers.paused.Paused`) a test appends here;
    each one still running at the end is killed by its pid."""
    runs: List[Paused] = []
    try:
        yield runs
    finally:
        for run in runs:
            run.kill()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak-count",
        type=int,
        default=500,
        help="injections made by tests/test_soak.py (default 500; `make soak` runs 10000)",
    )
