"""The ``serrinj`` command line: click commands that parse, call a use case, and render.

Each command checks its arguments, calls one function of :mod:`serrinj.ops`
(or the pure codecs :mod:`serrinj.codec.esr` / :mod:`serrinj.codec.mce`), and hands the
result's ``as_dict()`` to the :class:`~serrinj.cli.render.Ui` built once in
:func:`run` and passed down as ``ctx.obj``. Errors are
:class:`~serrinj.errors.SerrinjError`\\ s; :func:`run` turns them (and click's
usage errors, Ctrl-C and unexpected exceptions) into ``error:``/``hint:``
lines, a JSON error object with ``--json``, and an exit code from
:class:`~serrinj.errors.ExitCode`.

Start-up matters for a tool people script: the use cases, the codecs and rich
are imported inside the commands, so ``serrinj --help`` loads click alone.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, List, Mapping, NoReturn, Optional, Sequence

import click

from serrinj import __version__
from serrinj.cli.options import (
    CONTEXT_SETTINGS as CONTEXT_SETTINGS,
)
from serrinj.cli.options import (
    DEFAULT_WAIT_S as DEFAULT_WAIT_S,
)
from serrinj.cli.options import (
    EXIT_CODE_DOCS as EXIT_CODE_DOCS,
)
from serrinj.cli.options import (
    JSON_HELP as JSON_HELP,
)
from serrinj.cli.options import (
    JSON_LINES_HELP as JSON_LINES_HELP,
)
from serrinj.cli.options import (
    JSON_NOTE as JSON_NOTE,
)
from serrinj.cli.options import (
    MCE_PRESET_CHOICES as MCE_PRESET_CHOICES,
)
from serrinj.cli.options import (
    SEVERITY_CHOICES as SEVERITY_CHOICES,
)
from serrinj.cli.options import (
    F as F,
)
from serrinj.cli.options import (
    _command as _command,
)
from serrinj.cli.options import (
    _complete_name as _complete_name,
)
from serrinj.cli.options import (
    _complete_pid as _complete_pid,
)
from serrinj.cli.options import (
    _complete_vcpu as _complete_vcpu,
)
from serrinj.cli.options import (
    _global_options as _global_options,
)
from serrinj.cli.options import (
    _number as _number,
)
from serrinj.cli.options import (
    _resolve_injection_target as _resolve_injection_target,
)
from serrinj.cli.options import (
    _set_color as _set_color,
)
from serrinj.cli.options import (
    _set_debug as _set_debug,
)
from serrinj.cli.options import (
    _set_json as _set_json,
)
from serrinj.cli.options import (
    _target_args as _target_args,
)
from serrinj.cli.options import (
    _ui as _ui,
)
from serrinj.cli.options import (
    _vms_quietly as _vms_quietly,
)
from serrinj.cli.options import (
    dry_run_option as dry_run_option,
)
from serrinj.cli.options import (
    json_lines_option as json_lines_option,
)
from serrinj.cli.options import (
    json_option as json_option,
)
from serrinj.cli.options import (
    readback_option as readback_option,
)
from serrinj.cli.options import (
    target_options as target_options,
)
from serrinj.cli.options import (
    wait_option as wait_option,
)
from serrinj.cli.render import Ui
from serrinj.errors import ExitCode, InvalidInput, SerrinjError


# ====================================================================== the group
def _set_lock_wait(ctx: click.Context, _param: click.Parameter, value: Optional[float]) -> None:
    if value is None:
        return
    if not value >= 0:  # NaN too
        raise click.BadParameter("the wait must be a number of seconds, 0 or more")
    from serrinj.ops import guard

    guard.LOCK_WAIT = value


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "-V", "--version", prog_name="serrinj")
@_global_options(
    hidden=False,
    json_help="Print one JSON object (schema serrinj/1) instead of text; `run` prints JSON"
    " lines, the result last.",
)
@click.option(
    "--lock-wait",
    type=float,
    envvar="SERRINJ_LOCK_WAIT",
    metavar="SECONDS",
    expose_value=False,
    is_eager=True,
    callback=_set_lock_wait,
    help="How long to wait for another serrinj run on the same VM (default 10; SERRINJ_LOCK_WAIT).",
)
def cli() -> None:
    """Inject RAS faults into a running KVM VM's vCPU: a virtual SError (arm64),
    a machine check or an NMI (x86_64).

    KVM takes vCPU ioctls only from the process that created the VM, so
    serrinj runs each ioctl inside the VMM, as a ptrace-driven system call in
    one seized thread, and restores that thread bit for bit. The VMM and its
    other threads keep running.

    --json, --debug and --color may also follow the command name.
    """


# ====================================================================== list
@cli.command("list", short_help="List KVM VMs, their vCPUs and vCPU threads.")
@click.option(
    "--probe",
    is_flag=True,
    help="Map vCPUs whose thread is unknown by briefly stopping candidate threads"
    " (ptrace); nothing of them is changed.",
)
@click.option("--pid", type=int, shell_complete=_complete_pid, help="Only this process.")
@click.option("--name", shell_complete=_complete_name, help="Only the VM with this name.")
@json_option
@_command("list")
def list_cmd(probe: bool, pid: Optional[int], name: Optional[str]) -> None:
    """List the KVM VMs on this host, their vCPUs and the threads that run them."""
    from serrinj.cli.views import view_list
    from serrinj.ops.listing import list_vms
    from serrinj.ops.status import vm_dict

    ui = _ui()
    vms = list_vms(pid, name, probe=probe, warn=ui.warn)
    if not vms and not ui.json:
        ui.note("no KVM VMs are running on this host")
    ui.emit({"vms": [vm_dict(vm) for vm in vms]}, view_list)


# ====================================================================== status
@cli.command("status", short_help="Show host caps and each vCPU's state and events.")
@target_options
@json_option
@_command("status")
def status_cmd(
    pid: Optional[int], name: Optional[str], fd: Optional[int], vcpu: Optional[str]
) -> None:
    """Show host capabilities and each vCPU's thread, state and pending events.

    For each vCPU: the thread and where it was (in-guest, halted, userspace,
    stopped), and the decoded KVM events. On arm64: whether an SError is
    pending, its ESR decoded, and whether the guest masks SErrors (PSTATE.A).
    On x86_64: pending or injected exceptions, NMIs, SMIs. Reading stops each
    vCPU thread for a moment; nothing is changed.

    On arm64 it also reads the exception the guest took last (ESR_EL1, ELR_EL1,
    SPSR_EL1, PC and VBAR_EL1 through KVM_GET_ONE_REG): an SError taken shows
    there with its syndrome, also on Linux 6.17 and later, where an unmasked
    SError is taken at injection and never reads as pending. A PC at the SError
    vector means the SError is in the guest's registers and its handler has not
    run yet (a paused VM runs it when it resumes).
    """
    from serrinj.cli.views import view_status
    from serrinj.ops import status

    pid, name, spec = _target_args(pid, name, fd, vcpu)
    report = status.status(pid, name, spec)
    _ui().emit(report.as_dict(), view_status)


# ====================================================================== inject (arm64)
@cli.command("inject", short_help="Inject an SError or ext. data abort (arm64).")
@target_options
@click.option(
    "--esr",
    "esr_text",
    metavar="VALUE",
    help="The SError syndrome (ISS, bits [24:0] of the guest's ESR_EL1), a number or a"
    " severity name. Needs a host with RAS (KVM_CAP_ARM_INJECT_SERROR_ESR).",
)
@click.option(
    "--severity",
    type=click.Choice(SEVERITY_CHOICES),
    help="Build a RAS syndrome: DFSC 0x11 with this AET (ce 0x1811, ueo 0x811,"
    " uer 0xc11, ueu 0x411, uc 0x11).",
)
@click.option(
    "--ext-dabt",
    is_flag=True,
    help="Inject a synchronous external data abort instead. KVM aims it at the access of"
    " the vCPU's last exit, so serrinj waits for the vCPU's next MMIO exit (a guest access"
    " to an emulated address) and injects right there; a guest that makes none gets"
    " nothing (exit 7). KVM never shows the abort pending, so --wait cannot confirm its"
    " delivery and is refused with it.",
)
@click.option(
    "--mmio-addr",
    metavar="ADDR",
    help="With --ext-dabt: only an MMIO exit at this guest-physical address.",
)
@click.option(
    "--mmio-timeout",
    type=float,
    metavar="SECONDS",
    help="With --ext-dabt: how long to wait for the MMIO exit (default 5).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Inject even if an SError is already pending (it cannot be cancelled).",
)
@wait_option
@dry_run_option
@json_option
@_command("inject")
def inject_cmd(
    pid: Optional[int],
    name: Optional[str],
    fd: Optional[int],
    vcpu: Optional[str],
    esr_text: Optional[str],
    severity: Optional[str],
    ext_dabt: bool,
    mmio_addr: Optional[str],
    mmio_timeout: Optional[float],
    force: bool,
    wait: Optional[float],
    dry_run: bool,
) -> None:
    """Inject a virtual SError into an arm64 vCPU (or, with --ext-dabt, an external data abort).

    With neither --esr nor --severity, KVM injects the SError without a
    syndrome and the CPU reports an implementation-defined one (IDS=1); this
    works on hosts without RAS too. A Linux guest survives CE and UEO SErrors
    and panics on the others (see `serrinj esr decode`). Everything is checked
    before the VM is touched; a refused request sends nothing.

    When the vCPU takes the SError depends on the host kernel. Up to Linux 6.16
    KVM keeps it pending until the vCPU next runs the guest with SErrors
    unmasked. Since 6.17 an SError the guest has unmasked is put into the vCPU's
    registers inside KVM_SET_VCPU_EVENTS (PC at the SError vector), even in a
    paused VM: serrinj reports it delivered at injection (0 polls, with or
    without --wait), and a paused VM's guest handles it when it resumes. A masked
    one stays pending with its ESR on every kernel until the guest unmasks.
    serrinj tells these apart by probing the kernel (an SError set on a
    throwaway one-vCPU VM of its own, cached per boot), never by its version;
    the prediction (--dry-run too) says which applies.
    """
    from serrinj import faults
    from serrinj.ops import inject

    if ext_dabt and (esr_text is not None or severity is not None or force):
        raise InvalidInput("--ext-dabt takes no syndrome (--esr/--severity) and no --force")
    if not ext_dabt and (mmio_addr is not None or mmio_timeout is not None):
        raise InvalidInput("--mmio-addr and --mmio-timeout go with --ext-dabt")
    if wait is not None and wait <= 0:
        raise InvalidInput(f"--wait {wait:g}: the timeout must be positive")
    if ext_dabt:
        dabt = faults.ExtDabt.from_fields({"mmio_addr": mmio_addr, "mmio_timeout": mmio_timeout})
        dabt.validate(wait)
        tgt = _resolve_injection_target(dabt.kind, pid, name, fd, vcpu)
        _inject(
            lambda: inject.inject_ext_dabt(tgt, dabt, wait, dry_run=dry_run),
            wait,
            dry_run,
            "waiting for an MMIO exit",
        )
    else:
        req = faults.SError.from_fields({"esr": esr_text, "severity": severity, "force": force})
        tgt = _resolve_injection_target(req.kind, pid, name, fd, vcpu)
        _inject(lambda: inject.inject_serror(tgt, req, wait, dry_run=dry_run), wait, dry_run)


def _inject(
    send: Callable[[], List[Any]], wait: Optional[float], dry_run: bool, doing: str = ""
) -> None:
    """Run the injection ``send`` under a progress line (``doing``) and show its results."""
    from serrinj.cli.views import view_injections

    ui = _ui()
    if not doing:
        doing = "injecting" if wait is None or dry_run else "waiting for the guest to take it"
    with ui.progress(doing):
        injs = send()
    ui.emit({"dry_run": dry_run, "injections": [i.as_dict() for i in injs]}, view_injections)


# ====================================================================== mce (x86_64)
@cli.command("mce", short_help="Raise a machine check (x86_64).")
@target_options
@click.option("--bank", type=int, metavar="N", help="The machine-check bank (MCi); required.")
@click.option(
    "--status",
    "status_text",
    metavar="V",
    help="MCi_STATUS: a number, or flags joined by commas (val,over,uc,en,miscv,addrv,pcc,s,ar).",
)
@click.option("--addr", metavar="A", help="MCi_ADDR (default 0).")
@click.option("--misc", metavar="M", help="MCi_MISC (default 0, or the preset's).")
@click.option(
    "--mcg-status",
    metavar="S",
    help="MCG_STATUS: a number or flags (ripv,eipv,mcip,lmce_s); default 0 or the preset's.",
)
@click.option(
    "--preset",
    type=click.Choice(MCE_PRESET_CHOICES, case_sensitive=False),
    help="A ready-made error: corrected (logged, no exception), ucna, srao, srar (as QEMU"
    " injects for host memory errors), uc-fatal (PCC: the guest panics). Aliases: ce,"
    " uncorrected/uc/fatal. --status/--misc/--mcg-status override its fields.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Inject even when KVM would turn it into a triple fault or drop it silently.",
)
@wait_option
@dry_run_option
@readback_option
@json_option
@_command("mce")
def mce_cmd(
    pid: Optional[int],
    name: Optional[str],
    fd: Optional[int],
    vcpu: Optional[str],
    bank: Optional[int],
    status_text: Optional[str],
    addr: Optional[str],
    misc: Optional[str],
    mcg_status: Optional[str],
    preset: Optional[str],
    force: bool,
    wait: Optional[float],
    dry_run: bool,
    readback: bool,
) -> None:
    """Raise a machine check on an x86_64 vCPU (KVM_X86_SET_MCE).

    An uncorrected error (UC) raises #MC (vector 18) in the guest; a corrected
    one is only written to the bank, where the guest finds it when it polls.
    Before sending, serrinj reads the vCPU's CR4, MCG_CAP/MCG_STATUS and the
    bank's MCi_CTL and predicts what KVM will do: an error KVM would turn into
    a triple fault (CR4.MCE clear, a machine check in progress) or drop
    silently (MCi_CTL not all ones) is refused unless --force.
    """
    from serrinj import faults
    from serrinj.ops import inject

    if wait is not None and wait <= 0:
        raise InvalidInput(f"--wait {wait:g}: the timeout must be positive")
    fault = faults.MachineCheck.from_fields(
        {
            "bank": bank,
            "preset": preset,
            "status": status_text,
            "addr": addr,
            "misc": misc,
            "mcg_status": mcg_status,
            "force": force,
        }
    )
    tgt = _resolve_injection_target("mce", pid, name, fd, vcpu)
    _inject(
        lambda: inject.inject_mce(tgt, fault, wait, dry_run=dry_run, readback=readback),
        wait,
        dry_run,
    )


# ====================================================================== nmi (x86_64)
@cli.command("nmi", short_help="Queue an NMI (x86_64).")
@target_options
@wait_option
@dry_run_option
@readback_option
@json_option
@_command("nmi")
def nmi_cmd(
    pid: Optional[int],
    name: Optional[str],
    fd: Optional[int],
    vcpu: Optional[str],
    wait: Optional[float],
    dry_run: bool,
    readback: bool,
) -> None:
    """Queue an NMI on an x86_64 vCPU (KVM_NMI).

    A Linux guest with no NMI source logs "Uhhuh. NMI received for unknown
    reason". With --wait, serrinj polls until the NMI is no longer pending.
    """
    from serrinj.ops import inject

    if wait is not None and wait <= 0:
        raise InvalidInput(f"--wait {wait:g}: the timeout must be positive")
    tgt = _resolve_injection_target("nmi", pid, name, fd, vcpu)
    _inject(lambda: inject.inject_nmi(tgt, wait, dry_run=dry_run, readback=readback), wait, dry_run)


# ====================================================================== esr (pure)
@cli.group("esr", short_help="Decode and build arm64 SError syndromes.")
def esr_group() -> None:
    """Decode and build arm64 SError syndromes (no VM needed)."""


def _esr_data(value: int, form: str) -> Mapping[str, Any]:
    from serrinj.codec import esr

    syn = esr.decode(value, form=form)
    linux = None
    if syn.injectable_iss is not None:
        linux = esr.predict_linux(syn.injectable_iss).as_dict()
    return {"syndrome": syn.as_dict(), "linux": linux}


@esr_group.command("decode", short_help="Decode an SError ISS or ESR_EL1.")
@click.argument("value")
@click.option(
    "--form",
    type=click.Choice(["auto", "iss", "esr"]),
    default="auto",
    show_default=True,
    help="Read VALUE as an ISS (bits [24:0]) or a full ESR_ELx; auto: a value above"
    " 0x1ffffff is a full ESR.",
)
@json_option
@_command("esr decode")
def esr_decode_cmd(value: str, form: str) -> None:
    """Decode an SError syndrome: an ISS or a full ESR_EL1 (e.g. from a guest's log).

    Shows every field and what a Linux guest does when it takes it: survive,
    or panic with the console line it prints, and what differs between host
    kernels: on a RAS host the guest reads the same ESR_EL1 on Linux 6.1, 6.12
    and 7.2, but since 6.17 an SError the guest has unmasked is taken at
    injection rather than left pending (see `serrinj inject`), and without RAS
    such an SError reads IDS=1 (0xbf000000) rather than the CPU's own.
    """
    from serrinj.cli.views import view_esr
    from serrinj.codec import esr

    number = esr.parse_int(value, what="ESR")
    _ui().emit(_esr_data(number, form), view_esr)


@esr_group.command("encode", short_help="Build an SError ISS from its fields.")
@click.option("--severity", type=click.Choice(SEVERITY_CHOICES), help="The AET by name.")
@click.option("--aet", type=click.IntRange(0, 7), help="A raw AET (0-7; reserved values allowed).")
@click.option("--dfsc", metavar="N", help="DFSC (default 0x11, asynchronous SError).")
@click.option("--ea", is_flag=True, help="Set EA (external abort type).")
@click.option("--iesb", is_flag=True, help="Set IESB (synchronized by an IESB).")
@click.option("--ids", is_flag=True, help="IDS=1: an implementation-defined syndrome.")
@click.option("--impdef", metavar="N", help="With IDS: the implementation-defined bits [23:0].")
@json_option
@_command("esr encode")
def esr_encode_cmd(
    severity: Optional[str],
    aet: Optional[int],
    dfsc: Optional[str],
    ea: bool,
    iesb: bool,
    ids: bool,
    impdef: Optional[str],
) -> None:
    """Build an SError ISS from its fields, for `serrinj inject --esr`.

    With no option: 0x11, an asynchronous SError graded UC.
    """
    from serrinj.cli.views import view_esr
    from serrinj.codec import esr

    iss = esr.encode(
        severity,
        aet=aet,
        dfsc=_number(dfsc, "--dfsc", bits=6),
        ea=ea,
        iesb=iesb,
        ids=ids,
        impdef=_number(impdef, "--impdef", bits=24),
    )
    data = {"iss": iss, "guest_esr": esr.guest_esr(iss)}
    data.update(_esr_data(iss, "iss"))
    _ui().emit(data, view_esr)


# ====================================================================== demo
@cli.command("demo", short_help="Inject into the built-in test VM and compare.")
@click.option(
    "--arch",
    type=click.Choice(["auto", "x86_64", "aarch64"]),
    default="auto",
    show_default=True,
    help="The test VM's architecture; it must be the host's (KVM runs native guests).",
)
@json_option
@_command("demo")
def demo_cmd(arch: str) -> None:
    """Start the built-in test VM, inject faults, and compare with what the guest saw.

    x86_64: an NMI, a corrected and an uncorrected machine check. arm64: an
    SError with a RAS syndrome and one whose syndrome the CPU chooses. The
    guest reports what it observed as JSON events; the demo exits 0 only when
    every injection was observed as injected (9 otherwise). The test VM is
    ended by pid on every path, Ctrl-C included.
    """
    from serrinj.cli.views import view_demo
    from serrinj.ops import demo

    ui = _ui()
    with ui.progress("starting the test VM") as step:
        result = demo.run(arch=None if arch == "auto" else arch, progress=step)
    data = result.as_dict()
    if result.ok:
        ui.emit(data, view_demo)
        return
    # one JSON object even on failure: the data, plus the error
    err = demo.mismatch_error(result)
    data["error"] = {
        "kind": err.kind,
        "message": err.message,
        "hint": err.hint,
        "exit_code": int(err.exit_code),
    }
    ui.emit(data, view_demo)
    ui.error(err.kind, err.message, err.hint, err.exit_code, stdout=False)
    raise click.exceptions.Exit(int(err.exit_code))


# ====================================================================== events
@cli.group("events", short_help="Save and load vCPU events (migrate pending faults).")
def events_group() -> None:
    """Save every vCPU's KVM_GET_VCPU_EVENTS, with what is needed to interpret it, as
    versioned JSON, and load it into another VM of the same architecture.

    A pending SError keeps its ESR and a pending NMI stays pending, as a VMM's
    migration would move them. A cross-arch load, or an ESR load onto a host
    without RAS, is refused before anything is sent.
    """


@events_group.command("save", short_help="Save a VM's vCPU events to a file.")
@target_options
@click.option("-o", "--output", metavar="FILE", help="Write to FILE (default: stdout).")
@json_option
@_command("events save")
def events_save_cmd(
    pid: Optional[int],
    name: Optional[str],
    fd: Optional[int],
    vcpu: Optional[str],
    output: Optional[str],
) -> None:
    """Save the events of every vCPU (or --vcpu) as JSON (schema serrinj-events/1).

    Without -o the file itself goes to stdout (`serrinj events save > a.json`).
    """
    from serrinj.cli.views import view_events_saved
    from serrinj.ops import events, select

    ui = _ui()
    tgt = select.resolve(pid, name, fd, vcpu)
    out = events.OutputFile(output) if output is not None else None
    try:
        snap = events.save(tgt)
    except BaseException:
        if out is not None:
            out.discard()
        raise
    if out is None and not ui.json:
        sys.stdout.write(snap.dumps())
        return
    if out is not None:
        out.commit(snap.dumps())
    ui.emit({"file": output, "snapshot": snap.as_dict()}, view_events_saved)


@events_group.command("load", short_help="Load saved vCPU events into a VM.")
@click.argument("file", metavar="FILE")
@target_options
@click.option(
    "--force",
    is_flag=True,
    help="Load even if an SError is already pending on a vCPU (it cannot be cancelled).",
)
@json_option
@_command("events load")
def events_load_cmd(
    file: str,
    pid: Optional[int],
    name: Optional[str],
    fd: Optional[int],
    vcpu: Optional[str],
    force: bool,
) -> None:
    """Load FILE (from `serrinj events save`; - for stdin) into the matching vCPUs.

    vCPUs are matched by vcpu_id. Each vCPU's events are read before and after.
    """
    from serrinj.cli.views import view_events_loaded
    from serrinj.ops import events, select
    from serrinj.ops.status import vm_dict

    ui = _ui()
    text = events.read_file(file)
    snap = events.parse(text, file)
    tgt = select.resolve(pid, name, fd, vcpu)
    results = events.load(tgt, snap, force=force)
    ui.emit(
        {
            "file": file,
            "arch": snap.arch,
            "vm": vm_dict(tgt.vm),
            "results": [r.as_dict() for r in results],
        },
        view_events_loaded,
    )


# ====================================================================== campaigns
@cli.command("run", short_help="Run a campaign of injections and expectations (TOML).")
@click.argument("campaign_file", metavar="CAMPAIGN.toml")
@click.option("--pid", type=int, shell_complete=_complete_pid, help="The VMM (replaces [target]).")
@click.option("--name", shell_complete=_complete_name, help="The VM's name (replaces [target]).")
@click.option("--pid-file", metavar="FILE", help="A file holding the VMM's pid.")
@click.option("--log", metavar="FILE", help="The guest's log file (replaces [target] log).")
@click.option("--junit", metavar="FILE", help="Write a JUnit XML report (Jenkins, GitLab).")
@click.option("--check-only", is_flag=True, help="Only load and check the file; touch no VM.")
@dry_run_option
@json_lines_option
@_command("run")
def run_cmd(
    campaign_file: str,
    pid: Optional[int],
    name: Optional[str],
    pid_file: Optional[str],
    log: Optional[str],
    junit: Optional[str],
    check_only: bool,
    dry_run: bool,
) -> None:
    """Run the steps of CAMPAIGN.toml: injections (with delivery confirmation),
    waits, pauses and expectations on the guest's log.

    The whole file is checked first (errors name the line and key) and nothing
    is injected if it has an error. The VM is locked for the whole run, so no
    other serrinj run interleaves with it (see --lock-wait). A progress bar
    shows on a terminal, and a line per finished step goes to stderr otherwise
    (a CI log); with --json, every step event is one JSON line, and the result
    is the last line (--check-only: one object).
    Exit 0 when every step passed, 9 when one failed, or the error's own code.
    See examples/ and examples/README.md for the format.
    """
    from serrinj import campaign
    from serrinj.cli.views import view_campaign

    ui = _ui()
    if sum(x is not None for x in (pid, name, pid_file)) > 1:
        raise InvalidInput("give only one of --pid, --name and --pid-file")

    # opened first, with the caller's rights: a report the caller may not write is
    # refused before anything is sent (exit 4 under sudo), not found out at the end
    report = campaign.JunitReport(junit, ui.warn) if junit and not check_only else None

    def write_junit(result: Any) -> None:
        if report is not None:
            report.write(result)

    try:
        c = campaign.load(campaign_file)
    except SerrinjError as err:
        if not check_only:
            write_junit(campaign.CampaignResult.from_error(err, campaign_file))
        raise
    if check_only:
        ui.emit({"campaign": c.as_dict(), "ok": True}, lambda _d: [])
        if not ui.json:
            ui.note(f"{campaign_file}: ok")
        return
    with ui.progress_bar(f"campaign {c.name}") as update:

        def on_event(p: Any) -> None:
            if ui.json:
                ui.emit_line({"event": p.as_dict()})
            elif p.event == "message":
                ui.note(p.message)
            elif p.event == "step-finished":
                ui.step_line(p.index, p.total, p.outcome or "", p.name, p.duration_s, p.message)
            update(p.index, p.total, p.name or p.kind or c.name)

        try:
            result = campaign.run(
                c,
                target_override=campaign.TargetOverride(pid, name, pid_file, log),
                dry_run=dry_run,
                on_event=on_event,
            )
        except SerrinjError as err:
            write_junit(campaign.CampaignResult.from_error(err, campaign_file, c.name))
            raise
    write_junit(result)
    data = result.as_dict()
    data["junit"] = junit
    if ui.json:
        ui.emit_line(data)
    else:
        ui.emit(data, view_campaign)
    if result.exit_code:
        if not ui.json:
            ui.error("campaign-failed", result.summary(), None, result.exit_code, stdout=False)
        raise click.exceptions.Exit(result.exit_code)


# ====================================================================== entry points
def _flag_in(args: Sequence[str], flag: str) -> bool:
    """Whether ``flag`` is among the options of ``args`` (before any ``--``); read before
    click parses, without importing the use cases (``--help`` stays cheap)."""
    end = args.index("--") if "--" in args else len(args)
    return flag in args[:end]


def _usage_error(ui: Ui, err: click.ClickException) -> int:
    code = int(getattr(err, "exit_code", ExitCode.USAGE))
    ctx = getattr(err, "ctx", None)
    # NoArgsIsHelpError is click >= 8.2 (Python >= 3.10); older clicks print help themselves
    no_args = getattr(click.exceptions, "NoArgsIsHelpError", ())
    if (no_args and isinstance(err, no_args)) or (
        isinstance(err, click.UsageError) and ctx is not None and not err.format_message()
    ):
        err.show()
        return code
    hint = None
    if ctx is not None:
        if not ui.command:
            ui.command = " ".join(ctx.command_path.split()[1:])
        hint = f"see '{ctx.command_path} --help'"
    ui.error("usage", err.format_message(), hint, code)
    return code


_INTERRUPT_HINT = "serrinj restores and detaches a stopped thread before it acts on a signal"


def _traceback() -> None:
    import traceback

    traceback.print_exc()


def _audit_attempt(
    ui: Ui, args: Sequence[str], err: BaseException, raised: Optional[BaseException] = None
) -> None:
    """Audit an injection attempt that failed before its use case recorded it."""
    from serrinj.ops import guard

    action = guard.command_action(ui.command, args)
    if action is None:
        return

    if any(x is not None and guard.was_audited(x) for x in (err, raised)):
        return
    try:
        guard.record_refusal(action, {"argv": list(args)}, err)
    except Exception as problem:  # auditing never turns into another failure
        ui.warn(f"cannot audit this attempt: {problem}")


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def run(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line and return the exit code (never raises).

    SIGTERM and SIGHUP end a command like Ctrl-C does (exit 130): the engine
    holds them while it owns a VMM thread, and acts on them once that thread
    is restored and detached.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return _run(argv)
    previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return _run(argv)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(argv: Optional[Sequence[str]]) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    ui = Ui(
        json=_flag_in(args, "--json"),
        debug=_flag_in(args, "--debug") or bool(os.environ.get("SERRINJ_DEBUG")),
    )
    if not args and not os.environ.get("_SERRINJ_COMPLETE"):
        # A bare `serrinj` is a usage error (exit 2) with the help, on every click version.
        with click.Context(cli, info_name="serrinj") as ctx:
            click.echo(cli.get_help(ctx))
        return int(ExitCode.USAGE)
    try:
        rv = cli.main(args=args, prog_name="serrinj", standalone_mode=False, obj=ui)
        return int(rv) if isinstance(rv, int) else 0
    except click.exceptions.Exit as e:
        return int(e.exit_code)
    except SystemExit as e:
        # shell completion ends here (click exits after printing the candidates)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else ExitCode.ERROR)
    except click.ClickException as e:
        code = _usage_error(ui, e)
        _audit_attempt(ui, args, InvalidInput(e.format_message()), e)
        return code
    except click.Abort as e:
        # click turns Ctrl-C during a command into Abort
        _audit_attempt(ui, args, e.__cause__ or KeyboardInterrupt(), e)
        ui.error("interrupted", "interrupted", _INTERRUPT_HINT, ExitCode.INTERRUPTED)
        return ExitCode.INTERRUPTED
    except SerrinjError as e:
        _audit_attempt(ui, args, e)
        if ui.debug:
            _traceback()
        details = {"errno": e.errno} if hasattr(e, "errno") else None
        ui.error(e.kind, e.message, e.hint, e.exit_code, details=details)
        return int(e.exit_code)
    except KeyboardInterrupt as e:
        _audit_attempt(ui, args, e)
        if ui.debug:
            _traceback()
        ui.error("interrupted", "interrupted", _INTERRUPT_HINT, ExitCode.INTERRUPTED)
        return ExitCode.INTERRUPTED
    except BrokenPipeError:
        # the reader went away (`serrinj list | head`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return ExitCode.ERROR
    except Exception as e:
        _audit_attempt(ui, args, e)
        if ui.debug:
            _traceback()
        ui.error(
            "internal-error",
            f"internal error: {type(e).__name__}: {e}",
            None if ui.debug else "run again with --debug for the traceback, and report it",
            ExitCode.ERROR,
        )
        return ExitCode.ERROR
    finally:
        # an audit record that could not be written is never silent, nor an ignored
        # environment override
        privilege = sys.modules.get("serrinj.host.privilege")
        for note in getattr(privilege, "warnings", ()):
            ui.warn(note)
        audit = sys.modules.get("serrinj.ops.audit")
        for problem in getattr(audit, "problems", ()):
            ui.warn(problem)


def main(argv: Optional[Sequence[str]] = None) -> NoReturn:
    """Run the command line and exit with its code (the console script,
    :func:`serrinj.__main__.main`, sets the process up first)."""
    sys.exit(run(argv))
