"""The real ``serrinj`` command, run as a subprocess against the test VM in another process.

Every test VM is started through :class:`serrinj.testvm.process.TestVmProcess`
and ended by its pid when the test ends, whatever happens. What the guest
*observed* is read from the test VM's JSON events; "nothing was sent" is
proved by the guest's own counters (a heartbeat reports how many NMIs,
machine checks and polled errors it saw) and by ``status --json`` events
before and after.

The tests always name their VM with ``--pid``: other test VMs may be running
on the machine at the same time.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import pytest

from serrinj.errors import ExitCode
from serrinj.testvm.process import TestVmProcess
from tests.conftest import debugfs_kvm, no_such_pid
from tests.helpers import serrinj_cli
from tests.helpers.serrinj_cli import SERRINJ, Result

pytestmark = [pytest.mark.kvm, pytest.mark.root]

TIMEOUT = 60.0
#: samples of `list` a test may take to see a halted vCPU's thread blocked in KVM_RUN
LIST_LOOKS = 5
Event = Dict[str, Any]


def serrinj(*args: object, env: Optional[Dict[str, str]] = None) -> Result:
    """Run the real command line; stdout is a pipe (so plain text or JSON)."""
    return serrinj_cli.run(*args, env=env, timeout=TIMEOUT)


def serrinj_without_debugfs(*args: object) -> Result:
    """:func:`serrinj` where debugfs is not mounted (see ``conftest.without_debugfs``)."""
    return serrinj_cli.run(*args, without_debugfs=True, timeout=TIMEOUT)


def heartbeat(vm: TestVmProcess, vcpu: int) -> Event:
    mark = vm.mark()
    vm.command({"cmd": "heartbeat", "vcpu": vcpu})
    return vm.wait_event(
        lambda e: e.get("event") == "heartbeat" and e.get("vcpu") == vcpu, 10.0, since=mark
    )


def guest_counters(vm: TestVmProcess) -> Dict[int, tuple]:
    """What every vCPU's guest has taken so far: (NMIs, #MCs, polled errors, check failures)."""
    out = {}
    for info in vm.vcpus:
        hb = heartbeat(vm, info.vcpu_id)
        out[info.vcpu_id] = (
            hb["nmi_count"],
            hb["mce_count"],
            hb["poll_count"],
            hb["check_failures"],
        )
    return out


def status_events(vm: TestVmProcess) -> Dict[int, Any]:
    r = serrinj("status", "--json", "--pid", vm.pid)
    assert r.rc == 0, r
    return {v["vcpu_id"]: v["events"] for v in r.data["vcpus"]}


def assert_nothing_sent(vm: TestVmProcess, before_events: Dict[int, Any]) -> None:
    """The guest took nothing and KVM holds nothing new for any vCPU."""
    time.sleep(0.1)  # ten guest timer ticks: a polled error would have been found
    assert status_events(vm) == before_events
    assert all(c == (0, 0, 0, 0) for c in guest_counters(vm).values()), guest_counters(vm)
    assert not [e for e in vm.events_seen if e.get("event") in ("nmi", "mce", "mce-poll")]


def assert_error(r: Result, code: ExitCode, *words: str) -> None:
    assert r.rc == code, r
    assert r.stderr.startswith("error: "), r
    assert "Traceback" not in r.stderr, r
    for w in words:
        assert w in r.stderr, (w, r)


