"""serrinj.codec.esr: the SError syndrome codec, validation and the Linux-guest prediction.

The expected values come from BRIEF sections 2, 3 and 9 (measured on real
arm64 KVM in the lab) and the kselftest external_aborts.c.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from typing import Any, Dict, Optional

import pytest
from hypothesis import given
from hypothesis import strategies as st

from serrinj.codec import esr
from serrinj.errors import ExitCode, InvalidInput

U64 = (1 << 64) - 1

# --------------------------------------------------------------------------- BRIEF tables

BRIEF_SECTION_3 = [
    # (ISS, AET name, the guest survives)
    (0x1811, "CE", True),
    (0x0811, "UEO", True),
    (0x0C11, "UER", False),
    (0x0411, "UEU", False),
    (0x0011, "UC", False),
]


@pytest.mark.parametrize(("iss", "aet", "survives"), BRIEF_SECTION_3)
def test_brief_severity_table(iss: int, aet: str, survives: bool) -> None:
    out = esr.predict_linux(iss)
    assert out.survives is survives
    assert out.severity == aet
    assert esr.decode(iss).aet_name == aet
    assert esr.PRESETS[aet.lower()] == iss
    assert esr.encode(aet.lower()) == iss
    if survives:
        assert out.console_line is None and out.panic_message is None
    else:
        assert (
            out.console_line
            == f"SError Interrupt on CPU0, code 0x{0xBE000000 | iss:016x} -- SError"
        )
        assert out.panic_message == "Kernel panic - not syncing: Asynchronous SError Interrupt"


@pytest.mark.parametrize("iss", [0x1000000, 0x1ABCDEF, 0x1001811, 0x101D1ED])
def test_ids_set_panics(iss: int) -> None:
    out = esr.predict_linux(iss)
    assert not out.survives
    assert "IDS=1" in out.reason


@pytest.mark.parametrize("iss", [0x1800, 0x0800, 0x1812, 0x1810, 0x0000, 0x3F])
def test_dfsc_other_than_0x11_panics(iss: int) -> None:
    out = esr.predict_linux(iss)
    assert not out.survives
    assert "DFSC" in out.reason


@pytest.mark.parametrize("iss", [0x1011, 0x1411, 0x1C11])
def test_reserved_aet_panics(iss: int) -> None:
    out = esr.predict_linux(iss)
    assert not out.survives
    assert "reserved" in out.reason


@pytest.mark.parametrize("iss", [0x1811, 0x0811, 0x3811, 0x1A11])
def test_guest_without_ras_panics_on_everything(iss: int) -> None:
    assert esr.predict_linux(iss).survives
    out = esr.predict_linux(iss, guest_ras=False)
    assert not out.survives
    assert "no RAS" in out.reason
    assert out.console_line is not None


def test_ce_with_iesb_and_ea_still_survives() -> None:
    iss = esr.encode("ce", ea=True, iesb=True)
    assert iss == 0x3A11
    assert esr.predict_linux(iss).survives


@pytest.mark.parametrize(
    ("injected", "guest_esr"),
    [(0x411, 0xBE000411), (0x1ABCDEF, 0xBFABCDEF), (None, 0xBF000000), (0x11, 0xBE000011)],
)
def test_brief_section_9_observed_syndromes(injected: Optional[int], guest_esr: int) -> None:
    assert esr.guest_esr(injected) == guest_esr
    assert esr.predict_linux(injected).guest_esr == guest_esr


def test_no_esr_is_kvms_ids_syndrome() -> None:
    # GET reads back serror_esr = 0x1000000 after a SET without has_esr
    assert esr.KVM_DEFAULT_ISS == 0x1000000
    out = esr.predict_linux(None)
    assert not out.survives
    assert "KVM injected its own" in out.reason
    assert out.console_line == "SError Interrupt on CPU0, code 0x00000000bf000000 -- SError"


def test_bit_25_is_refused_like_kvm_does() -> None:
    with pytest.raises(InvalidInput, match=r"IL \(bit 25\)"):
        esr.validate_injectable(0x2000011)


def test_kselftest_value() -> None:
    value = 0x101D1ED
    assert esr.validate_injectable(value) == value
    syn = esr.decode(value)
    assert syn.form == "iss" and syn.is_serror
    assert syn.ids is True
    assert syn.impdef == 0x1D1ED
    assert syn.dfsc is None and syn.aet is None and syn.ea is None and syn.iesb is None
    assert any("implementation-defined" in n for n in syn.notes)
    assert esr.guest_esr(value) == 0xBF01D1ED
    assert not esr.predict_linux(value).survives


def test_lab_console_line() -> None:
    # what the nested Linux guest printed in the arm64 lab for ISS 0x11
    line = esr.predict_linux(0x11).console_line
    assert line is not None
    assert line.startswith("SError Interrupt on CPU0, code 0x00000000be000011")


def test_console_line_cpu_and_old_format() -> None:
    assert esr.predict_linux(0x411, cpu=3).console_line == (
        "SError Interrupt on CPU3, code 0x00000000be000411 -- SError"
    )
    assert esr.console_line(0xBE000411, 1, wide=False) == (
        "SError Interrupt on CPU1, code 0xbe000411 -- SError"
    )


# --------------------------------------------------------------------------- decoding


def test_full_esr_is_detected() -> None:
    syn = esr.decode(0xBE001811)
    assert syn.form == "esr"
    assert syn.is_serror and syn.il
    assert syn.ec == 0x2F and syn.ec_name == "SError"
    assert syn.iss == 0x1811
    assert syn.aet_name == "CE"
    assert syn.injectable_iss == 0x1811
    assert not syn.notes


def test_iss_is_placed_in_the_guest_esr() -> None:
    syn = esr.decode(0x1811)
    assert syn.form == "iss"
    assert syn.esr == 0xBE001811
    assert syn.is_serror and syn.il


def test_guest_log_value_with_leading_zeros() -> None:
    # "code 0x00000000be000011" as the guest prints it
    syn = esr.decode(0x00000000BE000011)
    assert syn.is_serror and syn.aet_name == "UC" and syn.injectable_iss == 0x11


def test_non_serror_esr_is_decoded_and_flagged() -> None:
    syn = esr.decode(0x96000010)
    assert syn.form == "esr"
    assert syn.ec == 0x25
    assert syn.ec_name == "data abort (same EL)"
    assert not syn.is_serror
    assert syn.injectable_iss is None
    assert syn.aet is None and syn.dfsc is None and syn.ids is None
    assert any("not an SError" in n for n in syn.notes)


def test_sign_extended_esr() -> None:
    # Linux 6.1 reported the ext_dabt ESR as 0xffffffff96000010 (BRIEF section 9)
    syn = esr.decode(0xFFFFFFFF96000010)
    assert syn.sign_extended
    assert syn.esr == 0x96000010
    assert syn.ec == 0x25 and syn.iss == 0x10 and syn.iss2 == 0
    serror = esr.decode(0xFFFFFFFFBE000411)
    assert serror.sign_extended and serror.is_serror
    assert serror.aet_name == "UEU"
    assert serror.injectable_iss == 0x411


def test_bit_25_alone_is_a_full_esr_with_ec_0() -> None:
    syn = esr.decode(0x2000000)
    assert syn.form == "esr"
    assert syn.ec == 0 and syn.il
    assert not syn.is_serror


def test_forced_forms() -> None:
    syn = esr.decode(0x1811, form="esr")
    assert syn.ec == 0 and not syn.is_serror
    with pytest.raises(InvalidInput, match="not an ISS"):
        esr.decode(0xBE000011, form="iss")
    with pytest.raises(ValueError):
        esr.decode(0x11, form="full")


def test_iss2_and_res0() -> None:
    syn = esr.decode((0x5 << 32) | 0xBE000011)
    assert syn.iss2 == 5
    assert syn.injectable_iss is None
    assert any("ISS2" in n for n in syn.notes)
    with pytest.raises(InvalidInput, match=r"\[63:56\] are RES0"):
        esr.decode((1 << 60) | 0xBE000011)
    noisy = esr.decode(0x11 | (1 << 20) | (1 << 7))
    assert noisy.res0 == (1 << 20) | (1 << 7)
    assert any("RES0 bits set: bit 20, bit 7" in n for n in noisy.notes)


def test_il_zero_in_serror_esr_is_noted() -> None:
    syn = esr.decode(0xBC000011)
    assert syn.is_serror and not syn.il
    assert any("IL is 0" in n for n in syn.notes)


def test_aet_and_iesb_ignored_without_dfsc_0x11() -> None:
    syn = esr.decode(0x3800)
    assert syn.dfsc == 0 and syn.dfsc_name == "uncategorized"
    assert syn.aet is None and syn.iesb is None
    assert any("mean nothing" in n for n in syn.notes)
    assert esr.decode(0x12).dfsc_name == "reserved"


def test_decode_refuses_out_of_range() -> None:
    with pytest.raises(InvalidInput):
        esr.decode(-1)
    with pytest.raises(InvalidInput):
        esr.decode(1 << 64)


def test_as_dict_is_json_with_ints() -> None:
    d = esr.decode(0xBE003A11).as_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["iss"] == 0x3A11 and isinstance(d["iss"], int)
    assert d["ec_name"] == "SError"
    assert d["aet"] == 6 and d["aet_name"] == "CE"
    assert d["iesb"] is True and d["ea"] is True
    out = esr.predict_linux(0x411).as_dict()
    assert json.loads(json.dumps(out)) == out
    assert out["outcome"] == "panics" and out["guest_esr"] == 0xBE000411


def test_results_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        esr.decode(0x11).iss = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        esr.predict_linux(0x11).survives = True  # type: ignore[misc]
    with pytest.raises(TypeError):
        esr.PRESETS["ce"] = 0  # type: ignore[index]


# --------------------------------------------------------------------------- round trips

_fields: st.SearchStrategy[Dict[str, Any]] = st.one_of(
    st.builds(
        dict,
        aet=st.integers(0, 7),
        dfsc=st.just(0x11),
        ea=st.booleans(),
        iesb=st.booleans(),
    ),
    st.builds(
        dict,
        dfsc=st.integers(0, 0x3F).filter(lambda d: d != 0x11),
        ea=st.booleans(),
    ),
    st.builds(dict, impdef=st.integers(0, 0xFFFFFF)),
)


def _fields_of(syn: esr.Syndrome) -> Dict[str, Any]:
    if syn.ids:
        return {"impdef": syn.impdef}
    if syn.dfsc == 0x11:
        return {"aet": syn.aet, "dfsc": syn.dfsc, "ea": syn.ea, "iesb": syn.iesb}
    return {"dfsc": syn.dfsc, "ea": syn.ea}


@given(_fields)
def test_encode_decode_encode(fields: Dict[str, Any]) -> None:
    iss = esr.encode(**fields)
    assert esr.validate_injectable(iss) == iss
    syn = esr.decode(iss)
    assert _fields_of(syn) == fields
    assert esr.encode(**_fields_of(syn)) == iss
    # the same syndrome as a full ESR and as a sign-extended one
    full = esr.decode(esr.SERROR_ESR_BASE | iss)
    signext = esr.decode(0xFFFFFFFF00000000 | esr.SERROR_ESR_BASE | iss)
    for other in (full, signext):
        assert _fields_of(other) == fields
        assert other.injectable_iss == iss


@given(st.sampled_from(sorted(esr.SEVERITIES)), st.booleans(), st.booleans())
def test_severity_presets_round_trip(name: str, ea: bool, iesb: bool) -> None:
    iss = esr.encode(name.upper(), ea=ea, iesb=iesb)
    syn = esr.decode(iss)
    assert syn.aet == esr.SEVERITIES[name]
    assert syn.dfsc == 0x11 and syn.ea is ea and syn.iesb is iesb
    assert esr.predict_linux(iss).survives is (name in ("ce", "ueo"))


@given(st.integers(0, U64))
def test_validate_injectable_accepts_exactly_iss_values(value: int) -> None:
    if value <= 0x1FFFFFF:
        assert esr.validate_injectable(value) == value
    else:
        with pytest.raises(InvalidInput, match="EINVAL"):
            esr.validate_injectable(value)


@given(st.integers(0, 0x1FFFFFF))
def test_every_iss_is_accepted_and_decodes(value: int) -> None:
    assert esr.validate_injectable(value) == value
    syn = esr.decode(value)
    assert syn.form == "iss" and syn.iss == value and syn.esr == 0xBE000000 | value
    assert esr.predict_linux(value).guest_esr == 0xBE000000 | value


@given(st.integers(25, 63), st.integers(0, 0x1FFFFFF))
def test_any_bit_above_24_is_refused(bit: int, iss: int) -> None:
    with pytest.raises(InvalidInput):
        esr.validate_injectable(iss | (1 << bit))


# --------------------------------------------------------------------------- validation hints


def test_full_serror_esr_hint_suggests_the_iss() -> None:
    with pytest.raises(InvalidInput) as info:
        esr.validate_injectable(0xBE000011)
    assert "EC (bits [31:26] = 0x2f)" in info.value.message
    assert "IL (bit 25)" in info.value.message
    assert info.value.hint is not None
    assert "EC and IL are supplied by the hardware" in info.value.hint
    assert "Did you mean 0x11?" in info.value.hint
    assert info.value.exit_code == ExitCode.USAGE


def test_sign_extended_esr_hint() -> None:
    with pytest.raises(InvalidInput) as info:
        esr.validate_injectable(0xFFFFFFFFBE000411)
    assert info.value.hint is not None
    assert "sign-extended" in info.value.hint
    assert "Did you mean 0x411?" in info.value.hint


def test_other_ec_hint_does_not_suggest() -> None:
    with pytest.raises(InvalidInput) as info:
        esr.validate_injectable(0x96000010)
    assert info.value.hint is not None
    assert "Did you mean" not in info.value.hint
    assert "EC 0x25 (data abort (same EL)) is not an SError" in info.value.hint


def test_iss2_named() -> None:
    with pytest.raises(InvalidInput, match=r"ISS2 \(bits \[55:32\] = 0x1\)"):
        esr.validate_injectable(1 << 32)


def test_negative_refused() -> None:
    with pytest.raises(InvalidInput, match="negative"):
        esr.validate_injectable(-1)


# --------------------------------------------------------------------------- encoding errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"severity": "bogus"}, "unknown severity"),
        ({"severity": "ce", "aet": 1}, "not both"),
        ({"ids": True, "severity": "ce"}, "implementation-defined"),
        ({"impdef": 5, "ea": True}, "implementation-defined"),
        ({"impdef": 1 << 24}, "does not fit"),
        ({"impdef": -1}, "does not fit"),
        ({"severity": "ce", "dfsc": 0}, "only with DFSC 0x11"),
        ({"iesb": True, "dfsc": 0}, "only with DFSC 0x11"),
        ({"aet": 8}, "3 bits"),
        ({"dfsc": 0x40}, "6 bits"),
    ],
)
def test_encode_errors(kwargs: Dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        esr.encode(**kwargs)


def test_encode_defaults() -> None:
    assert esr.encode() == 0x11
    assert esr.encode(ids=True) == 0x1000000
    assert esr.encode(impdef=0xABCDEF) == 0x1ABCDEF
    assert esr.encode(dfsc=0) == 0
    assert esr.encode(dfsc=0, ea=True) == 0x200


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0x1811", 0x1811),
        ("0X1811", 0x1811),
        ("6161", 6161),
        (" 0x1811 ", 0x1811),
        ("0b1_1000_0001_0001", 0x1811),
        ("0o14021", 0x1811),
        ("0x1_abc_def", 0x1ABCDEF),
        ("0", 0),
        ("0xffffffffffffffff", U64),
    ],
)
def test_parse_int(text: str, value: int) -> None:
    assert esr.parse_int(text) == value


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("-1", "negative"),
        ("-0x11", "negative"),
        ("zz", "not a number"),
        ("0x", "not a number"),
        ("0x1g", "not a number"),
        ("1.5", "not a number"),
        ("+5", "not a number"),
        ("1__1", "not a number"),
        ("0x_", "not a number"),
        ("0011", "leading zero"),
        ("0x10000000000000000", "wider than 64 bits"),
    ],
)
def test_parse_int_errors(text: str, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        esr.parse_int(text)


def test_parse_int_width_and_name() -> None:
    with pytest.raises(InvalidInput, match=r"^bank: 256 is wider than 8 bits"):
        esr.parse_int("256", what="bank", bits=8)
    with pytest.raises(InvalidInput) as info:
        esr.parse_int("0011")
    assert info.value.hint is not None and "0x11" in info.value.hint


def test_resolve_iss() -> None:
    assert esr.resolve_iss("ce") == 0x1811
    assert esr.resolve_iss(" UER ") == 0x0C11
    assert esr.resolve_iss("0x101d1ed") == 0x101D1ED
    with pytest.raises(InvalidInput, match="EINVAL"):
        esr.resolve_iss("0xbe000011")
    with pytest.raises(InvalidInput, match="not a number"):
        esr.resolve_iss("corrected")


def test_no_ui_imports() -> None:
    code = (
        "import sys, serrinj.codec.esr, serrinj.codec.mce; "
        "bad = [m for m in ('click', 'rich') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_no_esr_on_a_host_without_ras_is_implementation_defined() -> None:
    """Seen in the arm64 lab on cortex-a57: the guest read 0xBE000000, not 0xBF000000."""
    assert esr.guest_esr(None, host_ras=False) is None
    assert esr.guest_esr(None) == 0xBF000000
    assert esr.guest_esr(0x1811, host_ras=False) == 0xBE001811
    out = esr.predict_linux(None, host_ras=False)
    assert not out.survives and out.guest_esr is None
    assert "no RAS" in out.reason
    assert out.console_line == "SError Interrupt on CPU0, code 0x"
