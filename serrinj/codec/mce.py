"""x86 machine-check codec: MCi_STATUS / MCG_STATUS / MCG_CAP, presets, KVM's verdict.

Pure code: no I/O, no click, no rich. The bit layouts follow the Intel SDM
(vol. 3B, chapter 16 "Machine-Check Architecture")::

    MCi_STATUS  63 VAL  62 OVER  61 UC  60 EN  59 MISCV  58 ADDRV  57 PCC
                56 S    55 AR    54:53 threshold status (MCG_CAP.TES_P)
                52:38 corrected error count (MCG_CAP.CMCI_P)
                37:32 other information   31:16 model-specific code
                15:0  MCA error code
    MCG_STATUS  0 RIPV  1 EIPV  2 MCIP  3 LMCE_S

How KVM_X86_SET_MCE treats an error (arch/x86/kvm/x86.c, BRIEF section 4), in order:

1. ``bank >= MCG_CAP.Count`` or no VAL: EINVAL.
2. UCNA (UC, none of PCC/S/AR, and MCG_STATUS 0): since Linux 6.0 the bank is
   written and, if the guest enabled CMCI for the bank, a CMCI is sent; no #MC.
3. Other UC errors: dropped *silently* when MCG_CTL (if MCG_CAP.CTL_P) or the
   bank's MCi_CTL is not all ones; a *triple fault* when the guest has CR4.MCE
   clear or MCG_STATUS.MCIP already set; otherwise the bank and MCG_STATUS are
   written (OVER added if the bank was valid) and #MC (vector 18) is queued.
4. Corrected errors: the bank is written (OVER added if it held a corrected
   error) unless it holds an uncorrected one, which then only gains OVER. No
   exception: the guest sees the error when it polls the bank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Dict, List, Mapping, Optional, Tuple

from serrinj.codec.numbers import parse_int
from serrinj.errors import InvalidInput
from serrinj.kvm.x86_64 import (
    CR4_MCE,
    MC_VECTOR,
    MCG_CAP_COUNT_MASK,
    MCG_CTL_P,
    MCG_SER_P,
    MCG_STATUS_EIPV,
    MCG_STATUS_MCIP,
    MCG_STATUS_RIPV,
    MCI_STATUS_ADDRV,
    MCI_STATUS_AR,
    MCI_STATUS_EN,
    MCI_STATUS_MISCV,
    MCI_STATUS_OVER,
    MCI_STATUS_PCC,
    MCI_STATUS_S,
    MCI_STATUS_UC,
    MCI_STATUS_VAL,
    MSR_IA32_MCG_CAP,
    MSR_IA32_MCG_CTL,
    MSR_IA32_MCG_STATUS,
    Mce,
    mci_msr,
)

U64_MASK = (1 << 64) - 1

MCG_STATUS_LMCE_S = 1 << 3
MCG_EXT_P = 1 << 9
MCG_CMCI_P = 1 << 10
MCG_TES_P = 1 << 11
MCG_EXT_CNT_SHIFT = 16
MCG_ELOG_P = 1 << 26
MCG_LMCE_P = 1 << 27

MCI_STATUS_MCACOD_MASK = 0xFFFF
MCI_STATUS_MSCOD_SHIFT = 16
MCI_STATUS_MSCOD_MASK = 0xFFFF << MCI_STATUS_MSCOD_SHIFT
MCI_STATUS_OTHER_SHIFT = 32
MCI_STATUS_CEC_SHIFT = 38
MCI_STATUS_CEC_MASK = 0x7FFF << MCI_STATUS_CEC_SHIFT
MCI_STATUS_THRESHOLD_SHIFT = 53
MCI_STATUS_THRESHOLD_MASK = 0x3 << MCI_STATUS_THRESHOLD_SHIFT

#: MCi_MISC for a physical address with page (4 KiB) granularity:
#: address mode 2 (physical) in bits [8:6], recoverable-address LSB 12 in [5:0]
MISC_PHYS_PAGE = (2 << 6) | 12

STATUS_BITS: Mapping[str, int] = MappingProxyType(
    {
        "val": MCI_STATUS_VAL,
        "over": MCI_STATUS_OVER,
        "uc": MCI_STATUS_UC,
        "en": MCI_STATUS_EN,
        "miscv": MCI_STATUS_MISCV,
        "addrv": MCI_STATUS_ADDRV,
        "pcc": MCI_STATUS_PCC,
        "s": MCI_STATUS_S,
        "ar": MCI_STATUS_AR,
    }
)
MCG_STATUS_BITS: Mapping[str, int] = MappingProxyType(
    {
        "ripv": MCG_STATUS_RIPV,
        "eipv": MCG_STATUS_EIPV,
        "mcip": MCG_STATUS_MCIP,
        "lmce_s": MCG_STATUS_LMCE_S,
    }
)


def parse_value(text: Optional[str], what: str, names: Mapping[str, int]) -> Optional[int]:
    """A register value as a user types it: a number, or flag names joined by commas.

    ``"val,uc,en"`` is the OR of those bits of ``names`` (case-insensitive);
    anything else is read by :func:`serrinj.codec.numbers.parse_int` as a 64-bit number.
    Text with a letter that is neither a flag name nor part of a 0x/0b/0o
    number is refused, naming the unknown flags. ``None`` (not given) stays ``None``.
    The command line and campaign files both read MCi_STATUS and MCG_STATUS here.
    """
    if text is None:
        return None
    words = [w.strip().lower() for w in text.split(",") if w.strip()]
    if words and all(w in names for w in words):
        value = 0
        for w in words:
            value |= names[w]
        return value
    if any(ch.isalpha() for ch in text) and not text.strip().lower().startswith(("0x", "0b", "0o")):
        unknown = [w for w in words if w not in names]
        at = f"{what}: " if what else ""
        if len(unknown) == 1:
            import difflib  # only for a suggestion: it is slow to import

            close = difflib.get_close_matches(unknown[0], list(names), n=1, cutoff=0.6)
            also = f" (did you mean {close[0]!r}?)" if close else ""
            message = f"{at}unknown flag {unknown[0]!r}{also}"
        else:
            message = f"{at}unknown flags {', '.join(repr(w) for w in unknown)}"
        raise InvalidInput(message, hint=f"flags: {', '.join(names)}; or give a number")
    return parse_int(text, what=what, bits=64)


# --------------------------------------------------------------------------- MCA error codes

_SIMPLE_CODES: Mapping[int, str] = MappingProxyType(
    {
        0x0000: "no error",
        0x0001: "unclassified",
        0x0002: "microcode ROM parity error",
        0x0003: "external error (BINIT# from another processor)",
        0x0004: "functional redundancy check error",
        0x0005: "internal parity error",
        0x0006: "SMM handler code access violation",
        0x0400: "internal timer error",
        0x0E0B: "I/O error",
    }
)
# the codes the SDM names for software-recoverable errors
_RECOVERABLE_CODES: Mapping[int, str] = MappingProxyType(
    {
        0x0134: "SRAR data load error",
        0x0150: "SRAR instruction fetch error",
        0x017A: "SRAO L3 explicit writeback error",
    }
)
_TT = ("instruction", "data", "generic", "reserved")
_LL = ("L0", "L1", "L2", "generic level")
_RRRR = {
    0x0: "generic",
    0x1: "read",
    0x2: "write",
    0x3: "data read",
    0x4: "data write",
    0x5: "instruction fetch",
    0x6: "prefetch",
    0x7: "eviction",
    0x8: "snoop",
}
_MMM = {
    0x0: "generic undefined request",
    0x1: "memory read",
    0x2: "memory write",
    0x3: "address/command",
    0x4: "memory scrubbing",
}
_PP = (
    "request originated by this processor",
    "request answered by this processor",
    "observed as a third party",
    "generic",
)
_II = ("memory access", "reserved", "I/O", "other transaction")


def describe_error_code(code: int) -> str:
    """Describe a 16-bit MCA error code (MCi_STATUS[15:0]) in words.

    Simple codes are named; compound codes (TLB, cache, memory controller, bus)
    are decoded field by field. Bit 12 of a compound code is the corrected-error
    filtering flag.
    """
    code &= MCI_STATUS_MCACOD_MASK
    if code in _SIMPLE_CODES:
        return _SIMPLE_CODES[code]
    if code in _RECOVERABLE_CODES:
        return _RECOVERABLE_CODES[code]
    filtered = bool(code & 0x1000)
    c = code & ~0x1000
    suffix = " (filtered)" if filtered else ""
    if c & 0xF800 == 0x0800:
        pp, t, rrrr, ii, ll = (c >> 9) & 3, (c >> 8) & 1, (c >> 4) & 0xF, (c >> 2) & 3, c & 3
        timeout = ", timeout" if t else ""
        return (
            f"bus/interconnect: {_RRRR.get(rrrr, 'reserved')} {_II[ii]}, "
            f"{_PP[pp]}, {_LL[ll]}{timeout}{suffix}"
        )
    if c & 0xFF00 == 0x0100:
        rrrr, tt, ll = (c >> 4) & 0xF, (c >> 2) & 3, c & 3
        return (
            f"cache hierarchy: {_RRRR.get(rrrr, 'reserved')} error in "
            f"{_LL[ll]} {_TT[tt]} cache{suffix}"
        )
    if c & 0xFF80 == 0x0080:
        mmm, cccc = (c >> 4) & 0x7, c & 0xF
        channel = "unspecified channel" if cccc == 0xF else f"channel {cccc}"
        return f"memory controller: {_MMM.get(mmm, 'reserved')} error, {channel}{suffix}"
    if c & 0xFFF0 == 0x0010:
        tt, ll = (c >> 2) & 3, c & 3
        return f"TLB: {_LL[ll]} {_TT[tt]} TLB error{suffix}"
    if c & 0xFFFC == 0x000C:
        return f"generic cache hierarchy error, {_LL[c & 3]}{suffix}"
    if code & 0xFC00 == 0x0400:
        return "internal unclassified error"
    return "reserved or model-specific error code"


# --------------------------------------------------------------------------- decoding


def classify(status: int) -> str:
    """The SDM's class of an error: ``invalid``, ``corrected``, ``uc-fatal`` (PCC),
    ``ucna``, ``srao``, ``srar``, or ``reserved`` (AR without S)."""
    if not status & MCI_STATUS_VAL:
        return "invalid"
    if not status & MCI_STATUS_UC:
        return "corrected"
    if status & MCI_STATUS_PCC:
        return "uc-fatal"
    s, ar = bool(status & MCI_STATUS_S), bool(status & MCI_STATUS_AR)
    if not s:
        return "reserved" if ar else "ucna"
    return "srar" if ar else "srao"


CLASS_DESCRIPTIONS: Mapping[str, str] = MappingProxyType(
    {
        "invalid": "not valid (VAL clear)",
        "corrected": "corrected error",
        "uc-fatal": "uncorrected, processor context corrupt",
        "ucna": "uncorrected, no action required",
        "srao": "software recoverable, action optional",
        "srar": "software recoverable, action required",
        "reserved": "reserved combination (AR without S)",
    }
)


@dataclass(frozen=True)
class McaStatus:
    """A decoded MCi_STATUS value."""

    value: int
    val: bool
    over: bool
    uc: bool
    en: bool
    miscv: bool
    addrv: bool
    pcc: bool
    s: bool
    ar: bool
    mca_error_code: int
    model_specific_code: int
    other_info: int
    corrected_count: int
    threshold_status: int

    @property
    def error_class(self) -> str:
        return classify(self.value)

    @property
    def error_code_description(self) -> str:
        return describe_error_code(self.mca_error_code)

    @property
    def flags(self) -> Tuple[str, ...]:
        """The names of the set flag bits, most significant first (``VAL``, ``UC``, ...)."""
        return tuple(name.upper() for name, bit in STATUS_BITS.items() if self.value & bit)

    def as_dict(self) -> Dict[str, object]:
        return {
            "value": self.value,
            **{name: bool(self.value & bit) for name, bit in STATUS_BITS.items()},
            "flags": list(self.flags),
            "class": self.error_class,
            "class_description": CLASS_DESCRIPTIONS[self.error_class],
            "mca_error_code": self.mca_error_code,
            "mca_error_code_description": self.error_code_description,
            "model_specific_code": self.model_specific_code,
            "other_info": self.other_info,
            "corrected_count": self.corrected_count,
            "threshold_status": self.threshold_status,
        }


def decode_status(status: int) -> McaStatus:
    """Decode MCi_STATUS. ``corrected_count`` and ``threshold_status`` mean something
    only when MCG_CAP has CMCI_P and TES_P respectively."""
    _check_u64(status, "MCi_STATUS")
    return McaStatus(
        value=status,
        val=bool(status & MCI_STATUS_VAL),
        over=bool(status & MCI_STATUS_OVER),
        uc=bool(status & MCI_STATUS_UC),
        en=bool(status & MCI_STATUS_EN),
        miscv=bool(status & MCI_STATUS_MISCV),
        addrv=bool(status & MCI_STATUS_ADDRV),
        pcc=bool(status & MCI_STATUS_PCC),
        s=bool(status & MCI_STATUS_S),
        ar=bool(status & MCI_STATUS_AR),
        mca_error_code=status & MCI_STATUS_MCACOD_MASK,
        model_specific_code=(status & MCI_STATUS_MSCOD_MASK) >> MCI_STATUS_MSCOD_SHIFT,
        other_info=(status >> MCI_STATUS_OTHER_SHIFT) & 0x3F,
        corrected_count=(status & MCI_STATUS_CEC_MASK) >> MCI_STATUS_CEC_SHIFT,
        threshold_status=(status & MCI_STATUS_THRESHOLD_MASK) >> MCI_STATUS_THRESHOLD_SHIFT,
    )


_STATUS_FIELDS: Tuple[Tuple[str, int, int], ...] = (
    # name, shift, width
    ("mca_error_code", 0, 16),
    ("model_specific_code", MCI_STATUS_MSCOD_SHIFT, 16),
    ("other_info", MCI_STATUS_OTHER_SHIFT, 6),
    ("corrected_count", MCI_STATUS_CEC_SHIFT, 15),
    ("threshold_status", MCI_STATUS_THRESHOLD_SHIFT, 2),
)


def encode_status(
    *flags: str,
    mca_error_code: int = 0,
    model_specific_code: int = 0,
    other_info: int = 0,
    corrected_count: int = 0,
    threshold_status: int = 0,
) -> int:
    """Build MCi_STATUS from flag names (``"val"``, ``"uc"``, ... case-insensitive) and fields.

    ``encode_status("val", "uc", "en", "s", "ar", mca_error_code=0x134)`` is the
    SRAR data-load status. VAL is not added implicitly. Raises
    :class:`InvalidInput` for an unknown flag or a field that does not fit.
    """
    value = 0
    for name in flags:
        key = name.strip().lower()
        if key not in STATUS_BITS:
            raise InvalidInput(
                f"unknown MCi_STATUS flag {name!r}",
                hint=f"flags are {', '.join(n.upper() for n in STATUS_BITS)}",
            )
        value |= STATUS_BITS[key]
    given = {
        "mca_error_code": mca_error_code,
        "model_specific_code": model_specific_code,
        "other_info": other_info,
        "corrected_count": corrected_count,
        "threshold_status": threshold_status,
    }
    for name, shift, width in _STATUS_FIELDS:
        field_value = given[name]
        if not 0 <= field_value < (1 << width):
            raise InvalidInput(
                f"{name} {field_value:#x} does not fit in {width} bits",
                hint=f"the largest value is {(1 << width) - 1:#x}",
            )
        value |= field_value << shift
    return value


@dataclass(frozen=True)
class McgStatus:
    """A decoded IA32_MCG_STATUS value."""

    value: int
    ripv: bool
    eipv: bool
    mcip: bool
    lmce_s: bool

    def as_dict(self) -> Dict[str, object]:
        return {
            "value": self.value,
            "ripv": self.ripv,
            "eipv": self.eipv,
            "mcip": self.mcip,
            "lmce_s": self.lmce_s,
            "flags": [n.upper() for n, b in MCG_STATUS_BITS.items() if self.value & b],
        }


def decode_mcg_status(value: int) -> McgStatus:
    """Decode IA32_MCG_STATUS (RIPV, EIPV, MCIP, LMCE_S)."""
    _check_u64(value, "MCG_STATUS")
    return McgStatus(
        value=value,
        ripv=bool(value & MCG_STATUS_RIPV),
        eipv=bool(value & MCG_STATUS_EIPV),
        mcip=bool(value & MCG_STATUS_MCIP),
        lmce_s=bool(value & MCG_STATUS_LMCE_S),
    )


@dataclass(frozen=True)
class McgCap:
    """A decoded IA32_MCG_CAP value (e.g. KVM_X86_GET_MCE_CAP_SUPPORTED's answer)."""

    value: int
    count: int
    ctl_p: bool
    ext_p: bool
    cmci_p: bool
    tes_p: bool
    ext_cnt: int
    ser_p: bool
    elog_p: bool
    lmce_p: bool

    def as_dict(self) -> Dict[str, object]:
        return {
            "value": self.value,
            "count": self.count,
            "ctl_p": self.ctl_p,
            "ext_p": self.ext_p,
            "cmci_p": self.cmci_p,
            "tes_p": self.tes_p,
            "ext_cnt": self.ext_cnt,
            "ser_p": self.ser_p,
            "elog_p": self.elog_p,
            "lmce_p": self.lmce_p,
        }


def decode_mcg_cap(value: int) -> McgCap:
    """Decode IA32_MCG_CAP (bank count and the capability bits)."""
    _check_u64(value, "MCG_CAP")
    return McgCap(
        value=value,
        count=value & MCG_CAP_COUNT_MASK,
        ctl_p=bool(value & MCG_CTL_P),
        ext_p=bool(value & MCG_EXT_P),
        cmci_p=bool(value & MCG_CMCI_P),
        tes_p=bool(value & MCG_TES_P),
        ext_cnt=(value >> MCG_EXT_CNT_SHIFT) & 0xFF,
        ser_p=bool(value & MCG_SER_P),
        elog_p=bool(value & MCG_ELOG_P),
        lmce_p=bool(value & MCG_LMCE_P),
    )


def _check_u64(value: int, what: str) -> None:
    if not 0 <= value <= U64_MASK:
        raise InvalidInput(f"{what} {value:#x} is not a 64-bit value")


# --------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class McePreset:
    """A ready-made machine check: MCi_STATUS, the MCG_STATUS it needs, MCi_MISC."""

    name: str
    status: int
    mcg_status: int
    misc: int
    raises_mc: bool
    description: str

    def build(self, bank: int, addr: int = 0) -> Mce:
        """The ``struct kvm_x86_mce`` for ``bank`` (``addr`` goes to MCi_ADDR)."""
        return Mce(
            status=self.status, bank=bank, addr=addr, misc=self.misc, mcg_status=self.mcg_status
        )

    def as_dict(self) -> Dict[str, object]:
        return {
            "name": self.name,
            "status": self.status,
            "mcg_status": self.mcg_status,
            "misc": self.misc,
            "raises_mc": self.raises_mc,
            "description": self.description,
        }


_MEM_READ_UNSPECIFIED_CHANNEL = 0x009F
_MEM_SCRUB_CHANNEL0 = 0x00C0
_DATA_LOAD = 0x0134
_ADDR_MISC = MCI_STATUS_ADDRV | MCI_STATUS_MISCV

PRESETS: Mapping[str, McePreset] = MappingProxyType(
    {
        p.name: p
        for p in (
            McePreset(
                "corrected",
                MCI_STATUS_VAL | MCI_STATUS_EN | _ADDR_MISC | _MEM_READ_UNSPECIFIED_CHANNEL,
                0,
                MISC_PHYS_PAGE,
                False,
                "corrected memory read error: logged in the bank only; the guest "
                "finds it when it polls (no exception)",
            ),
            McePreset(
                "ucna",
                MCI_STATUS_VAL
                | MCI_STATUS_UC
                | MCI_STATUS_EN
                | _ADDR_MISC
                | _MEM_READ_UNSPECIFIED_CHANNEL,
                0,
                MISC_PHYS_PAGE,
                False,
                "uncorrected memory read error, no action required (UCNA): logged, "
                "plus a CMCI if the guest enabled one; MCG_STATUS must stay 0",
            ),
            McePreset(
                "srao",
                MCI_STATUS_VAL
                | MCI_STATUS_UC
                | MCI_STATUS_EN
                | _ADDR_MISC
                | MCI_STATUS_S
                | _MEM_SCRUB_CHANNEL0,
                MCG_STATUS_MCIP | MCG_STATUS_RIPV,
                MISC_PHYS_PAGE,
                True,
                "action-optional memory scrubbing error (SRAO), as QEMU injects for "
                "BUS_MCEERR_AO: #MC, execution can restart",
            ),
            McePreset(
                "srar",
                MCI_STATUS_VAL
                | MCI_STATUS_UC
                | MCI_STATUS_EN
                | _ADDR_MISC
                | MCI_STATUS_S
                | MCI_STATUS_AR
                | _DATA_LOAD,
                MCG_STATUS_MCIP | MCG_STATUS_RIPV | MCG_STATUS_EIPV,
                MISC_PHYS_PAGE,
                True,
                "action-required data load error (SRAR), as QEMU injects for "
                "BUS_MCEERR_AR: #MC at the faulting instruction",
            ),
            McePreset(
                "uc-fatal",
                MCI_STATUS_VAL
                | MCI_STATUS_UC
                | MCI_STATUS_EN
                | MCI_STATUS_PCC
                | _ADDR_MISC
                | _MEM_READ_UNSPECIFIED_CHANNEL,
                # RIPV clear: with the context corrupt, execution cannot restart
                MCG_STATUS_MCIP | MCG_STATUS_EIPV,
                MISC_PHYS_PAGE,
                True,
                "uncorrected error with processor context corrupt (PCC): #MC; an OS must panic",
            ),
        )
    }
)
#: other names the CLI accepts for a preset
PRESET_ALIASES: Mapping[str, str] = MappingProxyType(
    {"ce": "corrected", "uncorrected": "uc-fatal", "uc": "uc-fatal", "fatal": "uc-fatal"}
)


def preset(name: str) -> McePreset:
    """Look a preset up by name or alias (case-insensitive)."""
    key = name.strip().lower()
    key = PRESET_ALIASES.get(key, key)
    try:
        return PRESETS[key]
    except KeyError:
        raise InvalidInput(
            f"unknown machine-check preset {name!r}",
            hint=f"choose one of {', '.join(PRESETS)}",
        ) from None


# --------------------------------------------------------------------------- validation


def validate(mce: Mce, bank_count: int) -> Mce:
    """Refuse what KVM_X86_SET_MCE would refuse with EINVAL, and return ``mce``.

    ``bank_count`` is the vCPU's MCG_CAP.Count (what KVM_X86_SETUP_MCE set; QEMU
    uses 10). Also checks that every field fits its C type.
    """
    for what, value in (
        ("MCi_STATUS", mce.status),
        ("MCi_ADDR", mce.addr),
        ("MCi_MISC", mce.misc),
        ("MCG_STATUS", mce.mcg_status),
    ):
        _check_u64(value, what)
    if not mce.status & MCI_STATUS_VAL:
        raise InvalidInput(
            f"MCi_STATUS {mce.status:#018x} lacks VAL (bit 63); "
            "KVM_X86_SET_MCE would fail with EINVAL",
            hint=f"did you mean {mce.status | MCI_STATUS_VAL:#018x}?",
        )
    if not 0 <= mce.bank < 256:
        raise InvalidInput(f"bank {mce.bank} does not fit in a byte")
    if mce.bank >= bank_count:
        banks = f" (0..{bank_count - 1})" if bank_count else ""
        raise InvalidInput(
            f"bank {mce.bank} does not exist: the vCPU has {bank_count} bank(s){banks}; "
            "KVM_X86_SET_MCE would fail with EINVAL",
            hint="pick a lower bank"
            if bank_count
            else "the VMM never enabled machine checks (KVM_X86_SETUP_MCE)",
        )
    return mce


# --------------------------------------------------------------------------- prediction


@dataclass(frozen=True)
class GuestMceState:
    """What is known about the vCPU's machine-check state; ``None`` means unknown.

    Unknown facts are assumed to be as QEMU leaves a healthy guest (CR4.MCE set,
    no machine check in progress, every CTL all ones), and the prediction lists
    what would change if they were not.
    """

    cr4_mce: Optional[bool] = None
    mcip: Optional[bool] = None
    mcg_ctl_all_ones: Optional[bool] = None
    mci_ctl_all_ones: Optional[bool] = None
    bank_status: Optional[int] = None
    mcg_cap: Optional[int] = None

    @classmethod
    def from_registers(
        cls, *, bank: int, msrs: Mapping[int, int], cr4: Optional[int] = None
    ) -> GuestMceState:
        """Build the state from a vCPU's CR4 (KVM_GET_SREGS) and the MSRs of
        :func:`state_msrs` (KVM_GET_MSRS); an MSR absent from ``msrs`` stays unknown."""

        def msr(index: int) -> Optional[int]:
            return msrs.get(index)

        mcg_status = msr(MSR_IA32_MCG_STATUS)
        mcg_ctl = msr(MSR_IA32_MCG_CTL)
        mci_ctl = msr(mci_msr(bank, "ctl"))
        return cls(
            cr4_mce=None if cr4 is None else bool(cr4 & CR4_MCE),
            mcip=None if mcg_status is None else bool(mcg_status & MCG_STATUS_MCIP),
            mcg_ctl_all_ones=None if mcg_ctl is None else mcg_ctl == U64_MASK,
            mci_ctl_all_ones=None if mci_ctl is None else mci_ctl == U64_MASK,
            bank_status=msr(mci_msr(bank, "status")),
            mcg_cap=msr(MSR_IA32_MCG_CAP),
        )


def state_msrs(bank: int) -> Tuple[int, ...]:
    """The MSRs :meth:`GuestMceState.from_registers` uses for ``bank``
    (read them with KVM_GET_MSRS; KVM lets the host read MCG_CTL even without CTL_P)."""
    return (
        MSR_IA32_MCG_CAP,
        MSR_IA32_MCG_STATUS,
        MSR_IA32_MCG_CTL,
        mci_msr(bank, "ctl"),
        mci_msr(bank, "status"),
    )


@dataclass(frozen=True)
class MceEffect:
    """KVM's verdict on a KVM_X86_SET_MCE call and what the guest sees.

    ``outcome`` is one of ``machine-check`` (#MC queued), ``logged`` (bank
    written, no exception), ``overflow`` (the bank keeps its uncorrected error
    and gains OVER), ``dropped`` (ioctl returns 0, nothing happens) or
    ``triple-fault`` (the guest is reset or shut down).
    """

    outcome: str
    raises_mc: bool
    reason: str
    status_written: Optional[int]
    caveats: Tuple[str, ...] = field(default=())

    def as_dict(self) -> Dict[str, object]:
        return {
            "outcome": self.outcome,
            "raises_mc": self.raises_mc,
            "vector": MC_VECTOR if self.raises_mc else None,
            "reason": self.reason,
            "status_written": self.status_written,
            "caveats": list(self.caveats),
        }


def is_ucna(mce: Mce) -> bool:
    """KVM's UCNA test: UC and VAL, none of PCC/S/AR, and MCG_STATUS 0."""
    st = mce.status
    return (
        mce.mcg_status == 0
        and not st & (MCI_STATUS_PCC | MCI_STATUS_S | MCI_STATUS_AR)
        and bool(st & MCI_STATUS_VAL)
        and bool(st & MCI_STATUS_UC)
    )


def linux_notes(status: int, mcg_status: int) -> Tuple[str, ...]:
    """What a Linux guest's #MC handler makes of the error (severity.c's first rules)."""
    notes: List[str] = []
    if status & MCI_STATUS_UC and not status & MCI_STATUS_EN:
        notes.append("EN is clear: a Linux guest ignores the error ('Not enabled')")
    if status & MCI_STATUS_PCC:
        notes.append("PCC: a Linux guest panics ('Processor context corrupt')")
    if not mcg_status & MCG_STATUS_MCIP:
        notes.append(
            "MCG_STATUS.MCIP is clear: a Linux guest panics ('MCIP not set in MCA handler')"
        )
    if not mcg_status & (MCG_STATUS_RIPV | MCG_STATUS_EIPV):
        notes.append("neither RIPV nor EIPV: a Linux guest panics ('Neither restart nor error IP')")
    elif not mcg_status & MCG_STATUS_RIPV:
        notes.append("RIPV is clear: a Linux guest panics if the #MC hits kernel code")
    if not notes:
        cls = classify(status)
        if cls == "srar":
            notes.append(
                "SRAR: a Linux guest kills the interrupted user task with SIGBUS; in the "
                "kernel it panics unless the access had a recovery fixup"
            )
        elif cls == "srao":
            notes.append(
                "SRAO: a Linux guest logs it and offlines the page in the background "
                "(if MCG_CAP.SER_P is set and the address is valid)"
            )
    return tuple(notes)


def predict(
    mce: Mce,
    *,
    bank_count: int,
    state: Optional[GuestMceState] = None,
    ucna_path: bool = True,
) -> MceEffect:
    """Predict what KVM_X86_SET_MCE does with ``mce`` (validating it first).

    ``ucna_path=False`` models KVM before Linux 6.0, which treats a UCNA error
    like any other uncorrected one (#MC). Raises :class:`InvalidInput` for what
    KVM would refuse with EINVAL.
    """
    validate(mce, bank_count)
    st = state or GuestMceState()
    caveats: List[str] = []
    status = mce.status
    old = st.bank_status
    if ucna_path and is_ucna(mce):
        cmci = "a CMCI follows if the guest enabled CMCI for the bank"
        if st.mcg_cap is not None and not st.mcg_cap & MCG_CMCI_P:
            cmci = "no CMCI: the vCPU's MCG_CAP lacks CMCI_P"
        return MceEffect(
            "logged",
            False,
            f"UCNA: KVM writes the bank without #MC; {cmci}",
            status,
            ("KVM before Linux 6.0 raises #MC for this instead",),
        )
    if status & MCI_STATUS_UC:
        ctl_p = st.mcg_cap is None or bool(st.mcg_cap & MCG_CTL_P)
        if ctl_p and st.mcg_ctl_all_ones is False:
            return MceEffect(
                "dropped", False, "MCG_CTL is not all ones: uncorrected errors are ignored", None
            )
        if st.mci_ctl_all_ones is False:
            return MceEffect(
                "dropped",
                False,
                f"MC{mce.bank}_CTL is not all ones: uncorrected errors in this bank are ignored",
                None,
            )
        if st.cr4_mce is False:
            return MceEffect(
                "triple-fault",
                False,
                "the guest has CR4.MCE clear: KVM makes it a triple fault",
                None,
            )
        if st.mcip is True:
            return MceEffect(
                "triple-fault",
                False,
                "a machine check is already in progress (MCG_STATUS.MCIP): KVM makes it a "
                "triple fault",
                None,
            )
        if ctl_p and st.mcg_ctl_all_ones is None:
            caveats.append("dropped silently if the guest cleared bits of MCG_CTL")
        if st.mci_ctl_all_ones is None:
            caveats.append(f"dropped silently if MC{mce.bank}_CTL is not all ones")
        if st.cr4_mce is None:
            caveats.append("a triple fault if the guest has CR4.MCE clear")
        if st.mcip is None:
            caveats.append("a triple fault if a machine check is still in progress (MCIP)")
        written = status
        if old is None:
            caveats.append("OVER is added if the bank already holds a valid error")
        elif old & MCI_STATUS_VAL:
            written |= MCI_STATUS_OVER
        caveats.extend(linux_notes(status, mce.mcg_status))
        return MceEffect(
            "machine-check",
            True,
            f"uncorrected error: KVM writes bank {mce.bank} and MCG_STATUS, then queues #MC "
            f"(vector {MC_VECTOR})",
            written,
            tuple(caveats),
        )
    # corrected error: no exception, the guest polls
    poll = "no exception: the guest sees it when it polls the bank"
    if old is None:
        return MceEffect(
            "logged",
            False,
            f"corrected error: KVM writes bank {mce.bank}; {poll}",
            status,
            (
                "if the bank holds an uncorrected error, it is kept and only gains OVER",
                "MCG_STATUS is not written for a corrected error",
            ),
        )
    if old & MCI_STATUS_VAL and old & MCI_STATUS_UC:
        return MceEffect(
            "overflow",
            False,
            f"bank {mce.bank} holds an uncorrected error: KVM keeps it and sets OVER",
            old | MCI_STATUS_OVER,
        )
    written = status | (MCI_STATUS_OVER if old & MCI_STATUS_VAL else 0)
    return MceEffect(
        "logged", False, f"corrected error: KVM writes bank {mce.bank}; {poll}", written
    )
