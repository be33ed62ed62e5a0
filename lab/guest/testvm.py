"""Helpers for the built-in test VM's arm64 guest in lab tests (see serrinj.testvm.arm64).

The guest reports what it observes as JSON events; these helpers start it,
send it commands and wait for its reports. They never inject anything
themselves: the tests that use them inject through serrinj's CLI.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Dict, Sequence

from serrinj.testvm.process import TestVmProcess

Event = Dict[str, Any]

START_TIMEOUT_S = 60
EVENT_TIMEOUT_S = 20


def on(name: str, vcpu: int) -> Callable[[Event], bool]:
    """A predicate for the guest's ``name`` event on ``vcpu``."""
    return lambda e: e.get("event") == name and e.get("vcpu") == vcpu


def start(mode: str, vcpus: int = 2, extra: Sequence[str] = ()) -> TestVmProcess:
    """An arm64 test VM whose guest is up on every vCPU (stop it with ``.stop()``)."""
    t0 = time.monotonic()
    vm = TestVmProcess.start(
        arch="arm64", vcpus=vcpus, mode=mode, extra_args=list(extra), timeout=START_TIMEOUT_S
    )
    try:
        for v in range(vcpus):
            vm.wait_event(on("guest-ready", v), EVENT_TIMEOUT_S)
    except BaseException:
        vm.stop()
        raise
    print(f"test VM pid {vm.pid} mode={mode} vcpus={vcpus} {' '.join(extra)}"
          f" up in {time.monotonic() - t0:.2f} s", file=sys.stderr)  # fmt: skip
    return vm


def reply(vm: TestVmProcess, cmd: Dict[str, Any]) -> Event:
    """Send ``cmd``; its ack, error, or answering event (matched by an id)."""
    ident = f"{cmd['cmd']}-{time.monotonic_ns()}"
    mark = vm.mark()
    vm.command({**cmd, "id": ident})
    return vm.wait_event(lambda e: e.get("id") == ident, EVENT_TIMEOUT_S, since=mark)


def heartbeat(vm: TestVmProcess, vcpu: int) -> Event:
    """A round trip through the guest: it ran (and read its mailbox) after this call began."""
    mark = vm.mark()
    ack = reply(vm, {"cmd": "heartbeat", "vcpu": vcpu})
    assert ack["event"] == "ack", ack
    return vm.wait_event(on("heartbeat", vcpu), EVENT_TIMEOUT_S, since=mark)


def unmask(vm: TestVmProcess, vcpu: int) -> Event:
    """Make the guest clear PSTATE.A on ``vcpu``; returns its ``unmasked`` report."""
    mark = vm.mark()
    ack = reply(vm, {"cmd": "unmask", "vcpu": vcpu})
    assert ack["event"] == "ack", ack
    return vm.wait_event(on("unmasked", vcpu), EVENT_TIMEOUT_S, since=mark)


def local_events(vm: TestVmProcess, vcpu: int) -> Event:
    """The VMM's own KVM_GET_VCPU_EVENTS and PSTATE of ``vcpu`` (read in its process)."""
    ev = reply(vm, {"cmd": "events", "vcpu": vcpu})
    assert ev["event"] == "events", ev
    return ev


def serrors(vm: TestVmProcess, vcpu: int, since: int = 0) -> list:  # type: ignore[type-arg]
    """Every ``serror`` report of ``vcpu`` from event index ``since`` on."""
    return [e for e in vm.events_seen[since:] if on("serror", vcpu)(e)]


def trouble(vm: TestVmProcess) -> list:  # type: ignore[type-arg]
    """Reports that mean something went wrong (unexpected vector, self-check, VMM error)."""
    bad = ("exception", "guest-check-failed", "exit", "error")
    return [e for e in vm.events_seen if e.get("event") in bad]
