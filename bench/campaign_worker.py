"""A long campaign in one process, for figure 5: ``python -m bench.campaign_worker``.

Runs ``inject.inject_nmi`` (what campaigns run per step: lock, audit, the
events before and after, one engine session) ``--count`` times against one
vCPU, and prints a JSON line with its resident set size every ``--every``
injections, then a final line with the peak.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence


def rss_kb() -> int:
    """The current resident set size (/proc/self/statm), in KiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


def peak_kb() -> int:
    """This process's own peak RSS (VmHWM; ru_maxrss would include the parent's at fork)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from serrinj.ops import inject
    from serrinj.target import attach as target
    from serrinj.target import discover

    parser = argparse.ArgumentParser(prog="python -m bench.campaign_worker")
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--vcpu", type=int, default=0)
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--every", type=int, default=200)
    args = parser.parse_args(argv)
    vm = target.ensure_mapped(discover.find(pid=args.pid), (args.vcpu,))
    tgt = target.Target(vm, (args.vcpu,))
    t0 = time.monotonic()
    print(json.dumps({"i": 0, "rss_kb": rss_kb(), "t": 0.0}), flush=True)
    for i in range(1, args.count + 1):
        inject.inject_nmi(tgt)
        if i % args.every == 0 or i == args.count:
            print(json.dumps({"i": i, "rss_kb": rss_kb(), "t": time.monotonic() - t0}), flush=True)
    peak = peak_kb()
    print(json.dumps({"done": True, "maxrss_kb": peak, "seconds": time.monotonic() - t0}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
