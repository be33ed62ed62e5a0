"""Coverage-guided fuzzing of serrinj's input parsers with atheris (libFuzzer for Python).

Usage (atheris is a test-only tool, not a serrinj dependency)::

    pip install atheris            # or: pip install --target DIR atheris; PYTHONPATH=DIR
    python fuzz/harness.py TARGET [libFuzzer options, e.g. -max_total_time=60 fuzz/corpus/TARGET]

TARGETs: ``esr`` (numbers and syndromes as users type them), ``events`` (the
events file loader), ``campaign`` (campaign files and their TOML subset),
``cli`` (the whole command line, in a world where discovery finds no VM, so
nothing can reach a VMM).

The rule is the one tests/test_fuzz.py checks with hypothesis: any input ends
in a result or in serrinj's InvalidInput (exit 2 on the command line), never in
another exception, a traceback or exit 1. A violation raises, and libFuzzer
saves the input as ``crash-*``.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from typing import Any, Callable, Dict, List, Optional

import atheris

with atheris.instrument_imports():
    from serrinj import campaign, cli
    from serrinj.codec import esr, tomlsubset
    from serrinj.errors import ExitCode, InvalidInput, TargetNotFound, Unsupported
    from serrinj.ops import audit, demo, events, guard
    from serrinj.target import attach as target
    from serrinj.target import discover


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="surrogateescape")


def fuzz_esr(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    value = fdp.ConsumeIntInRange(0, (1 << 66)) - (1 << 64)
    form = fdp.PickValueInList(["auto", "iss", "esr"])
    try:
        syn = esr.decode(value, form=form)
        syn.as_dict()
        if syn.injectable_iss is not None:
            esr.predict_linux(syn.injectable_iss).as_dict()
    except InvalidInput:
        pass
    text = fdp.ConsumeUnicodeNoSurrogates(40)
    for fn in (esr.parse_int, esr.resolve_iss):
        with contextlib.suppress(InvalidInput):
            fn(text)


def fuzz_events(data: bytes) -> None:
    try:
        snap = events.parse(_text(data), "f.json")
    except InvalidInput:
        return
    snap.dumps()


def fuzz_campaign(data: bytes) -> None:
    text = _text(data)
    for fn in (lambda t: campaign.loads(t, "c.toml"), lambda t: tomlsubset.loads(t, "c.toml")):
        with contextlib.suppress(InvalidInput):
            fn(text)


def _no_vm(*_args: Any, **_kwargs: Any) -> Any:
    raise TargetNotFound("no VM (fuzzing)")


def _empty_world() -> None:
    """Discovery finds no VM, fds resolve to nothing, the demo never starts a VM."""
    discover.scan = lambda arch=None: []  # type: ignore[assignment]
    discover.find = _no_vm  # type: ignore[assignment]
    discover.hidden = lambda: ()  # type: ignore[assignment]
    target.resolve_fd = _no_vm  # type: ignore[assignment]

    def no_demo(*_args: Any, **_kwargs: Any) -> Any:
        raise Unsupported("no demo (fuzzing)")

    demo.run = no_demo  # type: ignore[assignment]
    audit._syslog = None  # type: ignore[assignment]
    os.environ["SERRINJ_AUDIT_LOG"] = os.devnull


_DOCUMENTED = {int(c) for c in ExitCode} - {ExitCode.ERROR}
_LOCK_WAIT = guard.LOCK_WAIT


def fuzz_cli(data: bytes) -> None:
    argv: List[str] = [a for a in _text(data).split("\0")][:12]
    if argv and argv[0] == "":
        argv = argv[1:]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.run(argv)
    guard.LOCK_WAIT = _LOCK_WAIT
    stderr = re.sub(r"\x1b\[[0-9;]*m", "", err.getvalue())
    debug = "--debug" in argv  # tracebacks on request
    if rc not in _DOCUMENTED or "internal error" in stderr or ("Traceback" in stderr and not debug):
        raise RuntimeError(f"argv {argv!r}: exit {rc}\n{stderr}")
    if rc != 0:
        first = next((x for x in stderr.splitlines() if x.strip()), "")
        # a group without its command shows its help on stdout (click: no args is help)
        shown_help = not stderr.strip() and out.getvalue().startswith("Usage: ")
        if (
            not first.startswith(("error: ", "Usage: "))
            and not shown_help
            and "--debug" not in argv
        ):
            raise RuntimeError(f"argv {argv!r}: exit {rc} without an error line\n{stderr}")


TARGETS: Dict[str, Callable[[bytes], None]] = {
    "esr": fuzz_esr,
    "events": fuzz_events,
    "campaign": fuzz_campaign,
    "cli": fuzz_cli,
}


def main(argv: Optional[List[str]] = None) -> None:
    args = list(sys.argv if argv is None else argv)
    if len(args) < 2 or args[1] not in TARGETS:
        sys.exit(f"usage: {args[0]} {{{','.join(TARGETS)}}} [libFuzzer options]")
    name = args.pop(1)
    if name == "cli":
        _empty_world()
    atheris.Setup(args, TARGETS[name])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
