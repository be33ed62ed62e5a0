"""The arm64 SError syndrome: decode, encode, validate, and predict a Linux guest's reaction.

Pure code: no I/O, no click, no rich.

The two forms a value can take
------------------------------
``KVM_SET_VCPU_EVENTS`` takes an *ISS* (instruction-specific syndrome): the bits
[24:0] of the ``ESR_EL1`` value the guest will read. The CPU supplies the rest:
EC = 0x2F (SError) in bits [31:26] and IL = 1 in bit 25, so the guest sees
``0xBE000000 | ISS``. Users also paste *full* ``ESR_ELx`` values from guest
logs (``code 0x00000000be000011``), so :func:`decode` accepts both and tells
them apart like this:

* a value with no bit above 24 is an ISS;
* anything else is a full ``ESR_ELx``: EC [31:26], IL [25], ISS [24:0], ISS2
  [55:32] (FEAT_LS64 and later), bits [63:56] RES0. A full ESR whose EC is not
  0x2F is still decoded (its EC is named) but flagged as not an SError syndrome;
* a 64-bit value whose upper half is all ones while bit 31 is set is a 32-bit
  ESR that a kernel sign-extended (Linux 6.1 reports some that way); only its
  low 32 bits are used.

``form="iss"`` or ``form="esr"`` overrides the guess (a full ESR with EC = 0 and
IL = 0 looks exactly like an ISS).

The SError ISS (Arm ARM, ESR_ELx with EC 0x2F)::

    24     IDS   1: bits [23:0] are IMPLEMENTATION DEFINED (no RAS fields)
    23:14  RES0
    13     IESB  synchronized by an implicit error synchronization barrier
    12:10  AET   0b000 UC, 0b001 UEU, 0b010 UEO, 0b011 UER, 0b110 CE
    9      EA    external abort type
    8:6    RES0
    5:0    DFSC  0x00 uncategorized, 0x11 asynchronous SError interrupt

IESB and AET mean something only when DFSC is 0x11.

How a Linux guest reacts (arch/arm64/kernel/traps.c ``do_serror``): an SError
is uncontainable, and the guest panics, when the guest has no RAS extension,
when IDS is set, or when DFSC is not 0x11. Otherwise the AET decides: CE and
UEO let the guest continue silently; UER, UEU, UC and reserved values panic.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Dict, List, Mapping, Optional, Tuple

from serrinj.codec.numbers import parse_int as parse_int
from serrinj.errors import InvalidInput

# --- ESR_ELx layout
ESR_EC_SHIFT = 26
ESR_EC_MASK = 0x3F << ESR_EC_SHIFT
ESR_IL = 1 << 25
ESR_ISS2_SHIFT = 32
ESR_ISS2_MASK = 0xFFFFFF << ESR_ISS2_SHIFT
ESR_RES0_HIGH = 0xFF << 56
EC_SERROR = 0x2F
#: EC 0x2F and IL, which the CPU adds to the injected ISS
SERROR_ESR_BASE = (EC_SERROR << ESR_EC_SHIFT) | ESR_IL

# --- SError ISS fields
ISS_MASK = 0x1FFFFFF
ISS_IDS = 1 << 24
ISS_IMPDEF_MASK = 0xFFFFFF
ISS_IESB = 1 << 13
ISS_AET_SHIFT = 10
ISS_AET_MASK = 0x7 << ISS_AET_SHIFT
ISS_EA = 1 << 9
ISS_DFSC_MASK = 0x3F
ISS_RES0 = (0x3FF << 14) | (0x7 << 6)

DFSC_UNCATEGORIZED = 0x00
DFSC_ASYNC_SERROR = 0x11

#: the syndrome KVM injects when userspace gives none (ESR_ELx_ISV: IDS=1)
KVM_DEFAULT_ISS = ISS_IDS

AET_UC = 0b000
AET_UEU = 0b001
AET_UEO = 0b010
AET_UER = 0b011
AET_CE = 0b110

AET_NAMES: Mapping[int, str] = MappingProxyType(
    {AET_UC: "UC", AET_UEU: "UEU", AET_UEO: "UEO", AET_UER: "UER", AET_CE: "CE"}
)
AET_DESCRIPTIONS: Mapping[int, str] = MappingProxyType(
    {
        AET_UC: "uncontainable",
        AET_UEU: "unrecoverable state",
        AET_UEO: "restartable state (not yet consumed)",
        AET_UER: "recoverable state",
        AET_CE: "corrected",
    }
)

#: ``--severity`` names and the AET each selects (DFSC is then 0x11)
SEVERITIES: Mapping[str, int] = MappingProxyType(
    {"ce": AET_CE, "ueo": AET_UEO, "uer": AET_UER, "ueu": AET_UEU, "uc": AET_UC}
)

DFSC_NAMES: Mapping[int, str] = MappingProxyType(
    {DFSC_UNCATEGORIZED: "uncategorized", DFSC_ASYNC_SERROR: "asynchronous SError interrupt"}
)

#: Exception classes (ESR_ELx.EC), named in plain words
EC_NAMES: Mapping[int, str] = MappingProxyType(
    {
        0x00: "unknown reason",
        0x01: "trapped WFI/WFE",
        0x03: "trapped MCR/MRC (coproc 0b1111)",
        0x04: "trapped MCRR/MRRC (coproc 0b1111)",
        0x05: "trapped MCR/MRC (coproc 0b1110)",
        0x06: "trapped LDC/STC",
        0x07: "SVE/SIMD/FP access",
        0x0A: "LD64B/ST64B",
        0x0C: "trapped MRRC (coproc 0b1110)",
        0x0D: "branch target exception",
        0x0E: "illegal execution state",
        0x11: "SVC (AArch32)",
        0x12: "HVC (AArch32)",
        0x13: "SMC (AArch32)",
        0x15: "SVC (AArch64)",
        0x16: "HVC (AArch64)",
        0x17: "SMC (AArch64)",
        0x18: "trapped MSR/MRS/system instruction",
        0x19: "SVE access",
        0x1A: "trapped ERET",
        0x1B: "TSTART",
        0x1C: "pointer authentication failure",
        0x1D: "SME access",
        0x1F: "implementation-defined (EL3)",
        0x20: "instruction abort (lower EL)",
        0x21: "instruction abort (same EL)",
        0x22: "PC alignment fault",
        0x24: "data abort (lower EL)",
        0x25: "data abort (same EL)",
        0x26: "SP alignment fault",
        0x27: "memory operation (MOPS)",
        0x28: "FP exception (AArch32)",
        0x2C: "FP exception (AArch64)",
        0x2D: "guarded control stack",
        0x2F: "SError",
        0x30: "breakpoint (lower EL)",
        0x31: "breakpoint (same EL)",
        0x32: "software step (lower EL)",
        0x33: "software step (same EL)",
        0x34: "watchpoint (lower EL)",
        0x35: "watchpoint (same EL)",
        0x38: "BKPT (AArch32)",
        0x3A: "vector catch (AArch32)",
        0x3C: "BRK (AArch64)",
        0x3D: "profiling exception",
    }
)


def ec_name(ec: int) -> str:
    """The name of exception class ``ec`` (``"reserved"`` for an unallocated one)."""
    return EC_NAMES.get(ec, "reserved")


# --------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class Syndrome:
    """A decoded SError syndrome (or a full ESR_ELx that may be something else).

    SError-specific fields are ``None`` when they do not apply: all of them for a
    non-SError EC, all but ``ids``/``impdef`` when IDS is set, and ``aet``/``iesb``
    when DFSC is not 0x11.
    """

    value: int
    form: str
    sign_extended: bool
    esr: int
    ec: int
    il: bool
    iss: int
    iss2: int
    is_serror: bool
    ids: Optional[bool]
    impdef: Optional[int]
    dfsc: Optional[int]
    ea: Optional[bool]
    aet: Optional[int]
    iesb: Optional[bool]
    res0: int
    notes: Tuple[str, ...]

    @property
    def ec_name(self) -> str:
        return ec_name(self.ec)

    @property
    def dfsc_name(self) -> Optional[str]:
        if self.dfsc is None:
            return None
        return DFSC_NAMES.get(self.dfsc, "reserved")

    @property
    def aet_name(self) -> Optional[str]:
        if self.aet is None:
            return None
        return AET_NAMES.get(self.aet, "reserved")

    @property
    def injectable_iss(self) -> Optional[int]:
        """The value to pass as ``serror_esr`` to reproduce this syndrome, if any."""
        if not self.is_serror or self.iss2:
            return None
        return self.iss

    def as_dict(self) -> Dict[str, object]:
        """A JSON-ready dict: integers stay integers, names sit beside them."""
        return {
            "value": self.value,
            "form": self.form,
            "sign_extended": self.sign_extended,
            "esr": self.esr,
            "ec": self.ec,
            "ec_name": self.ec_name,
            "il": self.il,
            "iss": self.iss,
            "iss2": self.iss2,
            "is_serror": self.is_serror,
            "ids": self.ids,
            "impdef": self.impdef,
            "dfsc": self.dfsc,
            "dfsc_name": self.dfsc_name,
            "ea": self.ea,
            "aet": self.aet,
            "aet_name": self.aet_name,
            "aet_description": None if self.aet is None else AET_DESCRIPTIONS.get(self.aet),
            "iesb": self.iesb,
            "res0": self.res0,
            "injectable_iss": self.injectable_iss,
            "notes": list(self.notes),
        }


def _is_sign_extended(value: int) -> bool:
    return (value >> 32) == 0xFFFFFFFF and bool(value & (1 << 31))


def decode(value: int, *, form: str = "auto") -> Syndrome:
    """Decode an SError ISS or a full ESR_ELx (see the module docstring for the rules).

    ``form`` is ``"auto"``, ``"iss"`` or ``"esr"``. Raises :class:`InvalidInput`
    for a negative value, one wider than 64 bits, an ``"iss"`` with bits above
    24, or a full ESR with its RES0 bits [63:56] set.
    """
    if form not in ("auto", "iss", "esr"):
        raise ValueError(f"form must be 'auto', 'iss' or 'esr', not {form!r}")
    if value < 0 or value >> 64:
        raise InvalidInput(f"{value:#x} is not a 64-bit syndrome value")
    notes: List[str] = []
    sign_extended = False
    if form == "auto":
        form = "iss" if value <= ISS_MASK else "esr"
    if form == "iss":
        if value & ~ISS_MASK:
            raise InvalidInput(
                f"{value:#x} is not an ISS: {_describe_outside_iss(value & ~ISS_MASK)} set",
                hint="an ISS is bits [24:0]; decode it as a full ESR instead",
            )
        esr = SERROR_ESR_BASE | value
    else:
        esr = value
        if _is_sign_extended(value):
            sign_extended = True
            esr = value & 0xFFFFFFFF
            notes.append("sign-extended 32-bit ESR: only the low 32 bits are used")
        elif value & ESR_RES0_HIGH:
            raise InvalidInput(
                f"{value:#x} is not an ESR_ELx: bits [63:56] are RES0",
                hint="a syndrome is at most 56 bits wide (ISS2 ends at bit 55)",
            )
    ec = (esr & ESR_EC_MASK) >> ESR_EC_SHIFT
    il = bool(esr & ESR_IL)
    iss = esr & ISS_MASK
    iss2 = (esr & ESR_ISS2_MASK) >> ESR_ISS2_SHIFT
    is_serror = ec == EC_SERROR
    ids: Optional[bool] = None
    impdef: Optional[int] = None
    dfsc: Optional[int] = None
    ea: Optional[bool] = None
    aet: Optional[int] = None
    iesb: Optional[bool] = None
    res0 = 0
    if not is_serror:
        notes.append(f"EC {ec:#04x} ({ec_name(ec)}) is not an SError syndrome (EC 0x2f)")
    else:
        if form == "esr" and not il:
            notes.append("IL is 0: the CPU reports SErrors with IL=1")
        if iss2:
            notes.append(f"ISS2 {iss2:#x} is set; KVM can inject only ISS[24:0]")
        ids = bool(iss & ISS_IDS)
        if ids:
            impdef = iss & ISS_IMPDEF_MASK
            notes.append("IDS=1: bits [23:0] are implementation-defined, not RAS fields")
        else:
            dfsc = iss & ISS_DFSC_MASK
            ea = bool(iss & ISS_EA)
            res0 = iss & ISS_RES0
            if res0:
                notes.append(f"RES0 bits set: {_fmt_ranges(res0)}")
            if dfsc == DFSC_ASYNC_SERROR:
                aet = (iss & ISS_AET_MASK) >> ISS_AET_SHIFT
                iesb = bool(iss & ISS_IESB)
                if aet not in AET_NAMES:
                    notes.append(f"AET {aet:#05b} is reserved")
            else:
                if dfsc != DFSC_UNCATEGORIZED:
                    notes.append(f"DFSC {dfsc:#04x} is reserved")
                if iss & (ISS_AET_MASK | ISS_IESB):
                    notes.append("AET/IESB bits are set but mean nothing unless DFSC is 0x11")
    return Syndrome(
        value=value,
        form=form,
        sign_extended=sign_extended,
        esr=esr,
        ec=ec,
        il=il,
        iss=iss,
        iss2=iss2,
        is_serror=is_serror,
        ids=ids,
        impdef=impdef,
        dfsc=dfsc,
        ea=ea,
        aet=aet,
        iesb=iesb,
        res0=res0,
        notes=tuple(notes),
    )


# --------------------------------------------------------------------------- encoding

#: the ISS of each severity preset (DFSC 0x11 plus the AET)
PRESETS: Mapping[str, int] = MappingProxyType(
    {name: DFSC_ASYNC_SERROR | (aet << ISS_AET_SHIFT) for name, aet in SEVERITIES.items()}
)


def encode(
    severity: Optional[str] = None,
    *,
    aet: Optional[int] = None,
    dfsc: Optional[int] = None,
    ea: bool = False,
    iesb: bool = False,
    ids: bool = False,
    impdef: Optional[int] = None,
) -> int:
    """Build an SError ISS from its fields.

    - ``severity`` (``ce``, ``ueo``, ``uer``, ``ueu``, ``uc``) or a raw ``aet``
      (0-7, reserved values allowed for testing guests) sets DFSC to 0x11;
    - ``dfsc`` defaults to 0x11; AET and IESB may only go with DFSC 0x11;
    - ``ids=True`` and/or ``impdef=N`` build ``IDS | N``: the other fields do
      not exist then, so combining them is an error.

    ``encode()`` with no argument is 0x11: an asynchronous SError graded UC.
    Raises :class:`InvalidInput` for contradictory or out-of-range fields.
    """
    if ids or impdef is not None:
        if severity is not None or aet is not None or dfsc is not None or ea or iesb:
            raise InvalidInput(
                "IDS=1 makes bits [23:0] implementation-defined; "
                "severity, AET, DFSC, EA and IESB cannot be combined with it",
                hint="give the raw implementation-defined bits with impdef",
            )
        raw = 0 if impdef is None else impdef
        if not 0 <= raw <= ISS_IMPDEF_MASK:
            raise InvalidInput(
                f"implementation-defined syndrome {raw:#x} does not fit in bits [23:0]",
                hint="the largest value is 0xffffff",
            )
        return ISS_IDS | raw
    if severity is not None and aet is not None:
        raise InvalidInput("give either a severity or a raw AET, not both")
    if severity is not None:
        key = severity.strip().lower()
        if key not in SEVERITIES:
            raise InvalidInput(
                f"unknown severity {severity!r}",
                hint=f"choose one of {', '.join(SEVERITIES)}",
            )
        aet = SEVERITIES[key]
    if aet is not None and not 0 <= aet <= 7:
        raise InvalidInput(f"AET {aet} does not fit in 3 bits", hint="AET is 0..7")
    if dfsc is None:
        dfsc = DFSC_ASYNC_SERROR
    if not 0 <= dfsc <= ISS_DFSC_MASK:
        raise InvalidInput(f"DFSC {dfsc:#x} does not fit in 6 bits", hint="DFSC is 0x00..0x3f")
    if dfsc != DFSC_ASYNC_SERROR and (aet is not None or iesb):
        raise InvalidInput(
            f"AET and IESB are defined only with DFSC 0x11, not {dfsc:#04x}",
            hint="drop dfsc, or drop the severity/AET/IESB",
        )
    iss = dfsc
    if aet is not None:
        iss |= aet << ISS_AET_SHIFT
    if ea:
        iss |= ISS_EA
    if iesb:
        iss |= ISS_IESB
    return iss


# --------------------------------------------------------------------------- validation

_OUTSIDE_ISS_FIELDS: Tuple[Tuple[str, int, int], ...] = (
    ("RES0", 63, 56),
    ("ISS2", 55, 32),
    ("EC", 31, 26),
    ("IL", 25, 25),
)


def _ranges(mask: int) -> List[Tuple[int, int]]:
    """The runs of set bits in ``mask`` as ``(high, low)`` pairs, highest first."""
    out: List[Tuple[int, int]] = []
    bit = 0
    while mask >> bit:
        if mask >> bit & 1:
            low = bit
            while mask >> (bit + 1) & 1:
                bit += 1
            out.append((bit, low))
        bit += 1
    return out[::-1]


def _fmt_ranges(mask: int) -> str:
    """``"bits [23:14], bit 7"`` for the set bits of ``mask``."""
    return ", ".join(f"bit {lo}" if hi == lo else f"bits [{hi}:{lo}]" for hi, lo in _ranges(mask))


def _describe_outside_iss(mask: int) -> str:
    """Name the ESR fields that the bits of ``mask`` (all above bit 24) fall in."""
    parts = []
    if mask >> 64:
        parts.append("bits above 63")
    for name, hi, lo in _OUTSIDE_ISS_FIELDS:
        sub = (mask >> lo) & ((1 << (hi - lo + 1)) - 1)
        if not sub:
            continue
        where = f"bit {lo}" if hi == lo else f"bits [{hi}:{lo}]"
        parts.append(f"{name} ({where})" if hi == lo else f"{name} ({where} = {sub:#x})")
    return ", ".join(parts)


def validate_injectable(value: int) -> int:
    """Check that ``value`` is an ISS KVM_SET_VCPU_EVENTS accepts, and return it.

    KVM refuses any bit outside ISS[24:0] with EINVAL (IDS, bit 24, is allowed).
    The :class:`InvalidInput` names the offending bits and, when the value is a
    full SError ESR (EC 0x2F, possibly sign-extended), suggests its ISS.
    """
    if value < 0:
        raise InvalidInput(f"syndrome {value} is negative", hint="give a value of 0 or more")
    extra = value & ~ISS_MASK
    if not extra:
        return value
    hint = "the ISS is bits [24:0] (at most 0x1ffffff); EC and IL are supplied by the hardware."
    if value >> 64 == 0:
        low = value & 0xFFFFFFFF if _is_sign_extended(value) else value
        ec = (low & ESR_EC_MASK) >> ESR_EC_SHIFT
        if ec == EC_SERROR and not low & (ESR_ISS2_MASK | ESR_RES0_HIGH):
            if low != value:
                hint += " This looks like a sign-extended 32-bit ESR."
            hint += f" Did you mean {low & ISS_MASK:#x}?"
        elif ec not in (0, EC_SERROR):
            hint += f" EC {ec:#04x} ({ec_name(ec)}) is not an SError."
    raise InvalidInput(
        f"syndrome {value:#x} has {_describe_outside_iss(extra)} set; "
        "KVM_SET_VCPU_EVENTS accepts only ISS bits [24:0] and would fail with EINVAL",
        hint=hint,
    )


def resolve_iss(text: str) -> int:
    """Turn user input into an injectable ISS: a preset name (``ce``, ``uer``, ...) or a number."""
    key = text.strip().lower()
    if key in PRESETS:
        return PRESETS[key]
    return validate_injectable(parse_int(text, what="syndrome"))


# --------------------------------------------------------------------------- prediction

#: the text ``nmi_panic`` prints after the SError line
PANIC_MESSAGE = "Kernel panic - not syncing: Asynchronous SError Interrupt"


def guest_esr(iss: Optional[int], *, host_ras: bool = True) -> Optional[int]:
    """ESR_EL1 as the guest reads it for an injected ISS (``None``: KVM's own syndrome).

    Without RAS the host has no VSESR_EL2 to carry a syndrome, so the CPU
    supplies an implementation-defined one (EC 0x2F; QEMU's cortex-a57 gives
    ISS 0): the result is then ``None``, unknown in advance.
    """
    if iss is None:
        return SERROR_ESR_BASE | KVM_DEFAULT_ISS if host_ras else None
    return SERROR_ESR_BASE | validate_injectable(iss)


def console_line(esr: int, cpu: int = 0, *, wide: bool = True) -> str:
    """The line ``arm64_serror_panic`` prints (``pr_crit``) before a guest panics.

    Since ESR_ELx became a 64-bit value in Linux (5.19), the ESR is printed with
    ``%016lx``, then `` -- `` and the EC's name. Older guests printed ``0x%08x``:
    ``wide=False`` gives that form.
    """
    code = f"{esr:016x}" if wide else f"{esr & 0xFFFFFFFF:08x}"
    return f"SError Interrupt on CPU{cpu}, code 0x{code} -- SError"


@dataclass(frozen=True)
class LinuxOutcome:
    """What a Linux guest does when it takes the SError."""

    survives: bool
    severity: str
    reason: str
    guest_esr: Optional[int]
    console_line: Optional[str]
    panic_message: Optional[str]
    #: what differs by host kernel (:func:`kernel_notes`)
    kernel_notes: Tuple[str, ...] = ()

    def as_dict(self) -> Dict[str, object]:
        return {
            "survives": self.survives,
            "outcome": "survives" if self.survives else "panics",
            "severity": self.severity,
            "reason": self.reason,
            "guest_esr": self.guest_esr,
            "console_line": self.console_line,
            "panic_message": self.panic_message,
            "kernel_notes": list(self.kernel_notes),
        }


#: the host kernels the arm64 lab boots (Debian 12's 6.1, its backported 6.12, and
#: unstable's newest, 7.2 in 2026), for the notes below
LAB_KERNELS = "Linux 6.1, 6.12 and 7.2"


def kernel_notes(iss: Optional[int], host_ras: bool = True) -> Tuple[str, ...]:
    """What differs, for this SError, between host kernels (as the arm64 lab measured)."""
    notes = []
    if iss is None:
        notes.append(
            "no syndrome given: on a RAS host KVM injects IDS=1, so the guest reads ESR_EL1"
            f" 0xbf000000 ({LAB_KERNELS} alike); without RAS any ESR is refused and the"
            " syndrome depends on the kernel: the CPU's own when the CPU delivers it (0xbe000000"
            " on the lab's cortex-a57, 6.1, and 7.2 for a masked one taken on unmask), IDS=1"
            " (0xbf000000) when Linux 6.17+ takes an unmasked one at injection"
        )
    else:
        notes.append(
            f"the guest reads ESR_EL1 {SERROR_ESR_BASE | iss:#x} (0xbe000000 | ISS) on"
            f" {LAB_KERNELS} alike; a host without RAS refuses it (EINVAL)"
        )
    notes.append(
        "when it is taken depends on the host kernel: up to Linux 6.16 KVM keeps the SError"
        " pending until the vCPU next runs the guest with SErrors unmasked; since 6.17 one the"
        " guest has unmasked is put into the vCPU's registers inside KVM_SET_VCPU_EVENTS (PC at"
        " the SError vector, even in a paused VM), so GET reads nothing pending and `serrinj"
        " status` shows it as the last exception; a masked one stays pending with its ESR on"
        " every kernel until the guest unmasks (serrinj probes the kernel, never its version)"
    )
    return tuple(notes)


def predict_linux(
    iss: Optional[int], *, guest_ras: bool = True, host_ras: bool = True, cpu: int = 0
) -> LinuxOutcome:
    """Predict a Linux guest's reaction to an SError injected with ``iss``.

    ``iss=None`` means no syndrome was given (``serror_has_esr = 0``): KVM then
    injects IDS=1 (0x1000000) on a RAS host. ``guest_ras=False`` models a guest
    kernel built without CONFIG_ARM64_RAS_EXTN or a vCPU that does not expose
    FEAT_RAS; to such a guest every SError is uncontainable. ``cpu`` is the
    guest CPU number printed in the console line. ``host_ras=False``: the host
    has no RAS either, so the vCPU has none (every SError is fatal) and a
    syndrome KVM chooses is implementation-defined (``guest_esr`` is ``None``).
    """
    esr = guest_esr(iss, host_ras=host_ras)
    if not host_ras:
        guest_ras = False
    syn = decode((esr if esr is not None else SERROR_ESR_BASE) & ISS_MASK, form="iss")
    severity = "UC"
    survives = False
    if not guest_ras:
        reason = "the guest has no RAS extension, so every SError is uncontainable"
    elif syn.ids:
        reason = (
            "IDS=1: the syndrome is implementation-defined, so Linux cannot grade it "
            "and treats it as uncontainable"
        )
        if iss is None:
            reason += " (no syndrome given: KVM injected its own, IDS=1)"
    elif syn.dfsc != DFSC_ASYNC_SERROR:
        assert syn.dfsc is not None
        reason = (
            f"DFSC {syn.dfsc:#04x} is not 'asynchronous SError' (0x11), "
            "so Linux grades it uncontainable"
        )
    else:
        assert syn.aet is not None
        aet = syn.aet
        severity = AET_NAMES.get(aet, f"reserved({aet:#05b})")
        if aet == AET_CE:
            survives = True
            reason = "corrected error: the CPU can make progress; Linux continues and logs nothing"
        elif aet == AET_UEO:
            survives = True
            reason = (
                "uncorrected but restartable and not yet consumed: Linux continues and logs "
                "nothing (it may be taken again as a more severe error)"
            )
        elif aet in (AET_UER, AET_UEU):
            reason = (
                f"{severity} ({AET_DESCRIPTIONS[aet]}): the CPU cannot make progress "
                "and the exception may have been imprecise"
            )
        elif aet == AET_UC:
            reason = "UC: the error has been silently propagated"
        else:
            reason = f"AET {aet:#05b} is reserved; Linux treats unknown severities as UC"
    kernels = kernel_notes(iss, host_ras)
    if survives:
        return LinuxOutcome(True, severity, reason, esr, None, None, kernels)
    line = console_line(esr, cpu) if esr is not None else f"SError Interrupt on CPU{cpu}, code 0x"
    return LinuxOutcome(False, severity, reason, esr, line, PANIC_MESSAGE, kernels)
