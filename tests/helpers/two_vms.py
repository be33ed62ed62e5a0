"""A process holding two VMs, each with a vCPU 0, and a dup of the first one's vCPU fd.

Prints ``READY <vcpu fd of VM 1> <its dup> <vcpu fd of VM 2>`` and waits for the end
of stdin. Nothing runs: the point is what /proc shows, three ``kvm-vcpu:0`` links of
which two are one open file.
"""

import fcntl
import os
import sys

from serrinj import _native
from serrinj.kvm import api

kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
vm1 = _native.ioctl_int(kvm, api.KVM_CREATE_VM, 0)
vcpu1 = _native.ioctl_int(vm1, api.KVM_CREATE_VCPU, 0)
dup1 = fcntl.fcntl(vcpu1, fcntl.F_DUPFD_CLOEXEC, 0)
vm2 = _native.ioctl_int(kvm, api.KVM_CREATE_VM, 0)
vcpu2 = _native.ioctl_int(vm2, api.KVM_CREATE_VCPU, 0)
print(f"READY {vcpu1} {dup1} {vcpu2}", flush=True)
sys.stdin.read()
