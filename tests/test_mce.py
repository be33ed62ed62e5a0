"""serrinj.codec.mce: the machine-check codec, presets, validation and KVM's verdict.

The pure tests check the codec against the Intel SDM layout and QEMU's
injection values. The ``kvm`` tests hold :func:`serrinj.codec.mce.predict` against
the real KVM on this machine: a tiny real-mode guest, created by this process
(KVM_X86_SET_MCE must come from the VM's owner), reports through port 0x10
whether it took the #MC, carried on, or was shut down by a triple fault.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import struct
from typing import Any, Callable, Dict, Iterator, List, Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from serrinj import _native
from serrinj.codec import mce
from serrinj.errors import InvalidInput
from serrinj.kvm import api, x86_64
from serrinj.kvm.ioctl import _IOW, _IOWR
from serrinj.kvm.x86_64 import (
    MCG_STATUS_EIPV,
    MCG_STATUS_MCIP,
    MCG_STATUS_RIPV,
    MCI_STATUS_AR,
    MCI_STATUS_MISCV,
    MCI_STATUS_OVER,
    MCI_STATUS_PCC,
    MCI_STATUS_S,
    MCI_STATUS_UC,
    MCI_STATUS_VAL,
    Mce,
)

U64 = (1 << 64) - 1

# --------------------------------------------------------------------------- decoding


def test_decode_qemu_srar_status() -> None:
    # what QEMU injects for BUS_MCEERR_AR (target/i386/kvm/kvm.c), with a model-specific code
    st_ = mce.decode_status(0xBD80000000100134)
    assert st_.val and st_.uc and st_.en and st_.miscv and st_.addrv and st_.s and st_.ar
    assert not st_.over and not st_.pcc
    assert st_.mca_error_code == 0x134
    assert st_.model_specific_code == 0x10
    assert st_.error_class == "srar"
    assert st_.flags == ("VAL", "UC", "EN", "MISCV", "ADDRV", "S", "AR")
    assert st_.error_code_description == "SRAR data load error"


@given(st.integers(0, U64))
def test_status_decode_encode_round_trip(value: int) -> None:
    d = mce.decode_status(value)
    flags = [name for name in mce.STATUS_BITS if getattr(d, name)]
    again = mce.encode_status(
        *flags,
        mca_error_code=d.mca_error_code,
        model_specific_code=d.model_specific_code,
        other_info=d.other_info,
        corrected_count=d.corrected_count,
        threshold_status=d.threshold_status,
    )
    assert again == value


@given(
    st.lists(st.sampled_from(sorted(mce.STATUS_BITS)), unique=True),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.integers(0, 0x3F),
    st.integers(0, 0x7FFF),
    st.integers(0, 3),
)
def test_status_encode_decode_encode(
    flags: List[str], code: int, mscod: int, other: int, cec: int, thr: int
) -> None:
    value = mce.encode_status(
        *flags,
        mca_error_code=code,
        model_specific_code=mscod,
        other_info=other,
        corrected_count=cec,
        threshold_status=thr,
    )
    d = mce.decode_status(value)
    assert {n for n in mce.STATUS_BITS if getattr(d, n)} == set(flags)
    assert (d.mca_error_code, d.model_specific_code) == (code, mscod)
    assert (d.other_info, d.corrected_count, d.threshold_status) == (other, cec, thr)


def test_encode_status_errors() -> None:
    with pytest.raises(InvalidInput, match="unknown MCi_STATUS flag"):
        mce.encode_status("val", "bogus")
    with pytest.raises(InvalidInput, match="16 bits"):
        mce.encode_status("val", mca_error_code=0x10000)
    with pytest.raises(InvalidInput, match="2 bits"):
        mce.encode_status("val", threshold_status=4)
    assert mce.encode_status("VAL", "Uc") == MCI_STATUS_VAL | MCI_STATUS_UC


def test_parse_value_takes_numbers_or_flag_names() -> None:
    bits = mce.STATUS_BITS
    assert mce.parse_value(None, "--status", bits) is None
    assert mce.parse_value("val,uc,en", "--status", bits) == mce.encode_status("val", "uc", "en")
    assert mce.parse_value(" VAL , Pcc ,", "--status", bits) == MCI_STATUS_VAL | mce.MCI_STATUS_PCC
    assert mce.parse_value("0xbd000000000000c0", "--status", bits) == 0xBD000000000000C0
    assert mce.parse_value("0b101", "--mcg-status", mce.MCG_STATUS_BITS) == 5
    assert mce.parse_value("7", "--mcg-status", mce.MCG_STATUS_BITS) == 7
    assert (
        mce.parse_value("mcip,ripv", "--mcg-status", mce.MCG_STATUS_BITS)
        == MCG_STATUS_MCIP | MCG_STATUS_RIPV
    )
    with pytest.raises(InvalidInput) as err:
        mce.parse_value("val,bogus,uc,nope", "--status", bits)
    assert err.value.message == "--status: unknown flags 'bogus', 'nope'"
    assert err.value.hint == f"flags: {', '.join(bits)}; or give a number"
    with pytest.raises(InvalidInput, match=r"--status: .*negative"):
        mce.parse_value("-1", "--status", bits)
    with pytest.raises(InvalidInput, match=r"--addr: .*not a number"):
        mce.parse_value("0xfoo", "--addr", bits)
    with pytest.raises(InvalidInput, match="wider than 64 bits"):
        mce.parse_value("0x1" + "0" * 16, "--status", bits)


@given(st.integers(0, 15))
def test_mcg_status_round_trip(value: int) -> None:
    d = mce.decode_mcg_status(value)
    bits = {"ripv": 1, "eipv": 2, "mcip": 4, "lmce_s": 8}
    assert sum(bit for name, bit in bits.items() if getattr(d, name)) == value
    assert d.as_dict()["flags"] == [n.upper() for n, b in bits.items() if value & b]


def test_mcg_cap_as_measured_here() -> None:
    # KVM_X86_GET_MCE_CAP_SUPPORTED returned 0x1000100 on this machine (BRIEF section 8)
    cap = mce.decode_mcg_cap(0x1000100)
    assert cap.ctl_p and cap.ser_p
    assert not (cap.cmci_p or cap.tes_p or cap.lmce_p or cap.ext_p or cap.elog_p)
    assert cap.count == 0
    qemu = mce.decode_mcg_cap(0x1000100 | 10)
    assert qemu.count == 10
    lmce = mce.decode_mcg_cap((1 << 27) | (1 << 10) | (3 << 16) | (1 << 9))
    assert lmce.lmce_p and lmce.cmci_p and lmce.ext_p and lmce.ext_cnt == 3


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (0, "invalid"),
        (MCI_STATUS_VAL, "corrected"),
        (MCI_STATUS_VAL | MCI_STATUS_UC, "ucna"),
        (MCI_STATUS_VAL | MCI_STATUS_UC | MCI_STATUS_S, "srao"),
        (MCI_STATUS_VAL | MCI_STATUS_UC | MCI_STATUS_S | MCI_STATUS_AR, "srar"),
        (MCI_STATUS_VAL | MCI_STATUS_UC | MCI_STATUS_AR, "reserved"),
        (MCI_STATUS_VAL | MCI_STATUS_UC | MCI_STATUS_PCC | MCI_STATUS_S, "uc-fatal"),
        (MCI_STATUS_VAL | MCI_STATUS_PCC, "corrected"),
    ],
)
def test_classify(status: int, cls: str) -> None:
    assert mce.classify(status) == cls
    assert cls in mce.CLASS_DESCRIPTIONS


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (0x0000, "no error"),
        (0x0005, "internal parity error"),
        (0x0400, "internal timer error"),
        (0x0E0B, "I/O error"),
        (0x0134, "SRAR data load error"),
        (0x0150, "SRAR instruction fetch error"),
        (0x017A, "SRAO L3 explicit writeback error"),
        (0x009F, "memory controller: memory read error, unspecified channel"),
        (0x00C3, "memory controller: memory scrubbing error, channel 3"),
        (0x0011, "TLB: L1 instruction TLB error"),
        (0x000E, "generic cache hierarchy error, L2"),
        (0x1124, "cache hierarchy: write error in L0 data cache (filtered)"),
        (0x0A0F, "bus/interconnect: generic other transaction, request answered by this "
                 "processor, generic level"),
        (0x0405, "internal unclassified error"),
        (0x8000, "reserved or model-specific error code"),
    ],
)  # fmt: skip
def test_describe_error_code(code: int, text: str) -> None:
    assert mce.describe_error_code(code) == text


# --------------------------------------------------------------------------- presets

# QEMU's kvm_mce_inject() for a host memory error (target/i386/kvm/kvm.c)
QEMU_SRAR = 0xBD80000000000134
QEMU_SRAO = 0xBD000000000000C0


def test_presets_match_qemu() -> None:
    assert mce.PRESETS["srar"].status == QEMU_SRAR
    assert mce.PRESETS["srar"].mcg_status == MCG_STATUS_MCIP | MCG_STATUS_RIPV | MCG_STATUS_EIPV
    assert mce.PRESETS["srao"].status == QEMU_SRAO
    assert mce.PRESETS["srao"].mcg_status == MCG_STATUS_MCIP | MCG_STATUS_RIPV
    assert mce.PRESETS["srar"].misc == mce.PRESETS["srao"].misc == 0x8C


@pytest.mark.parametrize("name", sorted(mce.PRESETS))
def test_preset_is_consistent(name: str) -> None:
    p = mce.PRESETS[name]
    assert p.status & MCI_STATUS_VAL and mce.decode_status(p.status).en
    assert mce.classify(p.status) == name
    uc = bool(p.status & MCI_STATUS_UC)
    if name in ("corrected", "ucna"):
        # a corrected error sets no MCG_STATUS; KVM's UCNA test needs it to be 0
        assert p.mcg_status == 0
        assert not p.raises_mc
    else:
        assert uc and p.raises_mc
        assert p.mcg_status & MCG_STATUS_MCIP
        assert p.mcg_status & (MCG_STATUS_RIPV | MCG_STATUS_EIPV)
    if p.status & MCI_STATUS_MISCV:
        assert p.misc
    effect = mce.predict(p.build(1, addr=0x1234000), bank_count=10)
    assert effect.raises_mc is p.raises_mc


def test_preset_build_and_lookup() -> None:
    m = mce.preset(" SRAR ").build(3, addr=0x7F000)
    assert m == Mce(status=QEMU_SRAR, bank=3, addr=0x7F000, misc=0x8C, mcg_status=7)
    assert mce.preset("uncorrected") is mce.PRESETS["uc-fatal"]
    assert mce.preset("ce") is mce.PRESETS["corrected"]
    assert mce.PRESETS["uc-fatal"].status & MCI_STATUS_PCC
    with pytest.raises(InvalidInput, match="unknown machine-check preset"):
        mce.preset("nope")
    d = mce.PRESETS["srao"].as_dict()
    assert json.loads(json.dumps(d)) == d


# --------------------------------------------------------------------------- validation


@given(st.integers(0, U64), st.integers(0, 255), st.integers(0, 32))
def test_validate_accepts_exactly_what_kvm_accepts(status: int, bank: int, count: int) -> None:
    m = Mce(status=status, bank=bank)
    if status & MCI_STATUS_VAL and bank < count:
        assert mce.validate(m, count) is m
    else:
        with pytest.raises(InvalidInput, match="EINVAL"):
            mce.validate(m, count)


def test_validate_messages() -> None:
    with pytest.raises(InvalidInput, match=r"lacks VAL \(bit 63\)") as info:
        mce.validate(Mce(status=0x3C0000000000009F, bank=0), 10)
    assert info.value.hint == "did you mean 0xbc0000000000009f?"
    with pytest.raises(
        InvalidInput, match=r"bank 10 does not exist: the vCPU has 10 bank\(s\) \(0..9\)"
    ):
        mce.validate(Mce(status=MCI_STATUS_VAL, bank=10), 10)
    with pytest.raises(InvalidInput, match="64-bit"):
        mce.validate(Mce(status=MCI_STATUS_VAL, bank=0, addr=1 << 64), 10)
    with pytest.raises(InvalidInput, match="byte"):
        mce.validate(Mce(status=MCI_STATUS_VAL, bank=300), 400)


# --------------------------------------------------------------------------- prediction (pure)

SRAR = mce.PRESETS["srar"].build(1)
CE = mce.PRESETS["corrected"].build(1)
UCNA = mce.PRESETS["ucna"].build(1)
HEALTHY = mce.GuestMceState(
    cr4_mce=True, mcip=False, mcg_ctl_all_ones=True, mci_ctl_all_ones=True, bank_status=0
)


def test_predict_uc_on_healthy_guest() -> None:
    e = mce.predict(SRAR, bank_count=10, state=HEALTHY)
    assert e.outcome == "machine-check" and e.raises_mc
    assert e.status_written == SRAR.status
    assert not any("dropped" in c or "triple" in c for c in e.caveats)
    assert e.as_dict()["vector"] == 18


def test_predict_unknown_state_lists_caveats() -> None:
    e = mce.predict(SRAR, bank_count=10)
    assert e.outcome == "machine-check"
    text = " ".join(e.caveats)
    assert "MCG_CTL" in text and "MC1_CTL" in text and "CR4.MCE" in text and "MCIP" in text


@pytest.mark.parametrize(
    ("change", "outcome"),
    [
        ({"mcg_ctl_all_ones": False}, "dropped"),
        ({"mci_ctl_all_ones": False}, "dropped"),
        ({"cr4_mce": False}, "triple-fault"),
        ({"mcip": True}, "triple-fault"),
        # KVM checks the CTLs before CR4.MCE
        ({"mcg_ctl_all_ones": False, "cr4_mce": False}, "dropped"),
        # without MCG_CAP.CTL_P, MCG_CTL is not consulted
        ({"mcg_ctl_all_ones": False, "mcg_cap": 0x1000000 | 10}, "machine-check"),
    ],
)
def test_predict_uc_states(change: Dict[str, Any], outcome: str) -> None:
    state = dataclasses.replace(HEALTHY, **change)
    e = mce.predict(SRAR, bank_count=10, state=state)
    assert e.outcome == outcome
    assert e.raises_mc is (outcome == "machine-check")
    # a corrected error never depends on these
    assert mce.predict(CE, bank_count=10, state=state).outcome == "logged"


def test_predict_over_and_overflow() -> None:
    corrected_in_bank = dataclasses.replace(HEALTHY, bank_status=CE.status)
    assert mce.predict(SRAR, bank_count=10, state=corrected_in_bank).status_written == (
        SRAR.status | MCI_STATUS_OVER
    )
    e = mce.predict(CE, bank_count=10, state=corrected_in_bank)
    assert e.outcome == "logged" and e.status_written == CE.status | MCI_STATUS_OVER
    uc_in_bank = dataclasses.replace(HEALTHY, bank_status=SRAR.status)
    e = mce.predict(CE, bank_count=10, state=uc_in_bank)
    assert e.outcome == "overflow" and e.status_written == SRAR.status | MCI_STATUS_OVER


def test_predict_ucna() -> None:
    assert mce.is_ucna(UCNA)
    assert not mce.is_ucna(UCNA._replace(mcg_status=MCG_STATUS_MCIP))
    bad_ctl = dataclasses.replace(HEALTHY, mcg_ctl_all_ones=False, cr4_mce=False)
    e = mce.predict(UCNA, bank_count=10, state=bad_ctl)
    assert e.outcome == "logged" and not e.raises_mc  # the UCNA path skips those checks
    old = mce.predict(UCNA, bank_count=10, state=HEALTHY, ucna_path=False)
    assert old.outcome == "machine-check"
    no_cmci = mce.predict(UCNA, bank_count=10, state=dataclasses.replace(HEALTHY, mcg_cap=10))
    assert "no CMCI" in no_cmci.reason


def test_predict_validates() -> None:
    with pytest.raises(InvalidInput):
        mce.predict(Mce(status=MCI_STATUS_UC, bank=0), bank_count=10)
    with pytest.raises(InvalidInput):
        mce.predict(SRAR, bank_count=1)


def test_linux_notes() -> None:
    assert mce.linux_notes(SRAR.status, SRAR.mcg_status) == (
        "SRAR: a Linux guest kills the interrupted user task with SIGBUS; in the kernel it "
        "panics unless the access had a recovery fixup",
    )
    no_mcip = mce.linux_notes(SRAR.status, MCG_STATUS_RIPV)
    assert any("MCIP not set in MCA handler" in n for n in no_mcip)
    fatal = mce.linux_notes(mce.PRESETS["uc-fatal"].status, MCG_STATUS_MCIP)
    assert any("Processor context corrupt" in n for n in fatal)
    assert any("Neither restart nor error IP" in n for n in fatal)


def test_state_from_registers() -> None:
    msrs = {
        0x179: 0x1000100 | 10,
        0x17A: MCG_STATUS_MCIP,
        0x17B: U64,
        0x404: 0,
        0x405: SRAR.status,
    }
    state = mce.GuestMceState.from_registers(bank=1, msrs=msrs, cr4=x86_64.CR4_MCE)
    assert state == mce.GuestMceState(
        cr4_mce=True,
        mcip=True,
        mcg_ctl_all_ones=True,
        mci_ctl_all_ones=False,
        bank_status=SRAR.status,
        mcg_cap=0x1000100 | 10,
    )
    assert mce.state_msrs(1) == (0x179, 0x17A, 0x17B, 0x404, 0x405)
    assert mce.GuestMceState.from_registers(bank=1, msrs={}) == mce.GuestMceState()


def test_as_dicts_are_json() -> None:
    for obj in (
        mce.decode_status(QEMU_SRAR),
        mce.decode_mcg_status(7),
        mce.decode_mcg_cap(0x1000100),
        mce.predict(SRAR, bank_count=10),
    ):
        d = obj.as_dict()
        assert json.loads(json.dumps(d)) == d
    assert mce.decode_status(QEMU_SRAR).as_dict()["class"] == "srar"


# --------------------------------------------------------------------------- real KVM

KVM_SET_MSRS = _IOW(api.KVMIO, 0x89, 8)
KVM_GET_MSRS = _IOWR(api.KVMIO, 0x88, 8)
GUEST_CODE = 0x1000
MC_HANDLER = 0x2000
REPORT_PORT = 0x10
READY, CARRIED_ON, TOOK_MC = 1, 2, 0x12

# 16-bit real mode: report READY once, then CARRIED_ON forever (jmp back over 6 bytes)
_MAIN = bytes([0xB0, READY, 0xE6, REPORT_PORT, 0xB0, CARRIED_ON, 0xE6, REPORT_PORT, 0xEB, 0xFA])
# the #MC handler (IVT vector 18): report TOOK_MC and halt
_HANDLER = bytes([0xB0, TOOK_MC, 0xE6, REPORT_PORT, 0xF4])


class RealModeVm:
    """A one-vCPU VM owned by this process, running the two snippets above."""

    def __init__(self, *, cr4_mce: bool = True, banks: int = 10) -> None:
        self._fds: List[int] = []
        self._maps: List[_native.Memory] = []
        try:
            self._setup(cr4_mce, banks)
        except BaseException:
            self.close()
            raise

    def _fd(self, fd: int) -> int:
        self._fds.append(fd)
        return fd

    def _setup(self, cr4_mce: bool, banks: int) -> None:
        self.kvm = self._fd(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
        self.vm = self._fd(_native.ioctl_int(self.kvm, api.KVM_CREATE_VM, 0))
        _native.ioctl_int(self.vm, x86_64.KVM_SET_TSS_ADDR, 0xFFFBD000)
        ram = _native.mmap(0x10000)
        self._maps.append(ram)
        ram.view[GUEST_CODE : GUEST_CODE + len(_MAIN)] = _MAIN
        ram.view[MC_HANDLER : MC_HANDLER + len(_HANDLER)] = _HANDLER
        ram.view[18 * 4 : 18 * 4 + 4] = struct.pack("<HH", MC_HANDLER, 0)
        region = api.UserspaceMemoryRegion(0, 0, 0x10000, ram.address).pack()
        _native.ioctl_buf(self.vm, api.KVM_SET_USER_MEMORY_REGION, bytearray(region))
        self.vcpu = self._fd(_native.ioctl_int(self.vm, api.KVM_CREATE_VCPU, 0))
        size = _native.ioctl_int(self.kvm, api.KVM_GET_VCPU_MMAP_SIZE, 0)
        self.run_page = _native.mmap(size, self.vcpu)
        self._maps.append(self.run_page)

        supported = bytearray(8)
        _native.ioctl_buf(self.kvm, x86_64.KVM_X86_GET_MCE_CAP_SUPPORTED, supported)
        cap = int.from_bytes(supported, "little") & (x86_64.MCG_CTL_P | x86_64.MCG_SER_P)
        self.mcg_cap = cap | banks
        self.banks = banks
        setup = bytearray(struct.pack("<Q", self.mcg_cap))
        _native.ioctl_buf(self.vcpu, x86_64.KVM_X86_SETUP_MCE, setup)

        sregs = bytearray(x86_64.SIZEOF_KVM_SREGS)
        _native.ioctl_buf(self.vcpu, x86_64.KVM_GET_SREGS, sregs)
        cs = x86_64.sregs_get_segment(bytes(sregs), "cs")
        x86_64.sregs_set_segment(sregs, "cs", dataclasses.replace(cs, base=0, selector=0))
        cr4 = x86_64.sregs_get_control(bytes(sregs), "cr4")
        cr4 = cr4 | x86_64.CR4_MCE if cr4_mce else cr4 & ~x86_64.CR4_MCE
        x86_64.sregs_set_control(sregs, "cr4", cr4)
        _native.ioctl_buf(self.vcpu, x86_64.KVM_SET_SREGS, sregs)
        regs = x86_64.pack_regs({"rip": GUEST_CODE, "rflags": 0x2, "rsp": 0x8000})
        _native.ioctl_buf(self.vcpu, x86_64.KVM_SET_REGS, bytearray(regs))

    def close(self) -> None:
        for m in reversed(self._maps):
            m.close()
        for fd in reversed(self._fds):
            os.close(fd)
        self._maps.clear()
        self._fds.clear()

    def run(self) -> str:
        """Run to the next exit: ``"report:<n>"``, ``"hlt"`` or ``"shutdown"``."""
        _native.ioctl_int(self.vcpu, api.KVM_RUN, 0)
        run = bytes(self.run_page.view)
        reason = api.exit_reason_of(run)
        if reason == api.KVM_EXIT_IO:
            io = api.ExitIo.unpack_from(run)
            assert io.port == REPORT_PORT and io.direction == api.KVM_EXIT_IO_OUT
            return f"report:{run[io.data_offset]}"
        if reason == api.KVM_EXIT_HLT:
            return "hlt"
        if reason == api.KVM_EXIT_SHUTDOWN:
            return "shutdown"
        raise AssertionError(f"unexpected exit {api.EXIT_REASON_NAMES.get(reason, reason)}")

    def set_mce(self, m: Mce) -> None:
        _native.ioctl_buf(self.vcpu, x86_64.KVM_X86_SET_MCE, bytearray(m.pack()))

    def get_msrs(self, indices: Sequence[int]) -> Dict[int, int]:
        buf = bytearray(struct.pack("<II", len(indices), 0))
        for index in indices:
            buf += struct.pack("<IIQ", index, 0, 0)
        n = _native.ioctl_buf(self.vcpu, KVM_GET_MSRS, buf)
        assert n == len(indices)
        return {
            struct.unpack_from("<I", buf, 8 + 16 * k)[0]: struct.unpack_from(
                "<Q", buf, 16 + 16 * k
            )[0]
            for k in range(n)
        }

    def set_msr(self, index: int, value: int) -> None:
        buf = bytearray(struct.pack("<IIIIQ", 1, 0, index, 0, value))
        assert _native.ioctl_buf(self.vcpu, KVM_SET_MSRS, buf) == 1

    def state(self, bank: int) -> mce.GuestMceState:
        sregs = bytearray(x86_64.SIZEOF_KVM_SREGS)
        _native.ioctl_buf(self.vcpu, x86_64.KVM_GET_SREGS, sregs)
        cr4 = x86_64.sregs_get_control(bytes(sregs), "cr4")
        return mce.GuestMceState.from_registers(
            bank=bank, msrs=self.get_msrs(mce.state_msrs(bank)), cr4=cr4
        )

    def bank_status(self, bank: int) -> int:
        index = x86_64.mci_msr(bank, "status")
        return self.get_msrs([index])[index]


@pytest.fixture
def make_vm() -> Iterator[Callable[..., RealModeVm]]:
    vms: List[RealModeVm] = []

    def make(**kwargs: object) -> RealModeVm:
        vm = RealModeVm(**kwargs)  # type: ignore[arg-type]
        vms.append(vm)
        return vm

    try:
        yield make
    finally:
        for vm in vms:
            vm.close()


# what the guest reports for each predicted outcome
OBSERVED = {
    "machine-check": f"report:{TOOK_MC}",
    "logged": f"report:{CARRIED_ON}",
    "overflow": f"report:{CARRIED_ON}",
    "dropped": f"report:{CARRIED_ON}",
    "triple-fault": "shutdown",
}


def inject_and_compare(vm: RealModeVm, m: Mce) -> mce.MceEffect:
    """Predict from the vCPU's real state, inject, and check the guest agrees."""
    before = vm.bank_status(m.bank)
    state = vm.state(m.bank)
    effect = mce.predict(m, bank_count=vm.banks, state=state)
    # the state was read from the vCPU, so nothing is left to chance
    unknowns = ("dropped silently if", "a triple fault if", "OVER is added if", "if the bank")
    assert not [c for c in effect.caveats if c.startswith(unknowns)], effect.caveats
    vm.set_mce(m)
    assert vm.run() == OBSERVED[effect.outcome], effect
    if effect.outcome != "triple-fault":
        expected = before if effect.status_written is None else effect.status_written
        assert vm.bank_status(m.bank) == expected
    return effect


