"""The arm64 lab: an emulated arm64 host with the RAS extension and KVM, for serrinj's arm64 tests.

This x86_64 machine cannot run arm64 KVM, so ``make lab-arm64`` boots Debian's
arm64 kernel under ``qemu-system-aarch64 -M virt,virtualization=on -cpu max``
(TCG), with an initramfs holding Python, serrinj from the working tree and the
in-lab suite, which runs inside and reports on the serial console. See
``lab/README.md`` for the commands, the matrix, the cache and how it works.

Layout::

    lab/protocol.py   the console line protocol (both sides)
    lab/skips.py      the skips each kind of boot accepts; any other skip fails the boot
    lab/arm64/        host side: fetch, build the initramfs, boot, report
    lab/guest/        guest side: /init, the runner, the pytest plugin, the inner QEMU helper
    lab/suite/        the tests that run inside the lab

Adding a test: put a ``test_*.py`` file (or a function in an existing one)
in ``lab/suite/``; nothing needs registering. It runs as root on the emulated
arm64 host with pytest, ``serrinj`` importable from the working tree, and the
fixtures of ``lab/suite/conftest.py``: ``lab`` (the boot's settings: ``cpu``,
``kernel``, ``expect_ras``, ``with_qemu``), ``kvm_fd`` (an open /dev/kvm) and
``nested`` (the inner QEMU's files; use :class:`lab.guest.nested.InnerQemu` to
start a real arm64 VMM with a Linux guest and end it by pid). Assert against
``lab.expect_ras`` rather than probing, so each check can fail on both CPU
models. Helpers shared by several tests go in ``lab/guest/`` (shipped to the
guest too); the host-side tooling in ``lab/arm64/`` is not. Run one file with
``python -m lab.arm64 run --kernel 6.1 --cpu max -- lab/suite/test_x.py``, or
interactively with ``make lab-shell`` and ``lab-suite lab/suite/test_x.py``.
Extra PyPI packages for the tests go in ``LAB_WHEELS`` of ``lab/arm64/config.py``
(arm64 wheels are fetched and cached); extra Debian packages in its payload tables.
"""
