"""Host-side tooling of the arm64 lab: fetch, build, boot, report (``python -m lab.arm64``).

Modules: :mod:`~lab.arm64.config` (what the lab is made of),
:mod:`~lab.arm64.debian` (private apt root), :mod:`~lab.arm64.wheels` (PyPI),
:mod:`~lab.arm64.elf` and :mod:`~lab.arm64.cpio` (pure helpers),
:mod:`~lab.arm64.initramfs` (the three pieces), :mod:`~lab.arm64.prepare`
(the cache), :mod:`~lab.arm64.boot` (QEMU).
"""