@pytest.mark.kvm
def test_kvm_refuses_what_validate_refuses(make_vm: Callable[..., RealModeVm]) -> None:
    vm = make_vm()
    assert vm.run() == f"report:{READY}"
    for bad in (
        Mce(status=SRAR.status & ~MCI_STATUS_VAL, bank=1),
        SRAR._replace(bank=vm.banks),
    ):
        with pytest.raises(InvalidInput):
            mce.validate(bad, vm.banks)
        with pytest.raises(OSError) as info:
            vm.set_mce(bad)
        assert info.value.errno == errno.EINVAL
    # the highest bank is accepted
    last = CE._replace(bank=vm.banks - 1)
    assert mce.validate(last, vm.banks) is last
    inject_and_compare(vm, last)


@pytest.mark.kvm
@pytest.mark.parametrize("name", sorted(mce.PRESETS))
def test_kvm_agrees_with_presets(make_vm: Callable[..., RealModeVm], name: str) -> None:
    vm = make_vm()
    assert vm.run() == f"report:{READY}"
    p = mce.PRESETS[name]
    effect = inject_and_compare(vm, p.build(1, addr=0x5000))
    assert effect.raises_mc is p.raises_mc
    if p.raises_mc:
        # KVM wrote the preset's MCG_STATUS for the guest's handler to read
        assert vm.get_msrs([0x17A])[0x17A] == p.mcg_status


