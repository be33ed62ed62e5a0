"""Property tests of everything that takes input from a user or a file.

The rule each property checks: any input ends in a result or in serrinj's own
:class:`~serrinj.errors.InvalidInput` (a clear "error:" and exit 2), never in
another exception, a traceback or exit 1. Decoders must also be total over
every value the kernel could hand back, and codecs must round-trip.

The command-line property drives :func:`serrinj.cli.run` with generated argv
in a world where discovery finds no VM (the seams ``discover.scan``/``find``,
``target.resolve_fd`` and the demo are replaced), so nothing can reach a real
VMM. The atheris harnesses in ``fuzz/`` run the same properties coverage-guided.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import string
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from serrinj.codec import esr, mce
from serrinj.codec.events import decode_events
from serrinj.errors import ExitCode, InvalidInput, SerrinjError, TargetNotFound, Unsupported
from serrinj.kvm import arm64 as kvm_arm64
from serrinj.kvm import x86_64 as kvm_x86
from serrinj.ops import events

U64 = (1 << 64) - 1
u64 = st.integers(0, U64)
any_int = st.integers(-(1 << 70), 1 << 70)
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
NUMBERISH = st.one_of(
    TEXT,
    u64.map(hex),
    u64.map(str),
    any_int.map(str),
    st.integers(0, U64).map(lambda v: f"0b{v:b}"),
    st.sampled_from(
        ["", " ", "0x", "0_1", "0x_1", "1__0", "00", "0o9", "-0", "0x1f_", "\uff11\uff12"]
    ),
)


def fuzz_settings(examples: int) -> Any:
    """``SERRINJ_FUZZ_EXAMPLES=N`` runs every property with N examples (a long hunt)."""
    return settings(
        max_examples=int(os.environ.get("SERRINJ_FUZZ_EXAMPLES", examples)),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


def _json_ok(obj: Any) -> None:
    json.loads(json.dumps(obj))  # plain JSON values only: no bytes, no objects


# ====================================================================== the ESR codec
@fuzz_settings(100)
@given(any_int, st.sampled_from(["auto", "iss", "esr"]))
@example(1 << 64, "auto")
@example(-1, "esr")
def test_esr_decode_is_total(value: int, form: str) -> None:
    try:
        syn = esr.decode(value, form=form)
    except InvalidInput:
        return
    d = syn.as_dict()
    _json_ok(d)
    if syn.injectable_iss is not None:
        assert esr.validate_injectable(syn.injectable_iss) == syn.injectable_iss
        _json_ok(esr.predict_linux(syn.injectable_iss).as_dict())


@fuzz_settings(100)
@given(st.integers(0, 0x1FFFFFF))
def test_iss_through_the_guest_esr_and_back(iss: int) -> None:
    full = esr.guest_esr(iss)
    assert full is not None
    back = esr.decode(full, form="esr")
    assert back.injectable_iss == iss
    assert esr.decode(iss, form="iss").injectable_iss == iss
    line = esr.predict_linux(iss).console_line
    assert line is None or f"{full:016x}" in line


@fuzz_settings(100)
@given(NUMBERISH)
def test_parse_int_and_resolve_iss_accept_or_refuse_clearly(text: str) -> None:
    for fn in (lambda t: esr.parse_int(t, what="x"), esr.resolve_iss):
        try:
            value = fn(text)
        except InvalidInput as err:
            assert err.message and "\n" not in err.message
            continue
        assert 0 <= value <= U64


@fuzz_settings(100)
@given(st.integers(0, U64), st.integers(0, 64))
def test_parse_int_round_trips_every_notation(value: int, bits: int) -> None:
    for text in (str(value), hex(value), f"0b{value:b}", f"0o{value:o}", f"{value:_}"):
        if value >> bits:
            with pytest.raises(InvalidInput):
                esr.parse_int(text, bits=bits)
        else:
            assert esr.parse_int(text, bits=bits) == value


@fuzz_settings(100)
@given(
    st.one_of(st.none(), st.sampled_from(sorted(esr.SEVERITIES)), TEXT),
    st.one_of(st.none(), st.integers(-2, 9)),
    st.one_of(st.none(), st.integers(-2, 70)),
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.one_of(st.none(), st.integers(-1, 1 << 25)),
)
def test_esr_encode_builds_an_injectable_iss_or_refuses(
    severity: Optional[str],
    aet: Optional[int],
    dfsc: Optional[int],
    ea: bool,
    iesb: bool,
    ids: bool,
    impdef: Optional[int],
) -> None:
    try:
        iss = esr.encode(severity, aet=aet, dfsc=dfsc, ea=ea, iesb=iesb, ids=ids, impdef=impdef)
    except InvalidInput:
        return
    assert esr.validate_injectable(iss) == iss
    assert esr.decode(iss, form="iss").injectable_iss == iss


# ====================================================================== the MCE codec
@fuzz_settings(100)
@given(u64)
def test_mca_status_decode_is_total_and_round_trips(status: int) -> None:
    decoded = mce.decode_status(status)
    _json_ok(decoded.as_dict())
    assert isinstance(mce.classify(status), str)
    mce.decode_mcg_status(status)
    mce.decode_mcg_cap(status)


# ====================================================================== the events codecs
@fuzz_settings(100)
@given(st.binary(min_size=64, max_size=64), st.one_of(st.none(), u64))
def test_arm64_events_decode_is_total_over_what_kvm_returns(
    raw: bytes, pstate: Optional[int]
) -> None:
    """Every GET KVM can return decodes (its SError ESR is at most ISS bits [24:0]);
    any other 64 bytes (a hand-made file) decode or are InvalidInput."""
    ev = kvm_arm64.VcpuEvents.unpack(raw)
    assert ev.pack() == raw
    try:
        _json_ok(decode_events("aarch64", ev, pstate))
    except InvalidInput:
        assert ev.serror_pending and ev.serror_esr > kvm_arm64.SERROR_ESR_ACCEPTED_MASK
    from dataclasses import replace

    from_kvm = replace(ev, serror_esr=ev.serror_esr & kvm_arm64.SERROR_ESR_ACCEPTED_MASK)
    _json_ok(decode_events("aarch64", from_kvm, pstate))


@fuzz_settings(100)
@given(st.binary(min_size=64, max_size=64))
def test_x86_events_decode_is_total(raw: bytes) -> None:
    ev = kvm_x86.VcpuEvents.unpack(raw)
    assert ev.pack() == raw
    _json_ok(decode_events("x86_64", ev))
    _json_ok(ev.with_nmi_pending().as_dict())


@fuzz_settings(100)
@given(st.binary(max_size=80).filter(lambda b: len(b) != 64))
def test_events_of_the_wrong_size_are_a_value_error(raw: bytes) -> None:
    for cls in (kvm_arm64.VcpuEvents, kvm_x86.VcpuEvents):
        with pytest.raises(ValueError):
            cls.unpack(raw)


# ====================================================================== the events file
def _snapshot(arch: str, raws: List[bytes], pstates: List[Optional[int]]) -> events.Snapshot:
    vcpus = [events.SavedVcpu(i, raw, p) for i, (raw, p) in enumerate(zip(raws, pstates))]
    return events.Snapshot(arch, vcpus, {"KVM_CAP_VCPU_EVENTS": 1}, {"pid": 1}, "now")


@st.composite
def snapshots(draw: Any) -> events.Snapshot:
    arch = draw(st.sampled_from(["aarch64", "x86_64"]))
    n = draw(st.integers(1, 4))
    raws = draw(st.lists(st.binary(min_size=64, max_size=64), min_size=n, max_size=n))
    if arch == "aarch64":
        # KVM's own GET only reports ESRs that decode; a file can hold anything
        pst = draw(st.lists(st.one_of(st.none(), st.integers(0, U64)), min_size=n, max_size=n))
    else:
        pst = [None] * n
    return _snapshot(arch, raws, pst)


@fuzz_settings(100)
@given(snapshots())
def test_events_file_round_trips_or_is_refused_on_save(snap: events.Snapshot) -> None:
    try:
        text = snap.dumps()
    except InvalidInput:
        return  # a raw value the decoder refuses to describe: never written
    back = events.parse(text, "f.json")
    assert back.arch == snap.arch
    assert [(v.vcpu_id, v.raw, v.pstate) for v in back.vcpus] == [
        (v.vcpu_id, v.raw, v.pstate) for v in snap.vcpus
    ]


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats() | TEXT,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(TEXT, kids, max_size=4),
    max_leaves=20,
)


@fuzz_settings(100)
@given(
    st.one_of(
        TEXT, st.binary(max_size=200).map(lambda b: b.decode("latin-1")), JSON.map(json.dumps)
    )
)
def test_events_parse_of_anything_is_a_snapshot_or_invalid_input(text: str) -> None:
    try:
        snap = events.parse(text, "f.json")
    except InvalidInput as err:
        assert err.message.startswith("f.json")
        return
    snap.dumps()  # what loads can be shown and saved again


@pytest.mark.parametrize("host", ['{"caps": null}', '{"caps": [1]}', "7", '{"caps": {"a": "b"}}'])
def test_events_file_with_odd_informative_host_caps_still_loads(host: str) -> None:
    """Found by the property above: "caps": null was an internal error (exit 1)."""
    raw = kvm_x86.VcpuEvents().pack().hex()
    text = f'{{"schema": "{events.SCHEMA}", "arch": "x86_64", "host": {host},'
    text += f' "vcpus": [{{"vcpu_id": 0, "raw": "{raw}"}}]}}'
    assert events.parse(text, "f.json").caps == {}


def test_events_file_with_an_esr_kvm_would_refuse_is_refused_by_key() -> None:
    """Found by fuzz/harness.py (atheris): without a "decoded" to compare, a raw
    pending SError whose ESR has bits above the ISS was loaded, and failed later."""
    raw = kvm_arm64.VcpuEvents(serror_pending=1, serror_has_esr=1, serror_esr=1 << 57).pack()
    doc = {"schema": events.SCHEMA, "arch": "aarch64", "vcpus": [{"vcpu_id": 0, "raw": raw.hex()}]}
    with pytest.raises(InvalidInput, match=r"^f.json: vcpus\[0\].raw: .* is not an ISS"):
        events.parse(json.dumps(doc), "f.json")


@st.composite
def mutated_events_files(draw: Any) -> str:
    """A valid file with one value replaced by something else."""
    snap = draw(snapshots())
    try:
        doc = json.loads(snap.dumps())
    except InvalidInput:
        doc = {"schema": events.SCHEMA, "arch": snap.arch, "vcpus": [{"vcpu_id": 0}]}
    paths: List[Tuple[Any, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                paths.append((node, k))
                walk(v)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                paths.append((node, i))
                walk(v)

    walk(doc)
    parent, key = draw(st.sampled_from(paths))
    if draw(st.booleans()) and isinstance(parent, dict):
        del parent[key]
    else:
        parent[key] = draw(JSON)
    return json.dumps(doc)


@fuzz_settings(100)
@given(mutated_events_files())
def test_events_parse_of_a_mutated_file_names_the_key_or_loads(text: str) -> None:
    try:
        snap = events.parse(text, "f.json")
    except InvalidInput as err:
        assert err.message.startswith("f.json: ")
        return
    snap.dumps()


# ====================================================================== campaign files
TOML_TOKENS = st.sampled_from(
    [
        # the format's own tables and keys (examples/README.md), so that most
        # inputs get past the TOML layer into step validation
        "[campaign]\n", "[target]\n", "[[steps]]\n", "name = ", "description = ",
        "on_failure = ", '"stop"', '"continue"', "arch = ", '"x86_64"', '"aarch64"', "log = ",
        "pid = ", "pid_file = ", "inject = ", '"nmi"', '"mce"', '"serror"', '"ext-dabt"',
        "vcpus = ", '"all"', "[0, 1]", "wait = ", "repeat = ", "interval = ", "dry_run = ",
        "esr = ", '"0x1811"', '"uer"', "severity = ", '"ce"', '"uc"', "force = ", "bank = ",
        "preset = ", '"srao"', "status = ", '"val,uc,en"', "mcg_status = ", "addr = ",
        "misc = ", "mmio_addr = ", "mmio_timeout = ", "expect = ", '"delivered"', '"log"',
        "match = ", "'^mce'", "'('", "absent = ", "since = ", '"start"', "timeout = ",
        "pause = ", "seconds = ",
        # keys and tables the format does not have, and TOML noise
        "[[step]]\n", "kind = ", "fault = ", "pattern = ", "vcpu = ",
        "1", "0x10", "-3", "1.5", "true", "[1, 2]", '"x"', "{ a = 1 }", "\n", " ", "=", "#",
        "'''", '"""', "[", "]", ".", ",", "\\", "é",
    ]
)  # fmt: skip


