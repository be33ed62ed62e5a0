"""Campaigns: the file format's checks (pure), and real runs against the test VM on KVM.

The real runs use the built-in test VM in its own process with its stdout
(one JSON event per line) going to a file, the way QEMU's ``-serial
file:LOG`` puts a guest's console in a file; log expectations read it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from typing import IO, Any, Callable, Dict, Iterator, List, Optional

import pytest
import xmlschema

from serrinj import campaign
from serrinj.campaign import (
    CampaignError,
    ExpectStep,
    InjectStep,
    PauseStep,
    Progress,
    TargetOverride,
    WaitStep,
)
from serrinj.codec import esr, mce
from serrinj.errors import ExitCode, InvalidInput, TargetNotFound
from tests.helpers import serrinj_cli

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
EXAMPLES = os.path.join(ROOT, "examples")
XSD = os.path.join(HERE, "data", "junit", "junit-10.xsd")
EXAMPLE_FILES = sorted(f for f in os.listdir(EXAMPLES) if f.endswith(".toml"))
X86 = os.uname().machine == "x86_64"


# ====================================================================== the logged test VM
class LoggedVm:
    """``python -m serrinj.testvm`` with its event lines in ``log_path``.

    Ended by pid only (quit command, then SIGTERM, then SIGKILL) and reaped;
    its files are closed even when starting fails.
    """

    def __init__(self, directory: str, vcpus: int = 2, mode: str = "halt") -> None:
        self.log_path = os.path.join(directory, "guest.log")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed by stop)
        self._err = open(os.path.join(directory, "vmm.stderr"), "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serrinj.testvm", "--vcpus", str(vcpus), "--mode", mode],
            stdin=subprocess.PIPE,
            stdout=self._log,
            stderr=self._err,
            close_fds=True,
        )
        try:
            self.wait_for(lambda e: e.get("event") == "guest-ready", count=vcpus, timeout=30)
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def events(self) -> List[Dict[str, Any]]:
        with open(self.log_path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def wait_for(
        self, pred: Callable[[Dict[str, Any]], bool], count: int = 1, timeout: float = 10.0
    ) -> List[Dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.events() if pred(e)]
            if len(found) >= count:
                return found
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"test VM: {len(found)} of {count} events after {timeout} s"
                    f" (returncode {self.proc.poll()}); last: {self.events()[-5:]}"
                )
            time.sleep(0.02)

    def command(self, cmd: Dict[str, Any]) -> None:
        stdin = self.proc.stdin
        assert stdin is not None
        stdin.write((json.dumps(cmd) + "\n").encode())
        stdin.flush()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        try:
            if self.proc.poll() is None:
                try:
                    self.command({"cmd": "quit"})
                    self.proc.wait(5)
                except (OSError, subprocess.TimeoutExpired):
                    self.proc.terminate()
                    try:
                        self.proc.wait(5)
                    except subprocess.TimeoutExpired:
                        self.proc.kill()
                        self.proc.wait(5)
        finally:
            stream: Optional[IO[bytes]]
            for stream in (self.proc.stdin, self._log, self._err):
                if stream is not None:
                    stream.close()

    def __enter__(self) -> LoggedVm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture
def vm(tmp_path: Any) -> Iterator[LoggedVm]:
    with LoggedVm(str(tmp_path), vcpus=2) as proc:
        yield proc


@pytest.fixture(scope="module")
def schema() -> xmlschema.XMLSchema:
    return xmlschema.XMLSchema(XSD)


def audit_records() -> List[Dict[str, Any]]:
    path = os.environ["SERRINJ_AUDIT_LOG"]
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write(tmp_path: Any, text: str, name: str = "c.toml") -> str:
    path = os.path.join(str(tmp_path), name)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def problems(text: str, **kw: Any) -> List[str]:
    with pytest.raises(CampaignError) as info:
        campaign.loads(text, "c.toml", **kw)
    return [str(p) for p in info.value.problems]


def one_problem(text: str, **kw: Any) -> str:
    found = problems(text, **kw)
    assert len(found) == 1, found
    return found[0]


# ====================================================================== the examples
@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_examples_are_valid_for_their_arch_and_refused_for_the_other(name: str) -> None:
    path = os.path.join(EXAMPLES, name)
    c = campaign.load(path)
    assert c.arch in ("x86_64", "aarch64")
    assert c.steps and c.description
    campaign.load(path, arch=c.arch)
    campaign.check_arch(c, c.arch)
    other = "aarch64" if c.arch == "x86_64" else "x86_64"
    with pytest.raises(CampaignError) as info:
        campaign.load(path, arch=other)
    first = next(s for s in c.steps if isinstance(s, InjectStep))
    assert str(info.value.problems[0]).startswith(
        f"{path}:{first.key_line('inject')}: key 'steps[{first.number}].inject':"
    )
    assert f"needs an {c.arch} VM; this is an {other} VM" in str(info.value)
    with pytest.raises(CampaignError):
        campaign.check_arch(c, "arm64" if other == "aarch64" else other)


def test_the_examples_are_the_three_the_docs_name() -> None:
    assert EXAMPLE_FILES == ["arm64-masked-serror.toml", "arm64-ras.toml", "x86-smoke.toml"]
    with open(os.path.join(EXAMPLES, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    for name in EXAMPLE_FILES:
        assert name in readme


def test_arm64_examples_say_what_they_inject() -> None:
    ras = campaign.load(os.path.join(EXAMPLES, "arm64-ras.toml"))
    injects = [s for s in ras.steps if isinstance(s, InjectStep)]
    assert [s.request.esr for s in injects] == [esr.PRESETS["ce"], esr.PRESETS["uer"]]
    assert esr.predict_linux(esr.PRESETS["ce"]).survives
    assert not esr.predict_linux(esr.PRESETS["uer"]).survives
    masked = campaign.load(os.path.join(EXAMPLES, "arm64-masked-serror.toml"))
    kinds = [s.label().split(" (")[0] for s in masked.steps]
    assert kinds[1:] == [
        "inject serror",
        "expect pending",
        "pause until /tmp/masked.go",
        "expect delivered",
        "expect log /serror cpu=0 esr=0x0*be001811/",
    ]


# ====================================================================== the file format
MINIMAL = '[[steps]]\ninject = "nmi"\n'


def test_a_minimal_campaign() -> None:
    c = campaign.loads(MINIMAL, "/srv/lab/smoke.toml")
    assert c.name == "smoke" and c.on_failure == "stop" and c.arch == "x86_64"
    (step,) = c.steps
    assert isinstance(step, InjectStep)
    assert (step.number, step.line, step.fault, step.vcpus, step.wait) == (1, 1, "nmi", None, None)
    assert (step.repeat, step.interval, step.dry_run) == (1, 0.0, False)


def test_unknown_key_names_line_key_and_suggestion() -> None:
    text = (
        "[campaign]\n"
        'name = "x"\n'
        "[[steps]]\n"
        'inject = "nmi"\n'
        "[[steps]]\n"
        "wait = 1\n"
        "[[steps]]\n"
        'inject = "serror"\n'
        'sevrity = "ce"\n'
    )
    assert one_problem(text) == (
        "c.toml:9: key 'steps[3].sevrity': unknown key (did you mean 'severity'?)"
    )


def test_every_problem_is_reported_at_once_in_line_order() -> None:
    text = (
        "[campaign]\n"  # 1
        "nme = 'x'\n"  # 2
        "on_failure = 'later'\n"  # 3
        "[target]\n"  # 4
        "pid = 0\n"  # 5
        "[[steps]]\n"  # 6
        "inject = 'serror'\n"  # 7
        "esr = 0x2000000\n"  # 8
        "[[steps]]\n"  # 9
        "inject = 'mce'\n"  # 10
        "preset = 'srao2'\n"  # 11
        "bank = 1\n"  # 12
        "[[steps]]\n"  # 13
        "repeat = '3'\n"  # 14
        "wait = 1\n"  # 15
        "[[step]]\n"  # 16
        "wait = 1\n"  # 17
    )
    found = problems(text)
    assert [p.split(": ")[0] for p in found] == [
        "c.toml:2",
        "c.toml:3",
        "c.toml:5",
        "c.toml:8",
        "c.toml:11",
        "c.toml:14",
        "c.toml:16",
    ]
    assert found[0].endswith("key 'campaign.nme': unknown key (did you mean 'name'?)")
    assert "key 'campaign.on_failure': 'later' is not one of 'stop', 'continue'" in found[1]
    assert "key 'target.pid': 0 is out of range: it must be at least 1" in found[2]
    assert "key 'steps[1].esr': syndrome 0x2000000 has IL (bit 25) set" in found[3]
    assert "key 'steps[2].preset': unknown machine-check preset 'srao2'" in found[4]
    assert "key 'steps[3].repeat': must be an integer, not a string ('3')" in found[5]
    assert "key 'step': unknown key (did you mean 'steps'?)" in found[6]
    with pytest.raises(InvalidInput) as info:
        campaign.loads(text, "c.toml")
    assert info.value.exit_code == ExitCode.USAGE
    assert info.value.hint == "7 problems; nothing was injected"


@pytest.mark.parametrize(
    ("step", "line", "message"),
    [
        ('inject = "nmi"\nesr = 1', 3, "key 'steps[1].esr': 'esr' does not apply to an inject = 'nmi' step"),  # noqa: E501
        ('inject = "nmy"', 2, "key 'steps[1].inject': 'nmy' is not one of 'serror', 'ext-dabt', 'mce', 'nmi' (did you mean 'nmi'?)"),  # noqa: E501
        ('inject = "serror"\nesr = 0x1ffffff\nseverity = "ce"', 4, "key 'steps[1].severity': give either esr or severity, not both"),  # noqa: E501
        ('inject = "serror"\nseverity = "fatal"', 3, "key 'steps[1].severity': 'fatal' is not one of"),  # noqa: E501
        ('inject = "serror"\nesr = "0xbe001811"', 3, "key 'steps[1].esr': syndrome 0xbe001811 has EC"),  # noqa: E501
        ('inject = "serror"\nesr = 1.5', 3, "key 'steps[1].esr': must be a number or a severity name, not a float (1.5)"),  # noqa: E501
        ('inject = "mce"\npreset = "srao"', 1, "key 'steps[1]': an mce step needs 'bank'"),
        ('inject = "mce"\nbank = 1', 1, "key 'steps[1]': an mce step needs 'preset' or 'status'"),
        ('inject = "mce"\nbank = 32\npreset = "srao"', 3, "key 'steps[1].bank': bank 32 does not exist: KVM gives a vCPU at most 32 banks"),  # noqa: E501
        ('inject = "mce"\nbank = 1\nstatus = 0x1000', 4, "key 'steps[1].status': MCi_STATUS 0x0000000000001000 lacks VAL"),  # noqa: E501
        ('inject = "mce"\nbank = 1\nstatus = "val,uc,enn"', 4, "key 'steps[1].status': unknown flag 'enn' (did you mean 'en'?)"),  # noqa: E501
        ('inject = "mce"\nbank = 1\nstatus = 7', 4, "lacks VAL"),
        ('inject = "mce"\nbank = 1\npreset = "corrected"\nmcg_status = ["ripv", "mcipp"]', 5, "unknown flag 'mcipp' (did you mean 'mcip'?)"),  # noqa: E501
        ('inject = "nmi"\nvcpus = -1', 3, "key 'steps[1].vcpus': vCPU id -1 is negative"),
        ('inject = "nmi"\nvcpus = []', 3, "key 'steps[1].vcpus': is empty"),
        ('inject = "nmi"\nvcpus = [0,\n 0]', 4, "key 'steps[1].vcpus[2]': vCPU 0 is listed twice"),
        ('inject = "nmi"\nvcpus = "some"', 3, "key 'steps[1].vcpus': must be a vCPU id, an array of ids, or \"all\""),  # noqa: E501
        ('inject = "nmi"\nwait = 0', 3, "key 'steps[1].wait': 0 seconds: it must be more than 0"),
        ('inject = "nmi"\nwait = "5s"', 3, "key 'steps[1].wait': must be a number of seconds, not a string"),  # noqa: E501
        ('inject = "nmi"\nwait = nan', 3, "key 'steps[1].wait': nan seconds"),
        ('inject = "nmi"\nrepeat = 0', 3, "key 'steps[1].repeat': 0 is out of range: it must be between 1 and 1000000"),  # noqa: E501
        ('inject = "nmi"\non_failure = "ignore"', 3, "key 'steps[1].on_failure': 'ignore' is not one of 'stop', 'continue'"),  # noqa: E501
        ('inject = "ext-dabt"\nforce = true', 3, "key 'steps[1].force': 'force' does not apply to an inject = 'ext-dabt' step"),  # noqa: E501
        ('inject = "ext-dabt"\nwait = 2', 3, "key 'steps[1].wait': 'wait' does not apply to an inject = 'ext-dabt' step: KVM never reports an external data abort as pending"),  # noqa: E501
        ('inject = "ext-dabt"\nwait = false', 3, "mmio_timeout bounds the wait for the MMIO exit"),
        ('inject = "nmi"\nexpect = "log"', 3, "key 'steps[1].expect': a step does one thing"),
        ('name = "x"', 1, "key 'steps[1]': a step needs one of inject, expect, pause or wait"),
        ('wait = 1\nmatch = "x"', 3, "key 'steps[1].match': 'match' does not apply to a wait step"),
        ('wait = true', 2, "key 'steps[1].wait': must be a number of seconds, not a boolean (true)"),  # noqa: E501
        ('pause = "hi"', 1, "key 'steps[1]': a pause step needs 'seconds' or 'until_file'"),
        ('pause = "hi"\nseconds = 1\nuntil_file = "f"', 4, "give either seconds or until_file, not both"),  # noqa: E501
        ('pause = "hi"\nseconds = 1\ntimeout = 3', 4, "key 'steps[1].timeout': timeout goes with until_file"),  # noqa: E501
        ('expect = "delivered"', 2, "key 'steps[1].expect': expect = 'delivered' checks the last inject step, and there is none"),  # noqa: E501
        ('expect = "log"', 1, "key 'steps[1]': an expect = 'log' step needs 'match'"),
        ('expect = "log"\nmatch = "(unclosed"', 3, "key 'steps[1].match': not a valid regular expression: missing ), unterminated subpattern"),  # noqa: E501
        ('expect = "log"\nmatch = "x"\nabsent = true\ncount = 2', 5, "key 'steps[1].count': count goes with a line that must appear"),  # noqa: E501
        ('expect = "log"\nmatch = "x"\nsince = "now"', 4, "key 'steps[1].since': 'now' is not one of 'inject', 'start', 'beginning'"),  # noqa: E501
        ('expect = "log"\nmatch = "x"\ncount = 0', 4, "key 'steps[1].count': 0 is out of range"),
        ('expect = "log"\nmatch = "x"\ntimeout = -1', 4, "key 'steps[1].timeout': -1 seconds"),
        ('expect = "log"\nmatch = "x"\nvcpus = [0]', 4, "'vcpus' does not apply to an expect = 'log' step"),  # noqa: E501
        ('expect = "never"', 2, "key 'steps[1].expect': 'never' is not one of 'delivered', 'pending', 'log'"),  # noqa: E501
    ],
)  # fmt: skip
def test_step_problems(step: str, line: int, message: str) -> None:
    found = one_problem("[[steps]]\n" + step + "\n")
    assert found.startswith(f"c.toml:{line}: "), found
    assert message in found, found


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[target]\npid = 5\nname = 'x'\n" + MINIMAL, "c.toml:3: key 'target.name': give one of pid, name and pid_file, not pid and name"),  # noqa: E501
        ("[target]\narch = 'riscv64'\n" + MINIMAL, "c.toml:2: key 'target.arch': 'riscv64' is not one of 'x86_64', 'aarch64', 'arm64'"),  # noqa: E501
        ("[target]\narch = 'arm64'\n" + MINIMAL, "c.toml:4: key 'steps[1].inject': an NMI injection needs an x86_64 VM, but [target] arch is aarch64"),  # noqa: E501
        ("[target]\npidd = 1\n" + MINIMAL, "c.toml:2: key 'target.pidd': unknown key (did you mean 'pid'?)"),  # noqa: E501
        ("[target]\nport = 1\n" + MINIMAL, "c.toml:2: key 'target.port': unknown key (the keys here are pid, name, pid_file, arch, log)"),  # noqa: E501
        ("target = 5\n" + MINIMAL, "c.toml:1: key 'target': must be a table ([target]), not an integer"),  # noqa: E501
        ("campaign = []\n" + MINIMAL, "c.toml:1: key 'campaign': must be a table ([campaign]), not an array"),  # noqa: E501
        ("steps = 1\n", "c.toml:1: key 'steps': must be an array of tables: write each step as [[steps]]"),  # noqa: E501
        ("[campaign]\nname = 'x'\n", "c.toml:1: the campaign has no [[steps]]"),
        ("[campaign]\nname = ''\n" + MINIMAL, "c.toml:2: key 'campaign.name': must not be empty"),
    ],
)  # fmt: skip
def test_campaign_and_target_problems(text: str, message: str) -> None:
    assert one_problem(text) == message


def test_an_arm64_fault_and_an_x86_fault_cannot_share_a_campaign() -> None:
    text = (
        "[[steps]]\n"
        "inject = 'serror'\n"
        "[[steps]]\n"
        "wait = 1\n"
        "[[steps]]\n"
        "inject = 'mce'\n"
        "bank = 1\n"
        "preset = 'ce'\n"
    )
    assert one_problem(text) == (
        "c.toml:6: key 'steps[3].inject': a machine-check injection needs an x86_64 VM, but"
        " step 1 (serror, line 1) needs aarch64; a campaign targets one VM"
    )


def test_delivery_expectations_must_be_checkable() -> None:
    dabt = "[[steps]]\ninject = 'ext-dabt'\n[[steps]]\nexpect = 'delivered'\n"
    assert "an external data abort cannot be read back" in one_problem(dabt)
    corrected = (
        "[[steps]]\ninject = 'mce'\nbank = 2\npreset = 'corrected'\n[[steps]]\nexpect = 'pending'\n"
    )
    assert "raises no exception (it is only logged in the bank)" in one_problem(corrected)
    # delivered after a corrected error is fine: there is nothing to wait for
    campaign.loads(corrected.replace("pending", "delivered"), "c.toml")
    # a broken inject step is reported once, not again by the expectation after it
    broken = "[[steps]]\ninject = 'mce'\n[[steps]]\nexpect = 'delivered'\n"
    assert problems(broken) == [
        "c.toml:1: key 'steps[1]': an mce step needs 'bank' (the machine-check bank, MCi)"
    ]


def test_values_are_built_like_the_command_line_builds_them(tmp_path: Any) -> None:
    text = (
        "[target]\n"
        "pid_file = 'run/vm.pid'\n"
        "log = '~/console.log'\n"
        "[[steps]]\n"
        "inject = 'mce'\n"
        "bank = 3\n"
        "preset = 'srao'\n"
        "status = 'val,uc,en,s'\n"
        "mcg_status = ['mcip', 'ripv']\n"
        "addr = 0x1000\n"
        "vcpus = 'all'\n"
        "wait = true\n"
        "repeat = 4\n"
        "interval = 0.25\n"
        "force = true\n"
        "[[steps]]\n"
        "expect = 'log'\n"
        "match = 'mce: \\[Hardware Error\\]'\n"
        "file = 'logs/guest.log'\n"
        "count = 2\n"
        "since = 'start'\n"
        "[[steps]]\n"
        "pause = 'go'\n"
        "until_file = '/abs/go'\n"
    )
    path = write(tmp_path, text)
    c = campaign.load(path)
    inj, exp, pause = c.steps
    assert isinstance(inj, InjectStep) and isinstance(exp, ExpectStep)
    assert isinstance(pause, PauseStep)
    m = inj.request.mce
    assert m.bank == 3 and m.addr == 0x1000
    assert m.status == mce.encode_status("val", "uc", "en", "s")
    assert m.mcg_status == mce.MCG_STATUS_BITS["mcip"] | mce.MCG_STATUS_BITS["ripv"]
    assert m.misc == mce.preset("srao").misc  # not given: the preset's
    assert inj.request.force is True and inj.raises_mc is True
    assert (inj.vcpus, inj.wait, inj.repeat, inj.interval) == ("all", 5.0, 4, 0.25)
    assert c.target.pid_file == os.path.join(str(tmp_path), "run", "vm.pid")
    assert c.target.log == os.path.expanduser("~/console.log")
    assert exp.file == os.path.join(str(tmp_path), "logs", "guest.log")
    assert exp.match is not None and exp.match.search("mce: [Hardware Error]: CPU 0")
    assert (exp.count, exp.since, exp.timeout) == (2, "start", 10.0)
    assert (pause.until_file, pause.timeout, pause.seconds) == ("/abs/go", 600.0, None)
    assert inj.label() == f"inject mce (bank 3, status {m.status:#x})"


def test_serror_syndromes_from_names_and_numbers() -> None:
    def esr_of(value: str) -> Any:
        c = campaign.loads(f"[[steps]]\ninject = 'serror'\n{value}\n", "c.toml")
        step = c.steps[0]
        assert isinstance(step, InjectStep)
        return step.request.esr

    assert esr_of("") is None
    assert esr_of("severity = 'uer'") == 0xC11
    assert esr_of("esr = 'ce'") == 0x1811
    assert esr_of("esr = '0x1abcdef'") == 0x1ABCDEF
    assert esr_of("esr = 0x0411") == 0x411


def test_syntax_errors_carry_file_line_and_column(tmp_path: Any) -> None:
    path = write(tmp_path, "[[steps]]\ninject = 'nmi\n")
    with pytest.raises(InvalidInput) as info:
        campaign.load(path)
    assert (
        str(info.value) == f"{path}:2:10: unterminated string (a literal string ends on its line)"
    )
    with pytest.raises(InvalidInput, match="does not exist"):
        campaign.load(os.path.join(str(tmp_path), "missing.toml"))


def test_wait_step_and_labels() -> None:
    c = campaign.loads(
        "[[steps]]\nwait = 2\n[[steps]]\npause = 'x'\nseconds = 0.5\n"
        "[[steps]]\nexpect = 'log'\nmatch = 'a'\nabsent = true\n",
        "c.toml",
    )
    w, p, e = c.steps
    assert isinstance(w, WaitStep) and w.seconds == 2.0 and w.label() == "wait 2 s"
    assert p.label() == "pause 0.5 s"
    assert e.label() == "expect no log line /a/"
    assert c.arch is None  # nothing to inject: any VM will do


def test_log_reader_follows_a_growing_file(tmp_path: Any) -> None:
    path = os.path.join(str(tmp_path), "log")
    with open(path, "wb") as f:
        f.write(b"old 1\nold 2\n")
    reader = campaign._LogReader(path, os.path.getsize(path))
    assert reader.lines() == []
    with open(path, "ab") as f:
        f.write(b"new 3\npart")
    assert reader.lines() == [(3, "new 3")]
    with open(path, "ab") as f:
        f.write(b"ial 4\r\n\xff 5")
    assert reader.lines() == [(4, "partial 4")]
    assert reader.lines(final=True) == [(5, "\ufffd 5")]
    with open(path, "wb") as f:  # truncated (rotated): read again from the top
        f.write(b"fresh 1\n")
    assert reader.lines() == [(1, "fresh 1")]
    assert reader.count == 4 and reader.exists
    missing = campaign._LogReader(os.path.join(str(tmp_path), "nope"), 0)
    assert missing.lines() == [] and not missing.exists


# ====================================================================== real runs (KVM)
x86_only = pytest.mark.skipif(not X86, reason="x86_64 test VM; arm64 campaigns run in the lab")


def _failures(result: campaign.CampaignResult) -> str:
    return "\n".join(f"{e.name}: {e.outcome}: {e.message}" for e in result.executions)


@pytest.mark.kvm
@pytest.mark.root
@x86_only
def test_x86_smoke_example_runs_for_real(
    vm: LoggedVm, tmp_path: Any, schema: xmlschema.XMLSchema
) -> None:
    c = campaign.load(os.path.join(EXAMPLES, "x86-smoke.toml"))
    audit_before = len(audit_records())
    events: List[Progress] = []
    result = campaign.run(
        c, target_override=TargetOverride(pid=vm.pid, log=vm.log_path), on_event=events.append
    )
    assert result.exit_code == 0, _failures(result)
    assert [e.outcome for e in result.executions] == ["passed"] * 9
    # what the guest saw: two NMIs on each vCPU, the #MC with the SRAO bank, the polled CE
    guest = vm.events()
    for v in (0, 1):
        assert len([e for e in guest if e["event"] == "nmi" and e["vcpu"] == v]) == 2
    srao = mce.preset("srao").build(bank=1, addr=0x1234000)
    (mc,) = [e for e in guest if e["event"] == "mce"]
    assert {"bank": 1, "status": srao.status, "addr": srao.addr, "misc": srao.misc} in mc["banks"]
    # the CE is found by the guest's next poll, or by the #MC handler if that came first
    ce = mce.preset("corrected").build(bank=2, addr=0x5000)
    ce_bank = {"bank": 2, "status": ce.status, "addr": ce.addr, "misc": ce.misc}
    vm.wait_for(lambda e: e["event"] in ("mce", "mce-poll") and ce_bank in e["banks"])
    assert not [e for e in guest if e["event"] in ("exit", "exception", "guest-check-failed")]
    # every injection went through ops.inject: locked and audited
    new = audit_records()[audit_before:]
    assert sorted(r["action"] for r in new) == ["inject-mce"] * 2 + ["inject-nmi"] * 4
    assert {r["outcome"] for r in new} == {"ok"}
    # the executions, named as JUnit test cases
    names = [e.name for e in result.executions]
    assert names[0] == "step 01: inject nmi [vcpu 0] [1/2] - NMI on every vCPU, delivery confirmed"
    assert names[3].startswith("step 01: inject nmi [vcpu 1] [2/2]")
    nmi = result.executions[0]
    assert nmi.injections[0]["delivery"]["delivered"] is True  # type: ignore[index]
    assert "delivered after" in nmi.message
    assert result.executions[7].message.startswith(f"{vm.log_path}:")
    # progress events: one start and one finish per execution, in order
    assert events[0].event == "campaign-started" and events[-1].event == "campaign-finished"
    steps = [(p.event, p.index) for p in events[1:-1]]
    assert steps == [(kind, i) for i in range(1, 10) for kind in ("step-started", "step-finished")]
    assert {p.total for p in events} == {9}
    assert all(p.duration_s is not None for p in events if p.event == "step-finished")
    # the JUnit report
    report = os.path.join(str(tmp_path), "report.xml")
    with open(report, "w", encoding="utf-8") as f:
        f.write(result.junit_xml())
    schema.validate(report)
    root = ET.parse(report).getroot()
    suite = root.find("testsuite")
    assert suite is not None and suite.get("name") == "x86-smoke"
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("9", "0", "0")
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == names
    assert all(c.find("failure") is None and c.find("error") is None for c in cases)
    out = json.loads(cases[0].findtext("system-out") or "")
    assert out[0]["vm"]["pid"] == vm.pid and out[0]["kind"] == "nmi" and out[0]["vcpu_id"] == 0
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert props["vm.pid"] == str(vm.pid) and props["vm.vmm"] == "serrinj-testvm"
    assert result.as_dict()["counts"] == {"passed": 9, "failed": 0, "error": 0, "skipped": 0}


@pytest.mark.kvm
@pytest.mark.root
@x86_only
def test_serrinj_run_end_to_end(vm: LoggedVm, tmp_path: Any, schema: xmlschema.XMLSchema) -> None:
    """``serrinj run`` with its output piped: the plain-text report on stdout, a row per
    execution, the summary and the JUnit report's path; a line per finished step on
    stderr as it finishes; the report is valid JUnit."""
    report = os.path.join(str(tmp_path), "junit.xml")
    smoke = os.path.join(EXAMPLES, "x86-smoke.toml")
    proc = serrinj_cli.run(
        "run", smoke, "--pid", vm.pid, "--log", vm.log_path, "--junit", report, timeout=120
    )
    assert proc.rc == 0, proc
    lines = proc.stdout.splitlines()
    assert lines[0] == f"Campaign x86-smoke ({smoke})"
    assert lines[1].split() == ["#", "step", "outcome", "time", "detail"]
    rows = lines[2:11]
    assert [r.split()[0] for r in rows] == [str(i) for i in range(1, 10)]
    assert all(re.search(r"  passed +\d+\.\d{3} s\b", r) for r in rows), rows
    assert rows[8].split()[1:5] == ["expect", "no", "log", "line"]
    assert re.fullmatch(r"  9 passed in \d+\.\d\d s \(exit 0\)", lines[11]), lines[11]
    assert lines[12:] == [f"  JUnit report: {report}"]
    # stderr is not a terminal: a line per finished step, with the step's full name
    progress = [x for x in proc.stderr.splitlines() if x.startswith("[")]
    assert [x.split("]")[0] for x in progress] == [f"[{i}/9" for i in range(1, 10)], proc.stderr
    assert progress[0].startswith("[1/9] PASSED step 01: inject nmi [vcpu 0]"), progress[0]
    assert "NMI on every vCPU, delivery confirmed" in progress[0]
    assert progress[8].startswith("[9/9] PASSED step 06: expect no log line"), progress[8]
    schema.validate(report)
    suite = ET.parse(report).getroot().find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("9", "0", "0")


@pytest.mark.kvm
@pytest.mark.root
@x86_only
def test_a_failed_expectation_stops_the_campaign_or_not(vm: LoggedVm, tmp_path: Any) -> None:
    steps = (
        "[[steps]]\ninject = 'nmi'\nvcpus = [0]\nwait = 5\n"
        "[[steps]]\nexpect = 'log'\nmatch = 'never printed'\ntimeout = 0.3\n"
        "[[steps]]\ninject = 'nmi'\nvcpus = [1]\nwait = 5\n"
    )
    path = write(tmp_path, steps, "stop.toml")
    override = TargetOverride(pid=vm.pid, log=vm.log_path)
    result = campaign.run(campaign.load(path), target_override=override)
    assert [e.outcome for e in result.executions] == ["passed", "failed", "skipped"]
    assert result.exit_code == ExitCode.EXPECTATION_FAILED
    failed = result.executions[1]
    assert failed.message.startswith(
        f"no line of {vm.log_path} matched /never printed/ within 0.3 s"
    )
    assert "since the last inject step" in failed.message
    assert result.executions[2].message == "not run: step 2 failed (on_failure = 'stop')"
    assert not [e for e in vm.events() if e["event"] == "nmi" and e["vcpu"] == 1]
    xml = ET.fromstring(result.junit_xml())
    assert xml.find("testsuite/testcase/failure") is not None
    assert xml.find("testsuite/testcase/skipped") is not None

    cont = write(tmp_path, "[campaign]\non_failure = 'continue'\n" + steps, "continue.toml")
    result = campaign.run(campaign.load(cont), target_override=override)
    assert [e.outcome for e in result.executions] == ["passed", "failed", "passed"]
    vm.wait_for(lambda e: e["event"] == "nmi" and e["vcpu"] == 1)


@pytest.mark.kvm
@pytest.mark.root
@x86_only
def test_pending_then_delivered_on_a_paused_vm(vm: LoggedVm, tmp_path: Any) -> None:
    """A paused VM cannot take the NMI: it stays pending; once it runs, it is delivered."""
    vm.command({"cmd": "pause"})
    vm.wait_for(lambda e: e["event"] == "ack" and e["cmd"] == "pause")
    text = (
        "[campaign]\non_failure = 'continue'\n"
        "[[steps]]\ninject = 'nmi'\nvcpus = [0]\n"
        "[[steps]]\nexpect = 'pending'\ntimeout = 0.5\n"
        "[[steps]]\nexpect = 'delivered'\ntimeout = 0.3\n"
        "[[steps]]\nname = 'after run'\nexpect = 'delivered'\ntimeout = 10\n"
        '[[steps]]\nexpect = \'log\'\nmatch = \'"event":"nmi","vcpu":0\'\ntimeout = 5\n'
    )

    def resume(p: Progress) -> None:
        if p.event == "step-started" and p.step == 4:
            vm.command({"cmd": "run"})

    result = campaign.run(
        campaign.load(write(tmp_path, text)),
        target_override=TargetOverride(pid=vm.pid, log=vm.log_path),
        on_event=resume,
    )
    assert [e.outcome for e in result.executions] == [
        "passed", "passed", "failed", "passed", "passed"
    ], _failures(result)  # fmt: skip
    assert result.executions[1].message == "still pending on vCPU 0 after 0.5 s"
    assert result.executions[2].message == "still pending on vCPU 0 after 0.3 s"
    assert result.executions[3].message == "delivered on vCPU 0"
    assert result.exit_code == ExitCode.EXPECTATION_FAILED


@pytest.mark.kvm
@pytest.mark.root
@x86_only
def test_an_undelivered_injection_is_a_failure(
    vm: LoggedVm, tmp_path: Any, schema: xmlschema.XMLSchema
) -> None:
    vm.command({"cmd": "pause"})
    vm.wait_for(lambda e: e["event"] == "ack" and e["cmd"] == "pause")
    text = "[[steps]]\ninject = 'nmi'\nvcpus = [1]\nwait = 0.3\n[[steps]]\nwait = 0.1\n"
    result = campaign.run(
        campaign.load(write(tmp_path, text)), target_override=TargetOverride(pid=vm.pid)
    )
    inj, rest = result.executions
    assert (inj.outcome, rest.outcome) == ("failed", "skipped")
    assert inj.message.startswith("the nmi was still pending on vCPU 1 after 0.3 s")
    assert inj.error is not None and inj.error["kind"] == "not-delivered"
    assert result.exit_code == ExitCode.EXPECTATION_FAILED
    xml = result.junit_xml()
    schema.validate(xml)
    failure = ET.fromstring(xml).find("testsuite/testcase/failure")
    assert failure is not None and failure.get("type") == "not-delivered"
    vm.command({"cmd": "run"})
    vm.wait_for(lambda e: e["event"] == "nmi" and e["vcpu"] == 1)


@pytest.mark.kvm
@pytest.mark.root
@x86_only
def test_a_vm_that_dies_ends_the_campaign_with_its_error(vm: LoggedVm, tmp_path: Any) -> None:
    text = (
        "[campaign]\non_failure = 'continue'\n"
        "[[steps]]\ninject = 'nmi'\nvcpus = [0]\n"
        "[[steps]]\nwait = 0.1\n"
        "[[steps]]\ninject = 'nmi'\nvcpus = [1]\n"
        "[[steps]]\ninject = 'nmi'\nvcpus = [0]\n"
    )

    def kill_at_step_2(p: Progress) -> None:
        if p.event == "step-started" and p.step == 2:
            vm.kill()

    result = campaign.run(
        campaign.load(write(tmp_path, text)),
        target_override=TargetOverride(pid=vm.pid),
        on_event=kill_at_step_2,
    )
    assert [e.outcome for e in result.executions] == ["passed", "passed", "error", "skipped"]
    err = result.executions[2]
    assert err.error is not None and err.error["kind"] == "target-gone"
    assert err.message.startswith(f"VM pid {vm.pid} is gone")
    assert result.executions[3].message.startswith("not run: step 3 ended the campaign")
    assert result.exit_code == ExitCode.NOT_FOUND
    case = ET.fromstring(result.junit_xml()).findall("testsuite/testcase")[2]
    assert case.find("error") is not None


@pytest.mark.kvm
@pytest.mark.root
@x86_only
def test_nothing_is_sent_when_the_campaign_does_not_fit_the_vm(vm: LoggedVm, tmp_path: Any) -> None:
    audit_before = len(audit_records())
    override = TargetOverride(pid=vm.pid)
    good = "[[steps]]\ninject = 'nmi'\nvcpus = [0]\nwait = 5\n"
    cases = {
        "[[steps]]\ninject = 'nmi'\nvcpus = [0, 7]\n": (
            "c.toml:7: key 'steps[2].vcpus': VM pid {pid} has no vCPU 7; its vCPU ids are 0, 1"
        ),
        "[[steps]]\ninject = 'nmi'\n": (
            "c.toml:5: key 'steps[2]': VM pid {pid} has 2 vCPUs (0, 1): say which with"
            ' vcpus = [...] or vcpus = "all"'
        ),
        "[[steps]]\nexpect = 'log'\nmatch = 'x'\n": (
            "c.toml:5: key 'steps[2]': which file? give file = ... in the step, log = ... in"
            " [target], or a log file on the command line"
        ),
    }
    for bad, message in cases.items():
        c = campaign.load(write(tmp_path, good + bad))
        with pytest.raises(CampaignError) as info:
            campaign.run(c, target_override=override)
        path = os.path.join(str(tmp_path), "c.toml")
        assert str(info.value) == message.replace("c.toml", path).format(pid=vm.pid)
    arm = campaign.load(write(tmp_path, "[[steps]]\ninject = 'serror'\nseverity = 'ce'\n"))
    with pytest.raises(CampaignError, match=r"c.toml:2: key 'steps\[1\].inject': an SError"
                       r" injection needs an aarch64 VM; VM pid \d+ is x86_64"):  # fmt: skip
        campaign.run(arm, target_override=override)
    assert audit_records()[audit_before:] == []
    time.sleep(0.05)
    assert not [e for e in vm.events() if e["event"] == "nmi"]


@pytest.mark.kvm
@pytest.mark.root
@x86_only
def test_dry_run_checks_and_reads_but_sends_nothing(vm: LoggedVm) -> None:
    audit_before = len(audit_records())
    c = campaign.load(os.path.join(EXAMPLES, "x86-smoke.toml"))
    result = campaign.run(
        c, target_override=TargetOverride(pid=vm.pid, log=vm.log_path), dry_run=True
    )
    assert result.exit_code == 0 and result.dry_run
    assert {e.outcome for e in result.executions} == {"skipped"}
    inj = result.executions[0]
    assert inj.message == "campaign dry run: checked and planned, nothing sent"
    assert inj.injections[0]["dry_run"] is True and inj.injections[0]["before"]
    new = audit_records()[audit_before:]
    assert len(new) == 6 and {r["outcome"] for r in new} == {"dry-run"}
    assert not [e for e in vm.events() if e["event"] in ("nmi", "mce", "mce-poll")]
    assert result.as_dict()["dry_run"] is True


@pytest.mark.kvm
@pytest.mark.root
@x86_only
def test_pid_file_target_and_an_operator_pause(vm: LoggedVm, tmp_path: Any) -> None:
    with open(os.path.join(str(tmp_path), "vm.pid"), "w") as f:
        f.write(f"{vm.pid}\n")
    go = os.path.join(str(tmp_path), "go")
    text = (
        "[target]\npid_file = 'vm.pid'\n"
        "[[steps]]\npause = 'touch go to continue'\nuntil_file = 'go'\ntimeout = 20\n"
        "[[steps]]\ninject = 'nmi'\nvcpus = [1]\nwait = 5\n"
        "[[steps]]\npause = 'nobody touches this'\nuntil_file = 'never'\ntimeout = 0.3\n"
    )
    shown: List[str] = []

    def operator(p: Progress) -> None:
        if p.event == "message":
            shown.append(p.message)
            if p.step == 1:
                with open(go, "w"):
                    pass

    result = campaign.run(campaign.load(write(tmp_path, text)), on_event=operator)
    assert shown == ["touch go to continue", "nobody touches this"]
    assert [e.outcome for e in result.executions] == ["passed", "passed", "failed"]
    assert result.executions[0].message == f"{go} appeared"
    never = os.path.join(str(tmp_path), "never")
    assert result.executions[2].message == f"{never} did not appear within 0.3 s"
    assert result.vm["pid"] == vm.pid
    vm.wait_for(lambda e: e["event"] == "nmi" and e["vcpu"] == 1)


def _end(proc: subprocess.Popen[Any]) -> None:
    """End a serrinj we started, by its pid (SIGTERM is safe at any moment: exit 130)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _json_lines(path: str) -> List[Dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _has_open(pid: int, prefix: str) -> bool:
    """Whether process ``pid`` holds a file whose name starts with ``prefix`` open."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if os.path.basename(target).startswith(prefix):
            return True
    return False


@pytest.mark.kvm
@pytest.mark.root
@x86_only
def test_a_campaign_holds_the_vm_for_its_whole_run(vm: LoggedVm, tmp_path: Any) -> None:
    """Two `serrinj run` on one VM never interleave: while the first is between two of its
    steps, a second one fails with exit 8 naming the first (short --lock-wait), or waits
    and runs once the first has ended (long --lock-wait)."""
    go = os.path.join(str(tmp_path), "go")
    first = write(
        tmp_path,
        "[[steps]]\ninject = 'nmi'\nvcpus = [0]\nwait = 5\n"
        "[[steps]]\npause = 'hold the VM'\nuntil_file = 'go'\ntimeout = 60\n"
        "[[steps]]\ninject = 'nmi'\nvcpus = [1]\nwait = 5\n",
        "first.toml",
    )
    second = write(tmp_path, "[[steps]]\ninject = 'nmi'\nvcpus = [0]\nwait = 5\n", "second.toml")
    serrinj = serrinj_cli.SERRINJ
    target = ["--pid", str(vm.pid), "--json"]
    first_out = os.path.join(str(tmp_path), "first.out")
    with open(first_out, "w") as out:
        a = subprocess.Popen([*serrinj, "run", first, *target], stdout=out, stderr=subprocess.PIPE)
    waiting: Optional[subprocess.Popen[Any]] = None
    try:
        deadline = time.monotonic() + 60
        while not any(
            line.get("event", {}).get("event") == "message" for line in _json_lines(first_out)
        ):
            assert a.poll() is None, f"the first campaign ended early: {_json_lines(first_out)}"
            assert time.monotonic() < deadline, "the first campaign did not reach its pause"
            time.sleep(0.05)
        assert [e["vcpu"] for e in vm.events() if e["event"] == "nmi"] == [0]

        refused = serrinj_cli.run("--lock-wait", "0.3", "run", second, *target)
        assert refused.rc == ExitCode.CONFLICT == 8, refused
        err = json.loads(refused.stdout)["error"]
        assert err["kind"] == "conflict"
        assert err["message"].startswith(f"VM pid {vm.pid} is in use by serrinj process {a.pid} (")
        assert "first.toml" in err["message"] and "--lock-wait" in err["hint"]
        assert refused.stderr.startswith(f"error: VM pid {vm.pid} is in use by serrinj process")

        waiting = subprocess.Popen(
            [*serrinj, "--lock-wait", "60", "run", second, *target],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        # it has reached the lock once it holds the VM's lock file open
        lock_file = f"vm-{vm.pid}-"
        while not _has_open(waiting.pid, lock_file):
            assert waiting.poll() is None, waiting.communicate()
            assert time.monotonic() < deadline, "the second campaign never reached the lock"
            time.sleep(0.02)
        time.sleep(0.5)
        assert waiting.poll() is None  # still waiting, and it has sent nothing
        assert [e["vcpu"] for e in vm.events() if e["event"] == "nmi"] == [0]

        with open(go, "w"):
            pass
        _, a_err = a.communicate(timeout=60)
        assert a.returncode == 0, a_err
        b_out, b_err = waiting.communicate(timeout=60)
        assert waiting.returncode == 0, b_err
        result = json.loads(b_out.splitlines()[-1])
        assert result["counts"]["passed"] == 1
    finally:
        for proc in (a, waiting):
            if proc is not None:
                _end(proc)
        if a.stderr is not None:
            a.stderr.close()
    # the first campaign's NMIs, then the second's: nothing in between
    vm.wait_for(lambda e: e["event"] == "nmi", count=3)
    assert [e["vcpu"] for e in vm.events() if e["event"] == "nmi"] == [0, 1, 0]


def test_a_missing_vm_is_an_error_before_anything_runs(tmp_path: Any) -> None:
    text = "[target]\npid_file = 'gone.pid'\n" + MINIMAL
    c = campaign.load(write(tmp_path, text))
    with pytest.raises(TargetNotFound, match=r"pid file .*gone\.pid does not exist"):
        campaign.run(c)
    report = os.path.join(str(tmp_path), "r.xml")
    proc = serrinj_cli.run("run", os.path.join(str(tmp_path), "c.toml"), "--junit", report)
    assert proc.rc == ExitCode.NOT_FOUND
    assert "error: pid file" in proc.stderr and "hint: is the VM running?" in proc.stderr
    case = ET.parse(report).getroot().find("testsuite/testcase")
    assert case is not None and case.get("name") == "step 00: find the VM"
    bad = write(tmp_path, "[[steps]]\ninject = 'nmi'\nbogus = 1\n", "bad.toml")
    proc = serrinj_cli.run("run", bad, "--junit", report)
    assert proc.rc == ExitCode.USAGE
    assert f"error: {bad}:3: key 'steps[1].bogus': unknown key" in proc.stderr
    error = ET.parse(report).getroot().find("testsuite/testcase/error")
    assert error is not None and "bogus" in (error.get("message") or "")


@pytest.mark.kvm
@pytest.mark.root
@x86_only
def test_an_interrupt_ends_the_campaign_with_a_report(vm: LoggedVm, tmp_path: Any) -> None:
    text = (
        "[[steps]]\ninject = 'nmi'\nvcpus = [0]\n"
        "[[steps]]\nwait = 30\n"
        "[[steps]]\ninject = 'nmi'\nvcpus = [1]\n"
    )

    def ctrl_c(p: Progress) -> None:
        if p.event == "step-started" and p.step == 2:
            raise KeyboardInterrupt

    result = campaign.run(
        campaign.load(write(tmp_path, text)),
        target_override=TargetOverride(pid=vm.pid),
        on_event=ctrl_c,
    )
    assert [e.outcome for e in result.executions] == ["passed", "error", "skipped"]
    assert result.executions[1].message == "interrupted"
    assert result.exit_code == ExitCode.INTERRUPTED
    assert result.duration_s < 30
    assert not [e for e in vm.events() if e["event"] == "nmi" and e["vcpu"] == 1]


def test_check_only_loads_and_checks_without_a_vm() -> None:
    for name in EXAMPLE_FILES:
        path = os.path.join(EXAMPLES, name)
        proc = serrinj_cli.run("run", path, "--check-only", "--json")
        assert proc.rc == 0, proc
        data = proc.data  # one object (docs/json-schema.md, run --check-only)
        assert (data["schema"], data["command"], data["ok"]) == ("serrinj/1", "run", True)
        assert data["campaign"]["source"] == path and data["campaign"]["steps"][0]["number"] == 1