@pytest.mark.kvm
def test_kvm_triple_fault_without_cr4_mce(make_vm: Callable[..., RealModeVm]) -> None:
    vm = make_vm(cr4_mce=False)
    assert vm.run() == f"report:{READY}"
    assert inject_and_compare(vm, SRAR).outcome == "triple-fault"


@pytest.mark.kvm
def test_kvm_triple_fault_while_mcip(make_vm: Callable[..., RealModeVm]) -> None:
    vm = make_vm()
    assert vm.run() == f"report:{READY}"
    assert inject_and_compare(vm, SRAR).outcome == "machine-check"
    # the handler never clears MCG_STATUS.MCIP, so a second UC error is fatal
    assert vm.state(1).mcip is True
    assert inject_and_compare(vm, SRAR._replace(bank=2)).outcome == "triple-fault"


@pytest.mark.kvm
@pytest.mark.parametrize("msr", ["mcg_ctl", "mci_ctl"])
def test_kvm_drops_uc_when_ctl_cleared(make_vm: Callable[..., RealModeVm], msr: str) -> None:
    vm = make_vm()
    vm.set_msr(0x17B if msr == "mcg_ctl" else x86_64.mci_msr(1, "ctl"), 0)
    assert vm.run() == f"report:{READY}"
    assert inject_and_compare(vm, SRAR).outcome == "dropped"


@pytest.mark.kvm
def test_kvm_overflow_keeps_the_uncorrected_error(make_vm: Callable[..., RealModeVm]) -> None:
    vm = make_vm()
    assert vm.run() == f"report:{READY}"
    # a UCNA leaves an uncorrected error in the bank without any exception
    assert inject_and_compare(vm, UCNA).outcome == "logged"
    assert vm.bank_status(1) == UCNA.status
    effect = inject_and_compare(vm, CE)
    assert effect.outcome == "overflow"
    assert vm.bank_status(1) == UCNA.status | MCI_STATUS_OVER


@pytest.mark.kvm
def test_kvm_sets_over_on_a_second_corrected_error(make_vm: Callable[..., RealModeVm]) -> None:
    vm = make_vm()
    assert vm.run() == f"report:{READY}"
    inject_and_compare(vm, CE)
    second = CE._replace(status=CE.status | 0x10000)
    effect = inject_and_compare(vm, second)
    assert effect.outcome == "logged"
    assert vm.bank_status(1) == second.status | MCI_STATUS_OVER