# ====================================================================== list / status
@pytest.mark.parametrize("mode", ["halt", "spin"])
def test_list_and_status_of_a_live_vm(start_vm: Callable[..., TestVmProcess], mode: str) -> None:
    vm = start_vm(vcpus=2, mode=mode)
    tids = {v.vcpu_id: v.tid for v in vm.vcpus}

    r = serrinj("list", "--pid", vm.pid)
    assert r.rc == 0, r
    assert "\x1b[" not in r.stdout  # no ANSI codes in a pipe
    assert f"VM pid {vm.pid}" in r.stdout
    for tid in tids.values():
        assert str(tid) in r.stdout

    r = serrinj("list", "--json")
    assert r.rc == 0, r
    assert r.data["schema"] == "serrinj/1" and r.data["command"] == "list"
    (mine,) = [v for v in r.data["vms"] if v["pid"] == vm.pid]
    assert mine["arch"] == "x86_64" and mine["vmm"] == "serrinj-testvm"
    assert {v["vcpu_id"]: v["tid"] for v in mine["vcpus"]} == tids

    # A halting guest wakes on its 10 ms timer, so one read can catch a vCPU awake; each read
    # must be coherent (state agrees with the MP state of the same stop), and every vCPU must
    # be seen halted within a few reads.
    seen: Dict[int, List[str]] = {0: [], 1: []}
    for _ in range(5):
        r = serrinj("status", "--json", "--pid", vm.pid)
        assert r.rc == 0, r
        d = r.data
        assert d["schema"] == "serrinj/1" and d["command"] == "status"
        assert d["host"]["arch"] == "x86_64" and d["host"]["caps"]["KVM_CAP_VCPU_EVENTS"] == 1
        assert d["vm"]["pid"] == vm.pid
        assert [v["vcpu_id"] for v in d["vcpus"]] == [0, 1]
        for v in d["vcpus"]:
            assert v["thread"]["tid"] == tids[v["vcpu_id"]]
            assert v["registers_restored"] is True
            assert v["events"]["nmi"]["pending"] == 0
            assert (v["state"], v["mp_state"]) in (("halted", "halted"), ("in-guest", "runnable"))
            seen[v["vcpu_id"]].append(v["state"])
        if mode == "spin" or all("halted" in s for s in seen.values()):
            break
    want = "halted" if mode == "halt" else "in-guest"
    for vid, states in seen.items():
        assert want in states, (vid, states)
        if mode == "spin":
            assert states == ["in-guest"], (vid, states)
    assert all(c[3] == 0 for c in guest_counters(vm).values())  # self-check still clean

    r = serrinj("status", "--pid", vm.pid, "--vcpu", "1")
    assert r.rc == 0, r
    assert "machine checks" in r.stdout and str(tids[1]) in r.stdout
    assert str(tids[0]) not in r.stdout


def test_status_json_does_not_load_rich_rendering(
    start_vm: Callable[..., TestVmProcess],
) -> None:
    vm = start_vm(vcpus=1)
    proc = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "serrinj",
            "status",
            "--json",
            "--pid",
            str(vm.pid),
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["vm"]["pid"] == vm.pid
    loaded = [line.split("|")[-1].strip() for line in proc.stderr.splitlines()]
    assert "serrinj.ops.status" in loaded
    assert not [m for m in loaded if m.startswith("rich")]


def test_status_by_target_fd(start_vm: Callable[..., TestVmProcess]) -> None:
    vm = start_vm(vcpus=2)
    r = serrinj("status", "--json", "--pid", vm.pid, "--fd", vm.vcpu(1).fd)
    assert r.rc == 0, r
    assert [v["vcpu_id"] for v in r.data["vcpus"]] == [1]
    r = serrinj("status", "--json", "--pid", vm.pid, "--fd", 0)
    assert r.rc == ExitCode.USAGE, r
    assert "not a KVM vCPU fd" in r.data["error"]["message"]


def test_inherited_fd_is_traced_back_to_its_vmm(start_vm: Callable[..., TestVmProcess]) -> None:
    """serrinj run by the VMM's own child with an inherited vCPU fd: KVM refuses that fd
    (EIO), kcmp finds the VMM that shares it, and the NMI reaches the right vCPU."""
    vm = start_vm(vcpus=2)
    fd = vm.vcpu(1).fd
    mark = vm.mark()
    vm.command({"cmd": "spawn", "argv": [*SERRINJ, "nmi", "--json", "--fd", str(fd), "--wait"]})
    spawned = vm.wait_event(lambda e: e.get("event") == "spawned", 10.0, since=mark)
    try:
        done = vm.wait_event(lambda e: e.get("event") == "spawn-exit", TIMEOUT, since=mark)
    except BaseException:
        # not reaped yet (no spawn-exit), so the pid is still that child's
        with contextlib.suppress(ProcessLookupError):
            os.kill(spawned["pid"], signal.SIGKILL)
        raise
    assert done["returncode"] == 0, done["stderr"]
    (inj,) = json.loads(done["stdout"])["injections"]
    assert inj["vm"]["pid"] == vm.pid and inj["vcpu_id"] == 1
    assert inj["delivery"]["delivered"] is True
    ev = vm.wait_event(lambda e: e.get("event") == "nmi", 10.0, since=mark)
    assert ev["vcpu"] == 1


