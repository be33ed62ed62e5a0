"""serrinj against a real libvirt domain: Debian's libvirtd, started here without systemd.

A session fixture starts ``libvirtd --daemon`` (unless one already answers on
``qemu:///system``), creates a transient KVM domain that boots serrinj's x86
firmware guest with its serial console in a file, and always destroys the
domain, ends the daemon it started (by its pid) and removes its files. libvirt
starts QEMU with ``-name guest=DOMAIN,debug-threads=on`` and ``-sandbox on``,
and writes ``/run/libvirt/qemu/DOMAIN.pid``.

``scripts/install-deps`` installs libvirt and edits ``/etc/libvirt/qemu.conf``
(see tests/helpers/libvirt.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Tuple

import pytest

from serrinj.codec import mce
from tests.conftest import missing, need_tool
from tests.helpers import libvirt, serrinj_cli
from tests.helpers.qemu import build_firmware

pytestmark = [pytest.mark.qemu, pytest.mark.kvm, pytest.mark.root]


@pytest.fixture(scope="session")
def domain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[libvirt.Domain]:
    """A running transient domain (2 vCPUs, halted between timer ticks) and its daemon."""
    if os.uname().machine != "x86_64":
        pytest.skip("the firmware guest is x86_64")
    need_tool("libvirtd", "libvirt-daemon libvirt-daemon-driver-qemu")
    need_tool("virsh", "libvirt-clients")
    problem = libvirt.setup_problem()
    if problem:
        missing(problem, "libvirt")
    workdir = tmp_path_factory.mktemp("libvirt")
    firmware = build_firmware(workdir / "stub.bin")
    daemon = libvirt.Libvirtd(workdir)
    dom = libvirt.Domain(f"srj-{os.getpid()}-{workdir.name[-4:]}", firmware, workdir)
    try:
        daemon.start()
        dom.create()
        dom.wait_line("ready cpu=0", timeout=30)
        dom.wait_line("ready cpu=1", timeout=30)
        yield dom
    finally:
        try:
            dom.destroy()
        finally:
            daemon.stop()
            shutil.rmtree(workdir, ignore_errors=True)


def test_list_shows_the_domain_by_name(domain: libvirt.Domain) -> None:
    res = serrinj_cli.run("list", "--json")
    assert res.rc == 0, res
    mine = [v for v in res.data["vms"] if v["pid"] == domain.pid]
    assert len(mine) == 1, res
    assert mine[0]["name"] == domain.name and mine[0]["vmm"] == "qemu"
    res = serrinj_cli.run("list", "--name", domain.name, "--json")
    assert res.rc == 0, res
    assert [v["pid"] for v in res.data["vms"]] == [domain.pid]
    vcpus = res.data["vms"][0]["vcpus"]
    assert sorted(v["vcpu_id"] for v in vcpus) == [0, 1]
    # libvirt names the threads (debug-threads=on); a halted guest's threads wait in KVM_RUN
    assert all(v["tid"] is not None for v in vcpus), vcpus
    assert {v["thread_name"] for v in vcpus} == {"CPU 0/KVM", "CPU 1/KVM"}


def _inject(domain: libvirt.Domain, *args: str) -> Tuple[int, str]:
    res = serrinj_cli.run(*args, "--name", domain.name)
    assert res.rc == 0, res
    return res.rc, res.stdout


def test_the_guest_observes_nmi_and_mce_sent_by_domain_name(domain: libvirt.Domain) -> None:
    mark = domain.mark()
    _inject(domain, "nmi", "--vcpu", "1")
    line = domain.wait_line("nmi cpu=1 count=*", since=mark)
    print(f"nmi vCPU 1: guest serial: {line}")
    srao = mce.preset("srao").build(bank=3, addr=0x9000)
    mark = domain.mark()
    _inject(
        domain, "mce", "--vcpu", "0", "--bank", "3", "--status", hex(srao.status), "--addr",
        hex(srao.addr),
    )  # fmt: skip
    line = domain.wait_line(f"mce cpu=0 bank=3 status=0x{srao.status:016x}*", since=mark)
    print(f"mce srao vCPU 0: guest serial: {line}")
    assert domain.state() == "running"
    assert not [x for x in domain.lines() if x.startswith("exception")]


def test_status_by_domain_name_restores_every_vcpu(domain: libvirt.Domain) -> None:
    res = serrinj_cli.run("status", "--name", domain.name, "--json")
    assert res.rc == 0, res
    vcpus = res.data["vcpus"]
    assert sorted(v["vcpu_id"] for v in vcpus) == [0, 1]
    assert all(v["registers_restored"] for v in vcpus), vcpus
    assert domain.state() == "running"


EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "libvirt" / "inject.sh"


def _example(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, SERRINJ=" ".join(serrinj_cli.SERRINJ), PYTHON=sys.executable)
    return subprocess.run(
        ["bash", str(EXAMPLE), *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_the_example_script_injects_into_the_domain(domain: libvirt.Domain) -> None:
    mark = domain.mark()
    run = _example(domain.name, "1")
    assert run.returncode == 0, run.stdout + run.stderr
    domain.wait_line("nmi cpu=1 count=*", since=mark)
    domain.wait_line("mce cpu=1 bank=3 status=0xbd000000000000c0*", since=mark)


def test_the_example_script_demo_domain_reports_what_its_guest_saw(
    domain: libvirt.Domain,
) -> None:
    run = _example("--demo")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "nmi cpu=1 count=1" in run.stdout, run.stdout
    assert "mce cpu=1 bank=3 status=0xbd000000000000c0" in run.stdout, run.stdout
    assert "serrinj-demo-" not in libvirt.virsh("list", "--all", "--name")
