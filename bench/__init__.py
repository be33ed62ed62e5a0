"""``make bench``: serrinj measured against gdb and QEMU's monitor, side by side.

Run it with ``python -m bench`` (see :mod:`bench.__main__`). Each figure is a
module (``fig_*.py``) whose ``run(ctx, progress)`` returns a JSON-able dict
with a table, the goals it checks and the raw samples; :mod:`bench.stats`
holds the (unit-tested) statistics and formatting.
"""
