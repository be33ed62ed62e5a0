"""Use cases: what a serrinj command does, as plain functions returning data.

No rich, no click: the CLI calls these and hands the results to the
renderer; tests, the benchmark and campaigns call them directly.
"""
