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

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from serrinj.remote.session import EngineError, RemoteThread

__all__ = ["EngineError", "RemoteThread"]


def __getattr__(name: str) -> Any:
    # The engine is loaded on first use: importing serrinj.remote.arch (discovery,
    # `serrinj list`) must not import the session, its frames and gadgets.
    if name in __all__:
        from serrinj.remote import session

        return getattr(session, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
