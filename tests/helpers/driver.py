"""Runs one remote getpid in PID/TID and reports how it ended (for fault tests).

Exit codes: 0 done, 3 target gone, 130 SIGINT, 143 SIGTERM.
"""

import signal
import sys

from serrinj.errors import TargetGone
from serrinj.remote import RemoteThread


def on_term(signo, frame):
    raise SystemExit(143)


signal.signal(signal.SIGTERM, on_term)
pid, tid = int(sys.argv[1]), int(sys.argv[2])
t = RemoteThread(pid, tid)
try:
    with t:
        print("result", t.syscall(t.arch.nr["getpid"]), flush=True)
    print("verified", t.verified, flush=True)
except TargetGone as err:
    print("gone", err, flush=True)
    sys.exit(3)
except KeyboardInterrupt:
    # Delivered only when the session unblocked signals, i.e. after the detach.
    print("interrupted; verified", t.verified, flush=True)
    sys.exit(130)
except SystemExit:
    print("terminated; verified", t.verified, flush=True)
    raise