@fuzz_settings(100)
@given(st.one_of(TEXT, st.lists(TOML_TOKENS, max_size=40).map("".join)))
def test_campaign_loader_refuses_clearly(text: str) -> None:
    from serrinj import campaign

    try:
        campaign.loads(text, "c.toml")
    except InvalidInput as err:
        # every refusal says where: the file, and the line when there is one
        assert err.message.startswith("c.toml"), err.message
        assert "Traceback" not in err.message


CAMPAIGN_KEYS = [
    "name", "description", "on_failure", "arch", "log", "pid", "pid_file", "inject", "vcpus",
    "wait", "repeat", "interval", "dry_run", "esr", "severity", "force", "bank", "preset",
    "status", "mcg_status", "addr", "misc", "mmio_addr", "mmio_timeout", "expect", "match",
    "absent", "since", "timeout", "pause", "seconds", "kind", "vcpu",
]  # fmt: skip
TOML_VALUES = st.sampled_from(
    [
        '"nmi"', '"mce"', '"serror"', '"ext-dabt"', '"delivered"', '"log"', '"all"', '"stop"',
        '"continue"', '"x86_64"', '"aarch64"', '"ce"', '"uer"', '"srao"', '"val,uc,en"',
        '"0x1811"', '"start"', "'^mce'", "'('", '""', "0", "1", "2", "-1", "0x2000011", "0.2",
        "1e9", "true", "false", "[0]", "[0, 1]", "[]", '["val", "uc"]', "[1, \"a\"]",
        "{ a = 1 }", "1979-05-27",
    ]
)  # fmt: skip