def test_list_probe_maps_unnamed_spinning_vcpus(start_vm: Callable[..., TestVmProcess]) -> None:
    """Busy vCPUs on unnamed threads: only a probe finds them where debugfs is not
    mounted (run so even in the debugfs pass); with debugfs, KVM names them."""
    vm = start_vm(vcpus=2, mode="spin", extra=["--thread-names", "none"])
    time.sleep(0.2)
    r = serrinj_without_debugfs("list", "--json", "--pid", vm.pid)
    assert r.rc == 0, r
    assert all(v["tid"] is None for v in r.data["vms"][0]["vcpus"])
    r = serrinj_without_debugfs("list", "--json", "--pid", vm.pid, "--probe")
    assert r.rc == 0, r
    got = {v["vcpu_id"]: (v["tid"], v["mapped_by"]) for v in r.data["vms"][0]["vcpus"]}
    assert got == {v.vcpu_id: (v.tid, "probe") for v in vm.vcpus}
    if debugfs_kvm():
        r = serrinj("list", "--json", "--pid", vm.pid)
        got = {v["vcpu_id"]: (v["tid"], v["sources"]) for v in r.data["vms"][0]["vcpus"]}
        assert got == {v.vcpu_id: (v.tid, ["debugfs"]) for v in vm.vcpus}


@pytest.mark.parametrize("style", ["qemu", "kvmtool", "firecracker", "cloud-hypervisor", "crosvm"])
def test_each_vmms_thread_names_map_busy_vcpus(
    start_vm: Callable[..., TestVmProcess], style: str
) -> None:
    """Busy vCPUs (in the guest, so no syscall file names them) with debugfs out of
    sight: the thread names of each VMM, as the test VM gives them, map every vCPU."""
    vm = start_vm(vcpus=2, mode="spin", extra=["--thread-names", style])
    r = serrinj_without_debugfs("list", "--json", "--pid", vm.pid)
    assert r.rc == 0, r
    (listed,) = r.data["vms"]
    got = {v["vcpu_id"]: (v["tid"], v["thread_name"], v["mapped_by"]) for v in listed["vcpus"]}
    assert got == {v.vcpu_id: (v.tid, v.thread_name, "name") for v in vm.vcpus}, r


