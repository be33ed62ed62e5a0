"""serrinj's built-in test VM: a minimal VMM with tiny guests that report what they observe.

- ``vmm``        the arch-independent core (threads, kicks, commands, events) and
                 the ``GuestArch`` interface each architecture implements
- ``x86_64``     the x86 guest (real mode; NMI and machine-check handlers)
- ``asm_x86``    the x86 mini-assembler the guests are built with
- ``process``    run the test VM as a separate process (tests, benchmarks, the lab)
- ``profiles``   the thread, fd, vcpu-id and seccomp layouts of real VMMs (``--profile``)
- ``firmware_x86``  a firmware-style guest for a real QEMU (``-bios``)

Run it with ``python -m serrinj.testvm --help``.
"""
