"""The ptrace remote-syscall engine.

KVM accepts vCPU ioctls only from the VM's creator (BRIEF section 1), so
serrinj runs them as syscalls of a thread of the VMM:

- :mod:`serrinj.remote.arch`     register layouts and syscall ABI, one class per arch
- :mod:`serrinj.remote.ptrace`   requests, wait-status decoding
- :mod:`serrinj.remote.session`  :class:`RemoteThread`: seize, borrow, restore, detach
- :mod:`serrinj.remote.gadget`   finding existing code: syscall, ``syscall; ret``, sigreturn
- :mod:`serrinj.remote.sigframe` the resume frame a thread restores itself from if serrinj dies
- :mod:`serrinj.remote.seccomp`  evaluating the thread's seccomp filters first
"""

from serrinj.remote.session import EngineError, RemoteThread

__all__ = ["EngineError", "RemoteThread"]