@st.composite
def campaign_documents(draw: Any) -> str:
    """Well-formed TOML in the campaign's shape with arbitrary keys and values: it
    gets past the TOML layer, so the step checks themselves are exercised."""
    lines: List[str] = []
    tables = [t for t in ("[campaign]", "[target]") if draw(st.booleans())]
    tables += ["[[steps]]"] * draw(st.integers(0, 4))
    for table in tables:
        lines.append(table)
        if table == "[[steps]]" and draw(st.integers(0, 3)):  # usually what a step does
            what = draw(st.sampled_from(["inject", "expect", "wait", "pause"]))
            lines.append(f"{what} = {draw(TOML_VALUES)}")
        keys = draw(st.lists(st.sampled_from(CAMPAIGN_KEYS), max_size=5, unique=True))
        lines += [f"{k} = {draw(TOML_VALUES)}" for k in keys]
    return "\n".join(lines) + "\n"


@fuzz_settings(300)
@given(campaign_documents())
def test_campaign_steps_refuse_clearly_or_load(text: str) -> None:
    from serrinj import campaign

    try:
        camp = campaign.loads(text, "c.toml")
    except InvalidInput as err:
        # a step problem names the line and the key (or says what is missing)
        assert re.match(r"c\.toml:\d+(:\d+)?: ", err.message), err.message
        return
    assert camp.steps


