"""The options the commands share, the shell completion of their values, and the
plumbing between a command and its :class:`~serrinj.cli.render.Ui`."""

from __future__ import annotations

import functools
from types import MappingProxyType
from typing import Any, Callable, List, Mapping, Optional, Tuple, TypeVar

import click

from serrinj.cli.render import Ui
from serrinj.errors import ExitCode

F = TypeVar("F", bound=Callable[..., Any])

#: what each exit code means (the README and the man page are generated from this)
EXIT_CODE_DOCS: Mapping[ExitCode, str] = MappingProxyType(
    {
        ExitCode.OK: "success",
        ExitCode.ERROR: "unexpected failure (an internal error; --debug shows the traceback)",
        ExitCode.USAGE: "bad arguments or input; nothing was sent",
        ExitCode.NOT_FOUND: "no such VM, vCPU, process or thread (or it exited meanwhile)",
        ExitCode.PERMISSION: "ptrace or /dev/kvm access refused, a file the sudo caller may not"
        " use, or the policy refuses it; nothing was sent",
        ExitCode.UNSUPPORTED: "the host, the VM's architecture or the VMM's sandbox cannot do it",
        ExitCode.KVM_REJECTED: "KVM returned an error for the ioctl",
        ExitCode.NOT_DELIVERED: "--wait ran out: the fault is still pending (or no MMIO exit)",
        ExitCode.CONFLICT: "the vCPU's state forbids it (e.g. an SError is already pending;"
        " --force overrides)",
        ExitCode.EXPECTATION_FAILED: "the guest did not observe what was injected (demo)",
        ExitCode.INTERRUPTED: "interrupted (Ctrl-C); every stopped thread was restored first",
    }
)

JSON_NOTE = (
    "Every command takes --json: one JSON object on stdout whose first keys are"
    ' "schema" ("serrinj/1") and "command", followed by the command\'s data.'
    " Integers are exact (64-bit values included). On failure the object is"
    ' {"schema", "command", "error": {"kind", "message", "hint", "exit_code"}}.'
    " `serrinj run` prints JSON lines instead: one compact object per step event"
    ' ({"schema", "command", "event": {...}}) as it happens, and the result as the last'
    " line (an error that stops the campaign before its first step is the error object)."
    " Diagnostics always go to stderr."
)
JSON_HELP = "Print one JSON object (schema serrinj/1) instead of text."
JSON_LINES_HELP = (
    "Print JSON lines (schema serrinj/1) instead of text: one object per step event as it"
    " happens, and the result as the last line."
)

#: kept in step with serrinj.codec.esr.SEVERITIES and serrinj.codec.mce.PRESETS/PRESET_ALIASES
#: (tests/test_cli_unit.py checks); spelled out so that --help imports neither
SEVERITY_CHOICES = ("ce", "ueo", "uer", "ueu", "uc")
MCE_PRESET_CHOICES = (
    "corrected",
    "ucna",
    "srao",
    "srar",
    "uc-fatal",
    "ce",
    "uncorrected",
    "uc",
    "fatal",
)
DEFAULT_WAIT_S = 5.0

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


# ====================================================================== plumbing
def _ui() -> Ui:
    ctx = click.get_current_context()
    ui = ctx.find_object(Ui)
    if ui is None:
        ui = ctx.ensure_object(Ui)
    return ui


