"""``python -m serrinj`` and the ``serrinj`` console script.

The process is set up before the command line's modules are imported: importing a
command allocates tens of thousands of objects, none of them garbage, and Python's
default young-generation threshold (700) collects them some 40 times (about 17 while
``serrinj.cli`` and click load, the rest as the command loads its own; 5-10 ms of a
~80 ms start-up). A short-lived command does better with a higher threshold.
"""

from __future__ import annotations

import gc
from typing import NoReturn

#: the youngest generation's collection threshold of the ``serrinj`` process
GC_THRESHOLD_YOUNG = 10_000


def main() -> NoReturn:
    """The ``serrinj`` console script: :func:`serrinj.cli.main` in a process set up for it."""
    gc.set_threshold(GC_THRESHOLD_YOUNG, *gc.get_threshold()[1:])
    from serrinj.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