# ====================================================================== the command line
COMMANDS = [
    ["list"], ["status"], ["inject"], ["mce"], ["nmi"], ["esr", "decode"], ["esr", "encode"],
    ["esr"], ["events", "save"], ["events", "load"], ["events"], ["run"], ["demo"], [],
    ["bogus"],
]  # fmt: skip
OPTION_VALUES: Dict[str, Any] = {
    "--pid": st.one_of(st.integers(-5, 1 << 40).map(str), TEXT),
    "--name": TEXT,
    "--fd": st.one_of(st.integers(-3, 1 << 33).map(str), TEXT),
    "--vcpu": st.one_of(st.sampled_from(["all", "0", "1", "-1", "0x1", "99"]), TEXT),
    "--bank": st.one_of(st.integers(-3, 300).map(str), TEXT),
    "--status": st.one_of(NUMBERISH, st.sampled_from(["val,uc,en", "val,bogus", ",", "VAL"])),
    "--addr": NUMBERISH,
    "--misc": NUMBERISH,
    "--mcg-status": st.one_of(NUMBERISH, st.sampled_from(["ripv,mcip", "eipv", "x"])),
    "--preset": st.one_of(st.sampled_from([*mce.PRESETS, "uc", "fatal", "CE"]), TEXT),
    "--esr": NUMBERISH,
    "--severity": st.one_of(st.sampled_from(sorted(esr.SEVERITIES)), TEXT),
    "--wait": st.one_of(st.sampled_from(["0", "-1", "0.5", "nan", "inf", "1e400"]), TEXT),
    "--mmio-addr": NUMBERISH,
    "--mmio-timeout": st.one_of(st.sampled_from(["0", "-2", "nan", "3"]), TEXT),
    "--form": st.one_of(st.sampled_from(["auto", "iss", "esr"]), TEXT),
    "--aet": st.one_of(st.integers(-2, 9).map(str), TEXT),
    "--dfsc": NUMBERISH,
    "--impdef": NUMBERISH,
    "--arch": st.one_of(st.sampled_from(["auto", "x86_64", "aarch64"]), TEXT),
    "--color": st.one_of(st.sampled_from(["auto", "always", "never"]), TEXT),
    "--lock-wait": st.one_of(st.sampled_from(["0", "-1", "0.1", "x"]), TEXT),
    "--pid-file": st.just("/nonexistent/serrinj-fuzz.pid"),
    "--log": st.just("/nonexistent/serrinj-fuzz.log"),
}
FLAGS = ["--json", "--dry-run", "--force", "--ext-dabt", "--probe", "--ids", "--ea", "--iesb",
         "--check-only", "--help", "-h", "--version", "--", "-", "--bogus"]  # fmt: skip


