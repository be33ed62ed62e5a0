"""The KVM uAPI as data: ioctl numbers, capabilities and struct codecs. No I/O here.

- ``serrinj.kvm.api``     numbers common to every arch (ioctls, caps, exit reasons)
- ``serrinj.kvm.arm64``   arm64 ``kvm_vcpu_events``, core-register ids, PSTATE bits
- ``serrinj.kvm.x86_64``  x86 ``kvm_vcpu_events``, ``kvm_x86_mce``, regs/sregs
"""
