"""serrinj: a RAS fault injector for KVM.

serrinj attaches to a running VM's vCPU thread and injects a virtual SError
(arm64), a machine check or an NMI (x86_64). KVM only accepts vCPU ioctls
from the process that created the VM, so the ioctl is executed *inside* the
VMM, as a ptrace-driven remote syscall in the vCPU's own thread.

Layers, from the kernel up:

- ``serrinj._native``  cffi bindings to libc (the only module that imports cffi)
- ``serrinj.kvm``      the KVM uAPI as data: ioctl numbers, caps, struct codecs
- ``serrinj.remote``   the ptrace remote-syscall engine
- ``serrinj.discover`` /proc scanning: VMs, vCPU fds, vCPU threads
- ``serrinj.esr``      SError syndrome codec (``serrinj.mce`` for x86 MCi_STATUS)
- ``serrinj.vcpu``     a vCPU reachable through a local or remote executor
- ``serrinj.ops``      use cases (status, inject, events, campaigns)
- ``serrinj.cli`` / ``serrinj.render``  click commands and rich/JSON output
"""

__version__ = "0.1.0"