@st.composite
def argvs(draw: Any) -> List[str]:
    argv = list(draw(st.sampled_from(COMMANDS)))
    for _ in range(draw(st.integers(0, 6))):
        choice = draw(st.integers(0, 3))
        if choice == 0:
            argv.append(draw(st.sampled_from(FLAGS)))
        elif choice == 1:
            opt = draw(st.sampled_from(sorted(OPTION_VALUES)))
            argv += [opt, draw(OPTION_VALUES[opt])]
        elif choice == 2:
            opt = draw(st.sampled_from(sorted(OPTION_VALUES)))
            argv.append(f"{opt}={draw(OPTION_VALUES[opt])}")
        else:
            argv.append(draw(st.one_of(NUMBERISH, st.just("/nonexistent/serrinj-fuzz.toml"))))
    return argv


DOCUMENTED = {int(c) for c in ExitCode} - {ExitCode.ERROR}


@pytest.fixture(scope="module")
def no_vm_world() -> Iterator[None]:
    """Discovery finds no VM and no fd can be resolved: nothing reaches a VMM."""
    from serrinj.ops import audit, demo, guard
    from serrinj.target import attach as target
    from serrinj.target import discover

    mp = pytest.MonkeyPatch()

    def no_vm(pid: Optional[int] = None, name: Optional[str] = None) -> Any:
        raise TargetNotFound("no VM (fuzzing)")

    def no_fd(fd: int, pid: Optional[int] = None) -> Any:
        raise TargetNotFound("no fd (fuzzing)")

    def no_demo(*args: Any, **kwargs: Any) -> Any:
        raise Unsupported("no demo (fuzzing)")

    mp.setattr(discover, "scan", lambda arch=None: [])
    mp.setattr(discover, "find", no_vm)
    mp.setattr(discover, "hidden", lambda: ())
    mp.setattr(target, "resolve_fd", no_fd)
    mp.setattr(demo, "run", no_demo)
    mp.setattr(audit, "_syslog", None)  # refusals are audited: keep them out of syslog
    mp.setattr(guard, "LOCK_WAIT", guard.LOCK_WAIT)  # --lock-wait sets it
    try:
        yield
    finally:
        mp.undo()


@fuzz_settings(400)
@given(argvs())
def test_any_argv_is_a_clear_result_never_a_traceback(no_vm_world: None, argv: List[str]) -> None:
    from serrinj import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.run(argv)
    stdout, stderr = out.getvalue(), re.sub(r"\x1b\[[0-9;]*m", "", err.getvalue())  # --color
    assert rc in DOCUMENTED, (argv, rc, stderr)
    assert "Traceback" not in stderr and "internal error" not in stderr, (argv, stderr)
    if rc != 0:
        # a group without its command shows its help (click: "no args is help")
        first = next((x for x in stderr.splitlines() if x.strip()), "")
        shown_help = not stderr.strip() and stdout.startswith("Usage: ")
        assert first.startswith(("error: ", "Usage: ")) or shown_help, (argv, rc, stderr)
        if "--json" in argv and stdout.strip() and "--" not in argv:
            doc = json.loads(stdout)
            assert doc["schema"] == "serrinj/1", (argv, stdout)


@fuzz_settings(100)
@given(st.lists(st.sampled_from(string.printable), max_size=30).map("".join))
def test_esr_decode_command_on_any_text(no_vm_world: None, text: str) -> None:
    from serrinj import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.run(["esr", "decode", "--json", "--", text])
    assert rc in (0, ExitCode.USAGE), (text, err.getvalue())
    doc = json.loads(out.getvalue())
    assert ("error" in doc) == (rc != 0)


def test_the_fuzzed_world_is_really_empty(no_vm_world: None) -> None:
    """The seams hold: an injection with a real-looking pid ends in 'no VM'."""
    from serrinj import cli

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = cli.run(["nmi", "--pid", str(os.getpid()), "--vcpu", "0"])
    assert rc == ExitCode.NOT_FOUND and "fuzzing" in err.getvalue()


def test_serrinj_errors_all_map_to_documented_codes() -> None:
    def subclasses(cls: type) -> List[type]:
        out = [cls]
        for sub in cls.__subclasses__():
            out += subclasses(sub)
        return out

    for cls in subclasses(SerrinjError):
        assert int(cls.exit_code) in {int(c) for c in ExitCode}, cls
