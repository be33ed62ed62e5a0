"""Installs seccomp filters given as hex on argv, then serves ioctl probes.

Reads lines "REQ" (hex ioctl request) on stdin, runs ioctl(0, REQ, 0) and
prints "errno <n>" (0 on success). Counts SIGSYS signals; "sigsys" prints the
count. "wait" parks the main thread in a futex-free read loop for tracing.
"""

import os
import signal
import sys

from serrinj import _native

sigsys = 0


def on_sigsys(signo, frame):
    global sigsys
    sigsys += 1


signal.signal(signal.SIGSYS, on_sigsys)
for prog in sys.argv[1:]:
    _native.seccomp_install_filter(bytes.fromhex(prog))
print(f"READY {os.getpid()}", flush=True)
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "sigsys":
        print(f"sigsys {sigsys}", flush=True)
        continue
    try:
        _native.ioctl_int(0, int(cmd, 16), 0)
        print("errno 0", flush=True)
    except OSError as err:
        print(f"errno {err.errno}", flush=True)
