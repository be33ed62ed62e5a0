"""Smoke tests of the emulated arm64 host: KVM is there and says what the CPU model implies.

``lab.expect_ras`` comes from the host (``-cpu max`` has the RAS extension,
``-cpu cortex-a57`` does not), so each check can fail in both directions.
"""

from __future__ import annotations

import errno
import os
import platform
from typing import Iterator, Tuple

import pytest

from lab.guest import env
from lab.guest.runner import RAS_MESSAGE, kernel_log
from serrinj._native import ioctl_buf, ioctl_int
from serrinj.kvm import api, arm64

ISS_CE = 0x1811  # AET=CE, DFSC=0x11: a syndrome a Linux guest survives (BRIEF section 3)


def test_machine_is_arm64() -> None:
    assert platform.machine() == "aarch64"


def test_dev_kvm_opens(kvm_fd: int) -> None:
    assert ioctl_int(kvm_fd, api.KVM_GET_API_VERSION) == api.KVM_API_VERSION


def test_kernel_ras_detection_matches_cpu(lab: env.LabConfig) -> None:
    assert (RAS_MESSAGE in kernel_log()) is lab.expect_ras


def test_cap_vcpu_events(kvm_fd: int) -> None:
    assert ioctl_int(kvm_fd, api.KVM_CHECK_EXTENSION, api.KVM_CAP_VCPU_EVENTS) == 1


def test_cap_inject_serror_esr_follows_ras(kvm_fd: int, lab: env.LabConfig) -> None:
    cap = ioctl_int(kvm_fd, api.KVM_CHECK_EXTENSION, api.KVM_CAP_ARM_INJECT_SERROR_ESR)
    assert cap == (1 if lab.expect_ras else 0)


def test_cap_inject_ext_dabt(kvm_fd: int) -> None:
    assert ioctl_int(kvm_fd, api.KVM_CHECK_EXTENSION, api.KVM_CAP_ARM_INJECT_EXT_DABT) == 1


def test_serrinj_comes_from_the_working_tree() -> None:
    import serrinj

    assert serrinj.__file__ is not None
    assert serrinj.__file__.startswith("/opt/serrinj/serrinj/")


def test_cffi_calls_libc() -> None:
    import _cffi_backend  # type: ignore[import-untyped]  # the wheel's arm64 extension
    import cffi

    ffi = cffi.FFI()
    ffi.cdef("int getpid(void);")
    libc = ffi.dlopen(None)
    assert libc.getpid() == os.getpid()
    assert _cffi_backend.__version__ == cffi.__version__


def _events(vcpu: int) -> arm64.VcpuEvents:
    buf = bytearray(arm64.VcpuEvents.SIZE)
    ioctl_buf(vcpu, api.KVM_GET_VCPU_EVENTS, buf)
    return arm64.VcpuEvents.unpack(bytes(buf))


@pytest.fixture
def vcpu(kvm_fd: int) -> Iterator[Tuple[int, int]]:
    """(vm fd, vcpu fd) of a fresh VM whose vCPU 0 is created but not yet initialised."""
    vm = ioctl_int(kvm_fd, api.KVM_CREATE_VM, 0)
    try:
        cpu = ioctl_int(vm, api.KVM_CREATE_VCPU, 0)
        try:
            yield vm, cpu
        finally:
            os.close(cpu)
    finally:
        os.close(vm)


def _init(vm: int, cpu: int) -> None:
    target = bytearray(arm64.VcpuInit.SIZE)
    ioctl_buf(vm, arm64.KVM_ARM_PREFERRED_TARGET, target)
    init = arm64.VcpuInit.unpack(bytes(target)).with_feature(arm64.KVM_ARM_VCPU_PSCI_0_2)
    ioctl_buf(cpu, arm64.KVM_ARM_VCPU_INIT, bytearray(init.pack()))


def test_vcpu_events_on_an_uninitialised_vcpu(vcpu: Tuple[int, int]) -> None:
    """ENOEXEC on kernels with the stable fix that rejects an uninitialised vCPU
    (backported through the 6.17 stable series: 6.1.192 has it, 6.12.95 does
    not); older kernels answer with a well-formed, nothing-pending struct."""
    _vm, cpu = vcpu
    try:
        events = _events(cpu)
    except OSError as err:
        assert err.errno == errno.ENOEXEC
        return
    assert (events.serror_pending, events.ext_dabt_pending) == (0, 0)
    assert events.pad == bytes(5) and events.reserved == bytes(48)


def test_vcpu_events_after_init(vcpu: Tuple[int, int], lab: env.LabConfig) -> None:
    vm, cpu = vcpu
    _init(vm, cpu)
    buf = bytearray(arm64.VcpuEvents.SIZE)
    assert ioctl_buf(cpu, api.KVM_GET_VCPU_EVENTS, buf) == 0
    events = arm64.VcpuEvents.unpack(bytes(buf))
    assert events.serror_pending == 0
    assert events.ext_dabt_pending == 0
    assert events.serror_has_esr == (1 if lab.expect_ras else 0)
    assert events.pad == bytes(5) and events.reserved == bytes(48)


def test_set_serror_with_esr(vcpu: Tuple[int, int], lab: env.LabConfig) -> None:
    """RAS host: the ESR is kept while pending. No RAS: has_esr is refused (EINVAL)."""
    vm, cpu = vcpu
    _init(vm, cpu)
    request = bytearray(arm64.VcpuEvents.serror(ISS_CE).pack())
    if not lab.expect_ras:
        with pytest.raises(OSError) as err:
            ioctl_buf(cpu, api.KVM_SET_VCPU_EVENTS, request)
        assert err.value.errno == errno.EINVAL
        assert _events(cpu).serror_pending == 0
        return
    ioctl_buf(cpu, api.KVM_SET_VCPU_EVENTS, request)
    events = _events(cpu)
    # the vCPU never ran, so nothing could take the SError yet
    assert (events.serror_pending, events.serror_has_esr, events.serror_esr) == (1, 1, ISS_CE)


def test_set_serror_without_esr(vcpu: Tuple[int, int], lab: env.LabConfig) -> None:
    vm, cpu = vcpu
    _init(vm, cpu)
    ioctl_buf(cpu, api.KVM_SET_VCPU_EVENTS, bytearray(arm64.VcpuEvents.serror(None).pack()))
    events = _events(cpu)
    assert events.serror_pending == 1
    if lab.expect_ras:
        # KVM's implementation-defined syndrome: IDS set (BRIEF section 2)
        assert events.serror_esr == 0x1000000
