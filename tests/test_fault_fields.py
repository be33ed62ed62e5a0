"""One parser per fault: each command-line form of each fault, written as a campaign step,
gives the very same request, and what one front end refuses the other refuses too.

The command line runs for real (``cli.run``) up to the use case, which is replaced by a
recorder; the campaign text goes through ``campaign.loads``. Pure: no VM.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import pytest

from serrinj import campaign, cli, faults
from serrinj.errors import ExitCode, InvalidInput
from serrinj.faults import fields
from serrinj.ops import inject

#: (command, its options): every option of every fault command, alone and combined
CLI_FORMS: List[Tuple[str, Sequence[str]]] = [
    ("inject", []),
    ("inject", ["--esr", "0x1811"]),
    ("inject", ["--esr", "6161"]),
    ("inject", ["--esr", "0b1_1000_0001_0001"]),
    ("inject", ["--esr", "ce"]),
    ("inject", ["--esr", "UER"]),
    ("inject", ["--severity", "uer"]),
    ("inject", ["--severity", "ueo", "--force"]),
    ("inject", ["--force"]),
    ("inject", ["--ext-dabt"]),
    ("inject", ["--ext-dabt", "--mmio-addr", "0x9000000"]),
    ("inject", ["--ext-dabt", "--mmio-timeout", "1.5"]),
    ("inject", ["--ext-dabt", "--mmio-addr", "4096", "--mmio-timeout", "2"]),
    ("mce", ["--bank", "1", "--status", "0xBD00000000000134"]),
    ("mce", ["--bank", "1", "--status", "0xbd00_0000_0000_0134", "--addr", "0x1234000"]),
    ("mce", ["--bank", "1", "--status", "val,uc,en,addrv", "--mcg-status", "mcip,eipv"]),
    ("mce", ["--bank", "4", "--preset", "srar", "--addr", "0x1000", "--force"]),
    ("mce", ["--bank", "0", "--preset", "ce", "--misc", "0x86"]),
    ("mce", ["--bank", "2", "--preset", "SRAO", "--status", "0x9c00000000000134"]),
    ("mce", ["--bank", "3", "--preset", "uc-fatal", "--mcg-status", "5"]),
    ("mce", ["--bank", "31", "--preset", "corrected"]),
    ("nmi", []),
]

#: forms both front ends must refuse (each with a word of the reason)
REFUSED: List[Tuple[str, Sequence[str], str]] = [
    ("inject", ["--esr", "0x1811", "--severity", "ce"], "not both"),
    ("inject", ["--esr", "0xbe001811"], "has EC"),
    ("inject", ["--esr", "0011"], "leading zero"),
    ("inject", ["--ext-dabt", "--mmio-timeout", "0"], "positive"),
    ("inject", ["--ext-dabt", "--mmio-addr", "0xfoo"], "not a number"),
    ("mce", ["--bank", "1", "--status", "val,bogus"], "unknown flag 'bogus'"),
    ("mce", ["--bank", "1", "--status", "0x1000"], "lacks VAL"),
    ("mce", ["--bank", "1", "--mcg-status", "ripv,mcipp", "--preset", "ce"], "did you mean"),
    ("mce", ["--bank", "32", "--preset", "ce"], "bank 32 does not exist"),
    ("mce", ["--bank", "1"], "preset"),
    ("mce", ["--preset", "srao"], "bank"),
]

_USE_CASES = ("inject_serror", "inject_ext_dabt", "inject_mce", "inject_nmi")
_FLAGS = ("--force", "--ext-dabt")


@pytest.fixture
def requests_of_cli(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Run a command line; return the request its use case received (``None`` if refused)."""
    got: List[Any] = []

    def record(tgt: Any, *args: Any, **kw: Any) -> List[Any]:
        got.append(args[0] if args and isinstance(args[0], faults.Fault) else faults.Nmi())
        return []

    for name in _USE_CASES:
        monkeypatch.setattr(inject, name, record)
    monkeypatch.setattr(cli, "_resolve_injection_target", lambda *a: None)

    def run(command: str, args: Sequence[str]) -> Tuple[int, Optional[faults.Fault]]:
        got.clear()
        rc = cli.run([command, "--json", *args])
        return rc, (got[0] if got else None)

    return run


