"""A target process for engine tests: one thread loops in a chosen kind of syscall.

Usage: python workload.py KIND
KIND: nanosleep | futex | futex-forever | read | poll | spin
Prints ``READY <pid> <tid>`` once, then ``beat <n>`` every 0.1 s from a
second thread. If the looping thread ever sees a kernel-internal restart code
(512..516) as an error, it prints ``BAD <errno>`` and exits with status 3.
"""

import os
import select
import sys
import threading
import time

RESTART_CODES = {512, 513, 514, 516}
kind = sys.argv[1]
count = 0
r, w = os.pipe()
ev = threading.Event()


def beat() -> None:
    while True:
        time.sleep(0.1)
        if kind == "read":
            os.write(w, b"x")
        print(f"beat {count}", flush=True)


def one() -> None:
    if kind == "nanosleep":
        time.sleep(0.003)
    elif kind == "futex":
        ev.wait(0.003)
    elif kind == "futex-forever":
        ev.wait()
    elif kind == "read":
        os.read(r, 1)
    elif kind == "poll":
        p = select.poll()
        p.register(r, select.POLLIN)
        for _fd, _ in p.poll(3):
            os.read(r, 1)
    elif kind == "spin":
        sum(range(200))
    else:
        raise SystemExit(f"unknown kind {kind}")


# READY first: a heartbeat thread started before it can print "beat 0" ahead of it on a
# loaded machine (its 0.1 s sleep is no ordering).
print(f"READY {os.getpid()} {threading.get_native_id()}", flush=True)
threading.Thread(target=beat, daemon=True).start()
while True:
    try:
        one()
    except OSError as err:
        if err.errno in RESTART_CODES:
            print(f"BAD {err.errno}", flush=True)
            os._exit(3)
        raise
    count += 1
