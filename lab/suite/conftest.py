"""Fixtures of the in-lab suite.

``lab``     the boot's settings from the host (CPU model, whether it has RAS, ...)
``kvm_fd``  an open /dev/kvm, closed after the test
``nested``  the inner VMM's files (skips when the lab was booted with --no-qemu)

Outside the lab (no ``lab.mode`` on the kernel command line) every test here
is skipped: they need the emulated arm64 host.
"""

from __future__ import annotations

import os
from typing import Iterator, List

import pytest

from lab import skips
from lab.guest import env
from lab.guest.nested import NestedAssets


@pytest.fixture(scope="session")
def lab() -> env.LabConfig:
    return env.current()


@pytest.fixture
def kvm_fd() -> Iterator[int]:
    fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


@pytest.fixture
def nested(lab: env.LabConfig) -> NestedAssets:
    if not lab.with_qemu:
        pytest.skip(skips.NO_QEMU_REASON)  # accepted on --no-qemu boots only (lab/skips.py)
    assets = NestedAssets()
    missing = assets.missing()
    if missing:
        pytest.fail(f"the nested initramfs piece is incomplete: {missing}")
    return assets


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    if env.current().inside_lab:
        return
    here = os.path.dirname(os.path.abspath(__file__))
    skip = pytest.mark.skip(reason="runs inside the arm64 lab only: make lab-arm64")
    for item in items:
        if str(item.path).startswith(here + os.sep):
            item.add_marker(skip)