def _command(name: str) -> Callable[[F], F]:
    """Set the JSON ``command`` name before the command body runs."""

    def deco(f: F) -> F:
        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            _ui().command = name
            return f(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return deco


def _set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.ensure_object(Ui).json = True


def _set_debug(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.ensure_object(Ui).debug = True


def _set_color(ctx: click.Context, _param: click.Parameter, value: Optional[str]) -> None:
    if value is not None:
        ctx.ensure_object(Ui).color = value


def _global_options(hidden: bool, json_help: str = JSON_HELP) -> Callable[[F], F]:
    def deco(f: F) -> F:
        f = click.option(
            "--color",
            type=click.Choice(["auto", "always", "never"]),
            default=None,
            expose_value=False,
            is_eager=True,
            callback=_set_color,
            hidden=hidden,
            help="Tables and colours on a terminal (auto, the default), always, or never."
            " NO_COLOR is honoured.",
        )(f)
        f = click.option(
            "--debug",
            is_flag=True,
            expose_value=False,
            is_eager=True,
            callback=_set_debug,
            hidden=hidden,
            help="Show a traceback when a command fails.",
        )(f)
        return click.option(
            "--json",
            is_flag=True,
            expose_value=False,
            is_eager=True,
            callback=_set_json,
            help=json_help,
        )(f)

    return deco


def json_option(f: F) -> F:
    """--json on every command (and --debug/--color, documented on `serrinj` itself)."""
    return _global_options(hidden=True)(f)


def json_lines_option(f: F) -> F:
    """--json for a command that streams: JSON lines, the result last (``run``)."""
    return _global_options(hidden=True, json_help=JSON_LINES_HELP)(f)


def _vms_quietly() -> List[Any]:
    from serrinj.ops import select

    return list(select.vms_quietly())


def _complete_pid(ctx: click.Context, _param: click.Parameter, incomplete: str) -> List[Any]:
    from click.shell_completion import CompletionItem

    return [
        CompletionItem(str(vm.pid), help=f"{vm.name or vm.comm} [{vm.vmm}, {vm.arch}]")
        for vm in _vms_quietly()
        if str(vm.pid).startswith(incomplete)
    ]


def _complete_name(ctx: click.Context, _param: click.Parameter, incomplete: str) -> List[Any]:
    from click.shell_completion import CompletionItem

    return [
        CompletionItem(vm.name, help=f"pid {vm.pid} [{vm.vmm}]")
        for vm in _vms_quietly()
        if vm.name and vm.name.startswith(incomplete)
    ]


def _complete_vcpu(ctx: click.Context, _param: click.Parameter, incomplete: str) -> List[Any]:
    from click.shell_completion import CompletionItem

    pid = ctx.params.get("pid")
    name = ctx.params.get("name")
    items: List[Any] = []
    seen = set()
    for vm in _vms_quietly():
        if (pid is not None and vm.pid != pid) or (name is not None and vm.name != name):
            continue
        for v in vm.vcpus:
            if v.vcpu_id in seen:
                continue
            seen.add(v.vcpu_id)
            tid = v.thread.tid if v.thread else "?"
            items.append(CompletionItem(str(v.vcpu_id), help=f"{vm.label}, thread {tid}"))
    items.append(CompletionItem("all", help="every vCPU of the VM"))
    return [i for i in items if i.value.startswith(incomplete)]


def target_options(f: F) -> F:
    """--pid/--name/--fd/--vcpu, shared by every command that touches a VM."""
    opts = [
        click.option(
            "--pid",
            type=int,
            shell_complete=_complete_pid,
            help="The VMM's process id.",
        ),
        click.option(
            "--name",
            shell_complete=_complete_name,
            help="The VM's name (QEMU -name guest=NAME, or the libvirt domain).",
        ),
        click.option(
            "--fd",
            type=int,
            metavar="N",
            help="A vCPU fd: one serrinj inherited (its VMM is found with kcmp), or with"
            " --pid, the target's fd N.",
        ),
        click.option(
            "--vcpu",
            metavar="ID|all",
            shell_complete=_complete_vcpu,
            help="The vCPU id (KVM's id, as `serrinj list` shows), or 'all'.",
        ),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _target_args(
    pid: Optional[int], name: Optional[str], fd: Optional[int], vcpu: Optional[str]
) -> Tuple[Optional[int], Optional[str], Any]:
    from serrinj.ops import select

    return select.target_args(pid, name, fd, vcpu)


def _resolve_injection_target(
    kind: str, pid: Optional[int], name: Optional[str], fd: Optional[int], vcpu: Optional[str]
) -> Any:
    from serrinj.ops import select

    return select.injection_target(kind, pid, name, fd, vcpu)


def _number(text: Optional[str], what: str, bits: int = 64) -> Optional[int]:
    if text is None:
        return None
    from serrinj.codec.numbers import parse_int

    return parse_int(text, what=what, bits=bits)


def wait_option(f: F) -> F:
    return click.option(
        "--wait",
        type=float,
        is_flag=False,
        flag_value=DEFAULT_WAIT_S,
        default=None,
        metavar="[SECONDS]",
        help=f"Poll the vCPU until the guest has taken the fault (default {DEFAULT_WAIT_S:g} s)"
        " and report the latency; exit 7 if it is still pending then.",
    )(f)


def readback_option(f: F) -> F:
    return click.option(
        "--readback/--no-readback",
        default=True,
        show_default=True,
        help="Read the vCPU's events before and after the send for the report. --no-readback"
        " holds the vCPU for the checks and the send alone (the shortest stall the guest"
        " sees); the report then shows no before/after.",
    )(f)


def dry_run_option(f: F) -> F:
    return click.option(
        "--dry-run",
        is_flag=True,
        help="Check everything and read the vCPU, show what would be sent and the"
        " prediction; send nothing.",
    )(f)