def test_two_vms_in_one_process_keep_their_vcpus_apart() -> None:
    """One process, two VMs, each with a vCPU 0, and a dup of the first vCPU's fd: the
    dup joins its vCPU (the same open file, by kcmp), the other VM's vCPU 0 stays a
    vCPU of its own."""
    helper = Path(__file__).resolve().parent / "helpers" / "two_vms.py"
    proc = subprocess.Popen(
        [sys.executable, str(helper)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline().split()
        assert ready and ready[0] == "READY", ready
        vcpu1, dup1, vcpu2 = (int(x) for x in ready[1:])
        r = serrinj("list", "--json", "--pid", proc.pid)
        assert r.rc == 0, r
        got = sorted((v["vcpu_id"], sorted(v["fds"])) for v in r.data["vms"][0]["vcpus"])
        assert got == sorted([(0, sorted([vcpu1, dup1])), (0, [vcpu2])]), r
    finally:
        proc.kill()
        proc.wait(timeout=10)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


@pytest.mark.parametrize("mode", ["halt", "spin"])
@pytest.mark.parametrize("names", ["qemu", "none"])
def test_a_vmm_with_two_fds_per_vcpu(
    start_vm: Callable[..., TestVmProcess], mode: str, names: str
) -> None:
    """A VMM that holds a second fd on every vCPU (Firecracker; Python's mmap of
    kvm_run): each vCPU is listed once with both fds, status, nmi and events save
    succeed on it, and the guest observes the NMI. Run with debugfs mounted and not."""
    vm = start_vm(vcpus=2, mode=mode, extra=["--dup-vcpu-fds", "--thread-names", names])
    want = {
        v.vcpu_id: sorted((v.fd, vm.ready["vcpus"][i]["dup_fd"])) for i, v in enumerate(vm.vcpus)
    }
    assert all(a != b for a, b in want.values())
    # A halted guest's thread wakes now and then (its timer) and a sample can catch it
    # on a CPU, outside KVM_RUN: then a probe maps it, and the halt check below is
    # about the syscall source, so look a few times for a sample with both blocked.
    for _look in range(LIST_LOOKS):
        r = serrinj("list", "--json", "--pid", vm.pid, "--probe")
        assert r.rc == 0, r
        listed = r.data["vms"][0]["vcpus"]
        if mode != "halt" or all(v["mapped_by"] == "syscall" for v in listed):
            break
        time.sleep(0.05)
    assert {v["vcpu_id"]: sorted(v["fds"]) for v in listed} == want, r
    assert len(listed) == 2
    for v in listed:
        assert v["tid"] == vm.vcpu(v["vcpu_id"]).tid, r
        assert v["mapped_by"] == v["sources"][0] and v["disagreements"] == [], r
        if debugfs_kvm():
            assert "debugfs" in v["sources"], r
        if mode == "halt":  # blocked in KVM_RUN on its own fd, not the dup
            assert v["mapped_by"] == "syscall" and v["fd"] == vm.vcpu(v["vcpu_id"]).fd, r
    text = serrinj("list", "--pid", vm.pid)
    assert text.rc == 0 and "vcpus=2" in text.stdout, text
    r = serrinj("status", "--json", "--pid", vm.pid)
    assert r.rc == 0, r
    assert [(s["vcpu_id"], s["thread"]["tid"]) for s in r.data["vcpus"]] == [
        (v.vcpu_id, v.tid) for v in vm.vcpus
    ]
    mark = vm.mark()
    r = serrinj("nmi", "--json", "--pid", vm.pid, "--vcpu", 1, "--wait")
    assert r.rc == 0, r
    ev = vm.wait_event(lambda e: e.get("event") == "nmi", 10.0, since=mark)
    assert ev["vcpu"] == 1 and ev["count"] == 1
    r = serrinj("events", "save", "--json", "--pid", vm.pid)
    assert r.rc == 0, r
    assert [v["vcpu_id"] for v in r.data["snapshot"]["vcpus"]] == [0, 1], r


# ====================================================================== nmi / mce
def test_nmi_with_wait_is_observed_by_the_guest(start_vm: Callable[..., TestVmProcess]) -> None:
    vm = start_vm(vcpus=2)
    mark = vm.mark()
    r = serrinj("nmi", "--json", "--pid", vm.pid, "--vcpu", 1, "--wait")
    assert r.rc == 0, r
    (inj,) = r.data["injections"]
    assert r.data["command"] == "nmi" and r.data["dry_run"] is False
    assert inj["kind"] == "nmi" and inj["vcpu_id"] == 1 and inj["tid"] == vm.vcpu(1).tid
    assert inj["after"]["nmi"]["pending"] == 1 or inj["after"]["nmi"]["injected"] == 1
    assert inj["delivery"]["delivered"] is True
    assert inj["delivery"]["latency_s"] > 0
    assert inj["registers_restored"] is True
    ev = vm.wait_event(lambda e: e.get("event") == "nmi", 10.0, since=mark)
    assert ev["vcpu"] == 1 and ev["vector"] == 2 and ev["count"] == 1
    counters = guest_counters(vm)
    assert counters[0] == (0, 0, 0, 0) and counters[1] == (1, 0, 0, 0)


def test_nmi_text_output_and_all_vcpus(start_vm: Callable[..., TestVmProcess]) -> None:
    vm = start_vm(vcpus=2, mode="spin")
    r = serrinj("nmi", "--pid", vm.pid, "--vcpu", "all")
    assert r.rc == 0, r
    assert "Injected an NMI into vCPU 0" in r.stdout and "into vCPU 1" in r.stdout
    for v in (0, 1):
        vm.wait_event(lambda e, v=v: e.get("event") == "nmi" and e.get("vcpu") == v, 10.0)


@pytest.mark.parametrize(
    ("preset", "event", "raises_mc"),
    [("corrected", "mce-poll", False), ("uncorrected", "mce", True)],
)
def test_mce_is_observed_by_the_guest(
    start_vm: Callable[..., TestVmProcess], preset: str, event: str, raises_mc: bool
) -> None:
    vm = start_vm(vcpus=1)
    mark = vm.mark()
    r = serrinj(
        "mce", "--json", "--pid", vm.pid, "--bank", 3, "--preset", preset,
        "--addr", "0x7000", "--wait",
    )  # fmt: skip
    assert r.rc == 0, r
    (inj,) = r.data["injections"]
    req = inj["request"]
    assert req["bank"] == 3 and req["addr"] == 0x7000
    assert inj["prediction"]["raises_mc"] is raises_mc
    assert inj["delivery"]["delivered"] is True
    ev = vm.wait_event(lambda e: e.get("event") == event, 10.0, since=mark)
    assert ev["vcpu"] == 0
    bank = {b["bank"]: b for b in ev["banks"]}[3]
    assert (bank["status"], bank["addr"], bank["misc"]) == (req["status"], 0x7000, req["misc"])
    if raises_mc:
        assert ev["vector"] == 18
        assert ev["mcg_status"] == req["mcg_status"]
    assert guest_counters(vm)[0][3] == 0


def test_mce_from_raw_fields(start_vm: Callable[..., TestVmProcess]) -> None:
    vm = start_vm(vcpus=1)
    mark = vm.mark()
    r = serrinj("mce", "--pid", vm.pid, "--bank", 0, "--status", "val,en", "--misc", "0x8c")
    assert r.rc == 0, r
    assert "MCi_STATUS 0x9000000000000000 [VAL EN]" in r.stdout
    ev = vm.wait_event(lambda e: e.get("event") == "mce-poll", 10.0, since=mark)
    assert ev["banks"][0]["status"] == 0x9000000000000000


# ====================================================================== dry run
def test_dry_run_sends_nothing(start_vm: Callable[..., TestVmProcess]) -> None:
    vm = start_vm(vcpus=2)
    before = status_events(vm)
    r = serrinj("nmi", "--json", "--dry-run", "--pid", vm.pid, "--vcpu", "all")
    assert r.rc == 0, r
    assert r.data["dry_run"] is True
    assert [i["dry_run"] for i in r.data["injections"]] == [True, True]
    r = serrinj("mce", "--dry-run", "--pid", vm.pid, "--vcpu", 0, "--bank", 1, "--preset", "uc")
    assert r.rc == 0, r
    assert "Would inject a machine check" in r.stdout and "nothing (--dry-run)" in r.stdout
    assert "machine-check: uncorrected error" in r.stdout
    assert_nothing_sent(vm, before)


# ====================================================================== rejections
def test_serror_on_x86_points_to_mce_and_nmi(start_vm: Callable[..., TestVmProcess]) -> None:
    vm = start_vm(vcpus=2)
    before = status_events(vm)
    for extra in ([], ["--severity", "ce"], ["--ext-dabt"], ["--esr", "0x1811", "--vcpu", "0"]):
        r = serrinj("inject", "--pid", vm.pid, *extra)
        assert_error(r, ExitCode.UNSUPPORTED, "arm64", "serrinj mce", "serrinj nmi")
    assert_nothing_sent(vm, before)


def test_esr_outside_iss_is_rejected_naming_the_bits(
    start_vm: Callable[..., TestVmProcess],
) -> None:
    vm = start_vm(vcpus=1)
    before = status_events(vm)
    r = serrinj("inject", "--pid", vm.pid, "--esr", "0x2000011")
    assert_error(r, ExitCode.USAGE, "IL (bit 25)", "[24:0]")
    r = serrinj("inject", "--json", "--pid", vm.pid, "--esr", "0xbe001811")
    assert r.rc == ExitCode.USAGE
    err = r.data["error"]
    assert err["kind"] == "invalid-input" and err["exit_code"] == 2
    assert "EC (bits [31:26] = 0x2f)" in err["message"]
    assert "Did you mean 0x1811?" in err["hint"]
    assert_nothing_sent(vm, before)


def test_mce_rejections_send_nothing(start_vm: Callable[..., TestVmProcess]) -> None:
    vm = start_vm(vcpus=2)
    before = status_events(vm)
    pid = vm.pid
    cases = [
        (["--vcpu", 0, "--bank", 12, "--preset", "ce"], ExitCode.USAGE, "bank 12 does not exist"),
        (["--vcpu", 0, "--bank", 1, "--status", "0x1c00"], ExitCode.USAGE, "lacks VAL"),
        (["--vcpu", 0, "--bank", 1, "--status", "val,bogus"], ExitCode.USAGE, "bogus"),
        (["--vcpu", 0, "--preset", "ce"], ExitCode.USAGE, "--bank is required"),
        (["--vcpu", 0, "--bank", 1], ExitCode.USAGE, "--status or --preset"),
        (["--bank", 1, "--preset", "ce"], ExitCode.USAGE, "choose one with --vcpu"),
        (["--vcpu", 7, "--bank", 1, "--preset", "ce"], ExitCode.NOT_FOUND, "no vCPU 7"),
    ]
    for args, code, words in cases:
        assert_error(serrinj("mce", "--pid", pid, *args), code, words)
    assert_error(serrinj("nmi", "--pid", pid), ExitCode.USAGE, "--vcpu all")
    assert_nothing_sent(vm, before)


def test_mce_that_would_triple_fault_is_refused(start_vm: Callable[..., TestVmProcess]) -> None:
    # a paused VM whose guest never ran: CR4.MCE is still clear
    vm = start_vm(vcpus=1, extra=["--start-paused"])
    r = serrinj("mce", "--json", "--pid", vm.pid, "--bank", 1, "--preset", "uc-fatal")
    assert r.rc == ExitCode.CONFLICT, r
    assert r.data["error"]["kind"] == "conflict"
    assert "triple" in r.data["error"]["message"] and "--force" in r.data["error"]["hint"]
    assert r.stderr.startswith("error: ") and "hint: " in r.stderr
    vm.command({"cmd": "run"})
    vm.wait_event(lambda e: e.get("event") == "guest-ready", 10.0)
    assert guest_counters(vm)[0] == (0, 0, 0, 0)  # the guest runs on, nothing was raised
    assert not [e for e in vm.events_seen if e.get("event") == "exit"]


def test_unknown_pid_and_non_vm_pid() -> None:
    pid = no_such_pid()
    r = serrinj("status", "--pid", pid)
    assert_error(r, ExitCode.NOT_FOUND, f"no process with pid {pid}")
    r = serrinj("nmi", "--json", "--pid", pid)
    assert r.rc == ExitCode.NOT_FOUND and r.data["error"]["kind"] == "target-not-found"

    sleeper = subprocess.Popen([shutil.which("sleep") or "/bin/sleep", "60"])
    try:
        r = serrinj("status", "--pid", sleeper.pid)
        assert_error(r, ExitCode.NOT_FOUND, f"process {sleeper.pid} (sleep) is not a KVM VMM")
        r = serrinj("mce", "--json", "--pid", sleeper.pid, "--bank", 1, "--preset", "ce")
        assert r.rc == ExitCode.NOT_FOUND
        assert "holds no KVM VM or vCPU fds" in r.data["error"]["message"]
    finally:
        os.kill(sleeper.pid, signal.SIGKILL)
        sleeper.wait()


def test_usage_errors_exit_2_with_json() -> None:
    r = serrinj("nmi", "--bogus")
    assert r.rc == ExitCode.USAGE and r.stderr.startswith("error: No such option"), r
    assert "hint: see 'serrinj nmi --help'" in r.stderr
    r = serrinj("mce", "--json", "--bank", "x")
    assert r.rc == ExitCode.USAGE, r
    assert r.data["error"]["kind"] == "usage" and r.data["command"] == "mce"
    r = serrinj("inject", "--esr", "0x11", "--severity", "ce")
    assert_error(r, ExitCode.USAGE, "either --esr or --severity")


# ====================================================================== esr (pure)
def test_esr_decode_and_encode() -> None:
    r = serrinj("esr", "decode", "0x00000000be000011")
    assert r.rc == 0, r
    assert "panics" in r.stdout
    assert "SError Interrupt on CPU0, code 0x00000000be000011" in r.stdout

    r = serrinj("esr", "decode", "--json", "0x1811")
    assert r.rc == 0, r
    s, linux = r.data["syndrome"], r.data["linux"]
    assert (s["aet_name"], s["dfsc"], s["esr"]) == ("CE", 0x11, 0xBE001811)
    assert linux["survives"] is True and linux["console_line"] is None

    r = serrinj("esr", "decode", "--json", "0x96000010")  # a data abort, not an SError
    assert r.rc == 0 and r.data["syndrome"]["is_serror"] is False and r.data["linux"] is None

    r = serrinj("esr", "encode", "--json", "--severity", "uer", "--iesb")
    assert r.rc == 0, r
    assert r.data["iss"] == 0x2C11 and r.data["guest_esr"] == 0xBE002C11
    assert r.data["linux"]["survives"] is False

    r = serrinj("esr", "encode", "--ids", "--impdef", "0x1d1ed")
    assert r.rc == 0 and "ISS 0x101d1ed" in r.stdout, r
    assert_error(serrinj("esr", "encode", "--ids", "--severity", "ce"), ExitCode.USAGE, "IDS")


# ====================================================================== demo
def _is_testvm(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"serrinj.testvm" in f.read()
    except OSError:
        return False


def _children(pid: int) -> List[int]:
    out: List[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


@pytest.mark.slow
def test_demo_matches_and_ends_its_vm() -> None:
    r = serrinj("demo", "--json")
    assert r.rc == 0, r
    d = r.data
    assert d["ok"] is True and d["arch"] == "x86_64" and d["command"] == "demo"
    assert "error" not in d
    names = [s["name"] for s in d["steps"]]
    assert names == ["nmi", "mce-corrected", "mce-uncorrected", "guest-self-check"]
    for step in d["steps"]:
        assert step["match"] is True, step
        assert step["error"] is None
    assert d["steps"][0]["observed"]["event"] == "nmi"
    assert d["steps"][2]["observed"]["vector"] == 18
    assert d["status"]["vm"]["pid"] == d["testvm"]["pid"]
    assert not _is_testvm(d["testvm"]["pid"])

    r = serrinj("demo")
    assert r.rc == 0, r
    assert "every injection was observed by the guest as injected" in r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 0.05, 0.1])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_demo_interrupted_ends_its_vm(sig: signal.Signals, delay: float) -> None:
    proc = subprocess.Popen(
        [*SERRINJ, "demo", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    vm_pid = None
    try:
        deadline = time.monotonic() + 30
        while vm_pid is None and time.monotonic() < deadline and proc.poll() is None:
            vm_pid = next((c for c in _children(proc.pid) if _is_testvm(c)), None)
            time.sleep(0.001)
        assert vm_pid is not None, "the demo's test VM never appeared"
        time.sleep(delay)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The whole demo takes a fraction of a second, so the signal may also come
    # after it finished (exit 0) or while the interpreter was already shutting
    # down, when Python has restored the default action (killed by the signal).
    assert proc.returncode in (0, ExitCode.INTERRUPTED, -sig), (proc.returncode, err)
    if proc.returncode == ExitCode.INTERRUPTED:
        assert json.loads(out)["error"]["kind"] == "interrupted"
        assert "error: " in err and "Traceback" not in _without_thread_start_race(err)
    assert not _is_testvm(vm_pid)


def _without_thread_start_race(err: str) -> str:
    """stderr without CPython's report of a signal landing inside ``Thread.start()``.

    A signal whose handler raises (Ctrl-C, or serrinj's SIGTERM handler) right
    after the new thread started makes ``start()`` forget it, and the new
    thread then prints "Exception ignored in thread started by ... KeyError"
    (CPython's threading.py, ``del _limbo[self]``). It is the interpreter's
    message, not serrinj's, and serrinj still exits 130 with the VM ended.
    """
    head = "Exception ignored in thread started by:"
    if head not in err:
        return err
    before, _, rest = err.partition(head)
    lines = rest.splitlines(keepends=True)
    end = next((i for i, line in enumerate(lines) if line.startswith("KeyError: <Thread(")), None)
    assert end is not None, err  # any other exception there is a real failure
    return before + "".join(lines[end + 1 :])


# ====================================================================== completion
def _complete(words: str, cword: int) -> List[str]:
    """What bash completion gets from the real serrinj (click's protocol)."""
    proc = subprocess.run(
        SERRINJ,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**os.environ, "_SERRINJ_COMPLETE": "bash_complete", "COMP_WORDS": words,
             "COMP_CWORD": str(cword)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return [line.split(",", 1)[1] for line in proc.stdout.splitlines()]


def test_completion_offers_live_pids_and_vcpus(start_vm: Callable[..., TestVmProcess]) -> None:
    vm = start_vm(vcpus=2)
    assert str(vm.pid) in _complete("serrinj status --pid ", 3)
    assert _complete(f"serrinj nmi --pid {vm.pid} --vcpu ", 5) == ["0", "1", "all"]
    assert "inject" in _complete("serrinj ", 1)
