"""Run serrinj (or a script) with the engine held at one of its phases: a test-only launcher.

    python -m tests.helpers.paused_serrinj --pause-at PHASE --marker FILE [--skip N]
        [--script PATH] -- ARGS

installs a phase observer in :mod:`serrinj.remote.session` (the engine's only
test seam; serrinj itself never sets it) and then runs the CLI with ARGS in
this same process (or, with ``--script``, runs PATH with ARGS as its argv).
Each time the engine reaches PHASE (after the first N times), the observer
writes ``PID PHASE COUNT`` to FILE and waits, up to 60 s, until the test deletes
it. The test strikes meanwhile (a signal to this process, a kill of the VMM...).
"""

from __future__ import annotations

import argparse
import os
import runpy
import signal
import sys
import time
from typing import List, Optional

from serrinj.remote import session


def _observer(phase: str, marker: str, skip: int) -> session.PhaseObserver:
    seen = [0]

    def observe(name: str) -> None:
        if name != phase:
            return
        seen[0] += 1
        if seen[0] <= skip:
            return
        tmp = f"{marker}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()} {name} {seen[0]}\n")
        os.replace(tmp, marker)  # the test sees the file complete or not at all
        deadline = time.monotonic() + 60
        while os.path.exists(marker) and time.monotonic() < deadline:
            time.sleep(0.002)

    return observe


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="paused_serrinj")
    parser.add_argument("--pause-at", required=True, choices=session.PHASES)
    parser.add_argument("--marker", required=True)
    parser.add_argument("--skip", type=int, default=0, help="let the first N pass")
    parser.add_argument("--script", help="run this script instead of the serrinj CLI")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    opts = parser.parse_args(argv)
    args = opts.args[1:] if opts.args[:1] == ["--"] else opts.args
    session.phase_observer = _observer(opts.pause_at, opts.marker, opts.skip)
    # A job a shell starts in the background inherits SIGINT ignored (and so would
    # this process, under such a test run); the tests send SIGINT as a terminal's
    # Ctrl-C reaches a serrinj in the foreground, which has Python's own handler.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if opts.script:
        sys.argv = [opts.script, *args]
        runpy.run_path(opts.script, run_name="__main__")
        return
    from serrinj.cli import main as cli_main

    sys.argv = ["serrinj", *args]
    cli_main(args)


if __name__ == "__main__":
    main()
