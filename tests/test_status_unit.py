"""The vCPU state that `status` reports agrees with the MP state read at the same stop."""

from typing import Optional

import pytest

from serrinj.ops.status import reconcile_state


@pytest.mark.parametrize(
    ("arch", "state", "mp", "want"),
    [
        # x86_64: the /proc sample said halted, but a timer woke the vCPU before the stop.
        ("x86_64", "halted", "runnable", "in-guest"),
        ("x86_64", "halted", "halted", "halted"),
        ("x86_64", "in-guest", "halted", "halted"),
        ("x86_64", "in-guest", "runnable", "in-guest"),
        # An AP still waiting for its SIPI blocks in KVM_RUN like a halted vCPU.
        ("x86_64", "in-guest", "init_received", "halted"),
        # No MP state (the ioctl failed): the thread sample stands.
        ("x86_64", "halted", None, "halted"),
        # Outside KVM_RUN the MP state says nothing about where the thread is.
        ("x86_64", "userspace", "runnable", "userspace"),
        ("x86_64", "stopped", "halted", "stopped"),
        # arm64 KVM reports a vCPU blocked in WFI as runnable: the thread sample decides.
        ("aarch64", "halted", "runnable", "halted"),
        ("aarch64", "in-guest", "runnable", "in-guest"),
    ],
)
def test_reconcile_state(arch: str, state: str, mp: Optional[str], want: str) -> None:
    assert reconcile_state(arch, state, mp) == want
