"""Campaigns: scripted RAS tests, run step by step against one VM, with a JUnit report.

A campaign is a TOML file (read by :mod:`serrinj.codec.tomlsubset`, which
works on Python 3.9 and knows the line of every key)::

    [campaign]
    name = "x86-smoke"               # default: the file name without .toml
    description = "..."
    on_failure = "stop"              # or "continue": what a failed step does to the rest

    [target]                         # all optional; command-line options replace it
    name = "vm-a"                    # the VM's name; or pid = 1234; or pid_file = "/run/vm-a.pid"
    arch = "x86_64"                  # or "aarch64" ("arm64"): checked before the VM is known
    log = "/var/log/vm-a.console"    # default file for log expectations

    [[steps]]                        # steps run in file order
    inject = "nmi"                   # a fault: serror, ext-dabt, mce or nmi
    vcpus = "all"                    # a vCPU id, a list of ids, or "all"
    wait = 5                         # confirm delivery within 5 s (true: 5 s)
    repeat = 3                       # any step: run it 3 times ...
    interval = 0.5                   # ... 0.5 s apart

    [[steps]]
    expect = "log"                   # a line matching a regex appears in a file
    match = 'mce: \\[Hardware Error\\]'
    timeout = 30

Steps (each ``[[steps]]`` table does exactly one thing, named by its key):

``inject = KIND``
    ``vcpus`` (required when the VM has more than one vCPU), ``wait``
    (seconds, or ``true`` for 5 s: poll until the guest has taken the fault;
    still pending then is a failure), ``dry_run`` (check and read the vCPU,
    send nothing), ``readback`` (default ``true``; ``false`` skips the event
    readings an ``nmi`` or ``mce`` report shows before and after, for the
    shortest hold of the vCPU), and per kind:

    - ``serror`` (arm64): ``esr`` (the ISS, bits [24:0]: a number or a
      severity name) or ``severity`` (``ce``, ``ueo``, ``uer``, ``ueu``,
      ``uc``), neither for KVM's own syndrome; ``force``;
    - ``ext-dabt`` (arm64): ``mmio_addr``, ``mmio_timeout``;
    - ``mce`` (x86_64): ``bank`` (required), ``preset`` (``corrected``,
      ``ucna``, ``srao``, ``srar``, ``uc-fatal``) and/or ``status``,
      ``mcg_status`` (numbers, or flag names as ``"val,uc,en"`` or
      ``["val", "uc", "en"]``), ``addr``, ``misc``; ``force``;
    - ``nmi`` (x86_64): nothing more.

``wait = SECONDS``
    Sleep (a ``wait`` key *inside* an inject step is its delivery timeout).

``pause = "message for the operator"``
    Show the message, then either sleep ``seconds`` or wait until the file
    ``until_file`` appears or is touched (at most ``timeout`` s, default 600).

``expect = "delivered"`` / ``expect = "pending"``
    The faults of the last inject step were taken by the guest within
    ``timeout`` (default 5 s) / are still pending for all of ``timeout``
    (default 1 s; e.g. an SError while the guest masks it).

``expect = "log"``
    ``match`` (a Python regex) is found on a line of ``file`` (default:
    ``[target] log``) within ``timeout`` (default 10 s); ``count = N`` needs N
    matching lines; ``absent = true`` instead requires that no line matches
    for all of ``timeout`` (the guest survived). Only lines written after
    ``since`` count: ``"inject"`` (default: the start of the last inject
    step), ``"start"`` (the start of the campaign) or ``"beginning"`` (the
    whole file).

Every step also takes ``name`` (shown in reports), ``repeat``, ``interval``
and ``on_failure``. Relative paths in the file are relative to the file's
directory. Steps are numbered from 1, and so are array indices in messages:
``steps[3].vcpus[1]`` is the first vCPU of the third step.

Everything is checked before anything is sent: :func:`load` checks the file
(unknown keys, types, values, syndromes, presets, arm64 faults mixed with
x86 ones); :func:`run` then checks it against the VM (its arch, vCPU ids,
the host's KVM capabilities, a log file for every log expectation). Each
problem reads ``FILE:LINE: key 'steps[3].sevrity': unknown key (did you mean
'severity'?)``; all of them are raised together as :class:`CampaignError`
(an :class:`~serrinj.errors.InvalidInput`).

Outcomes and exit codes: a step execution *passes*, *fails* (an expectation
or an injection did not hold: not delivered, refused, rejected by KVM),
*errors* (the VM is gone, permissions, an unsupported host: the campaign
stops) or is *skipped* (dry runs, and the steps left after a stop).
:attr:`CampaignResult.exit_code` is 0 when nothing failed,
``ExitCode.EXPECTATION_FAILED`` (9) when a step failed, and the error's own
code when one errored (130 for an interrupt).

API::

    c = campaign.load("x86-smoke.toml")
    result = campaign.run(c, target_override=campaign.TargetOverride(pid=1234),
                          on_event=print)
    open("report.xml", "w").write(result.junit_xml())
    sys.exit(result.exit_code)

The VM's lock (:mod:`serrinj.ops.lock`) is held from the first step to the
last, so another serrinj run on the VM, a second campaign included, waits
for the campaign to end (or gives up after ``--lock-wait``) instead of
interleaving with it. Every injection goes through :mod:`serrinj.ops.inject`,
so each is audited like a command-line injection. The command line is
``serrinj run`` (:mod:`serrinj.cli`).
"""

from __future__ import annotations

from serrinj.campaign.junit import JunitReport
from serrinj.campaign.logwatch import _LogReader
from serrinj.campaign.model import (
    ARCH_ALIASES,
    DEFAULT_WAIT_S,
    FAULT_ARCH,
    Campaign,
    CampaignError,
    ExpectStep,
    InjectStep,
    PauseStep,
    Problem,
    Step,
    TargetOverride,
    TargetSpec,
    WaitStep,
)
from serrinj.campaign.results import CampaignResult, Execution, Progress
from serrinj.campaign.runner import run
from serrinj.campaign.schema import check_arch, load, loads

__all__ = [
    "ARCH_ALIASES",
    "DEFAULT_WAIT_S",
    "FAULT_ARCH",
    "Campaign",
    "CampaignError",
    "CampaignResult",
    "Execution",
    "ExpectStep",
    "InjectStep",
    "JunitReport",
    "PauseStep",
    "Problem",
    "Progress",
    "Step",
    "TargetOverride",
    "TargetSpec",
    "WaitStep",
    "_LogReader",
    "check_arch",
    "load",
    "loads",
    "run",
]
