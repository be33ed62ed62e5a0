"""A real arm64 VMM inside the lab: Debian's QEMU with -accel kvm boots a Linux guest."""

from __future__ import annotations

import os

from lab.guest.nested import MARKER, TICK, InnerQemu, NestedAssets

BOOT_TIMEOUT_S = 120


def test_inner_qemu_boots_linux_guest(nested: NestedAssets) -> None:
    vm = InnerQemu.start(nested, name="smoke", tick=1)
    try:
        up = vm.wait_for(MARKER, timeout=BOOT_TIMEOUT_S)
        assert up.split()[-1].endswith("-arm64")  # the guest printed its uname -r
        vm.wait_for(rf"{TICK} \d+", timeout=30)  # and keeps running
        threads = os.listdir(f"/proc/{vm.pid}/task")
        names = set()
        for tid in threads:
            with open(f"/proc/{vm.pid}/task/{tid}/comm") as fh:
                names.add(fh.read().strip())
        assert "CPU 0/KVM" in names
    finally:
        vm.stop()
    assert vm.proc.returncode is not None
    assert not os.path.exists(f"/proc/{vm.pid}/status")