def campaign_step(command: str, args: Sequence[str], *, native: bool) -> str:
    """The ``[[steps]]`` table that says what ``serrinj COMMAND ARGS`` says.

    Values go in as the command line gave them (TOML strings); ``native`` writes the
    numbers as TOML integers instead, where TOML can hold them.
    """
    kind = {"mce": "mce", "nmi": "nmi"}.get(
        command, "ext-dabt" if "--ext-dabt" in args else "serror"
    )
    lines = [f'inject = "{kind}"']
    it = iter(args)
    for opt in it:
        if opt == "--ext-dabt":
            continue
        key = opt[2:].replace("-", "_")
        if opt in _FLAGS:
            lines.append(f"{key} = true")
            continue
        value = next(it)
        if key in ("bank", "mmio_timeout") or (native and _toml_int(value)):
            lines.append(f"{key} = {value}")
        else:
            lines.append(f"{key} = {value!r}".replace("'", '"'))
    return "[[steps]]\n" + "\n".join(lines) + "\n"


def _toml_int(text: str) -> bool:
    try:
        return 0 <= int(text, 0) < 1 << 63 and not text.startswith("0b1_")
    except ValueError:
        return False


def _ident(value: object) -> str:
    return value if isinstance(value, str) else " ".join(map(str, value))  # type: ignore[call-overload]


def request_of_campaign(text: str) -> faults.Fault:
    step = campaign.loads(text, "c.toml").steps[0]
    assert isinstance(step, campaign.InjectStep)
    assert isinstance(step.request, faults.Fault)
    return step.request


@pytest.mark.parametrize("native", [False, True], ids=["as-text", "as-toml-values"])
@pytest.mark.parametrize(
    ("command", "args"), CLI_FORMS, ids=lambda v: v if isinstance(v, str) else " ".join(v)
)
def test_each_cli_form_gives_the_same_request_in_a_campaign(
    requests_of_cli: Any, command: str, args: Sequence[str], native: bool
) -> None:
    rc, from_cli = requests_of_cli(command, args)
    assert rc == 0 and from_cli is not None, (command, args, rc)
    text = campaign_step(command, args, native=native)
    assert request_of_campaign(text) == from_cli, text


@pytest.mark.parametrize(("command", "args", "words"), REFUSED, ids=lambda v: str(v))
def test_what_the_cli_refuses_a_campaign_refuses(
    requests_of_cli: Any,
    capsys: pytest.CaptureFixture[str],
    command: str,
    args: Sequence[str],
    words: str,
) -> None:
    rc, from_cli = requests_of_cli(command, args)
    out = capsys.readouterr()
    assert (rc, from_cli) == (ExitCode.USAGE, None), (args, out)
    assert words in out.out + out.err, (args, out)
    text = campaign_step(command, args, native=False)
    with pytest.raises(campaign.CampaignError) as info:
        campaign.loads(text, "c.toml")
    assert words in str(info.value) or any(words in str(p) for p in info.value.problems), text


def test_the_measured_divergence_is_gone() -> None:
    """``serrinj mce --status 0xBD00000000000134`` worked while the same value in a
    campaign file was refused as an unknown flag."""
    text = '[[steps]]\ninject = "mce"\nbank = 1\nstatus = "0xBD00000000000134"\n'
    assert request_of_campaign(text).mce.status == 0xBD00000000000134  # type: ignore[attr-defined]


def test_a_field_names_itself_as_each_front_end_spells_it() -> None:
    data: Dict[str, object] = {"bank": 1, "preset": "ce", "mcg_status": "ripv,bogus"}
    with pytest.raises(fields.FieldErrors) as info:
        faults.MachineCheck.from_fields(data)
    (problem,) = info.value.problems
    assert problem.field == "mcg_status"
    assert problem.render(cli=True).startswith("--mcg-status: unknown flag 'bogus'")
    assert problem.render(cli=False).startswith("unknown flag 'bogus'")
    with pytest.raises(InvalidInput, match="give either --esr or --severity, not both"):
        faults.SError.from_fields({"esr": 0x11, "severity": "ce"})


def test_every_fault_kind_lists_the_fields_it_reads() -> None:
    """A campaign key is accepted for a kind exactly when its from_fields reads it."""
    assert set(faults.KINDS) == {"serror", "ext-dabt", "mce", "nmi"}
    for kind, fault in faults.KINDS.items():
        for key in fault.fields:
            step = f'[[steps]]\ninject = "{kind}"\n{key} = []\n'
            with pytest.raises(campaign.CampaignError) as info:
                campaign.loads(step, "c.toml")
            assert "does not apply" not in str(info.value.problems), (kind, key)
