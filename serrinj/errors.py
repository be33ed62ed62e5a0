"""The serrinj error tree.

Raw ``OSError``\\ s from the kernel are turned into these at one boundary per
layer (the remote engine, discovery, the vCPU layer). Every error names the
process, thread or vCPU it is about and carries a hint for the user. The CLI
maps each class to one exit code::

    SerrinjError                      1  generic failure
     +-- InvalidInput                 2  bad argument or file; nothing was sent
     |    +-- FileError               2  a file the user named could not be opened or written
     +-- TargetNotFound               3  no such VM, vCPU or thread
     |    +-- TargetGone              3  the target exited while we worked on it
     +-- PermissionDenied             4  ptrace, /dev/kvm, a caller's file or the policy refused
     +-- Unsupported                  5  the host, VM arch or VMM cannot do this
     |    +-- SeccompBlocked          5  the VMM's seccomp filter would refuse the call
     +-- KvmRejected                  6  KVM returned an error for the ioctl
     +-- NotDelivered                 7  --wait timed out; the fault is still pending
     +-- Conflict                     8  state forbids it (SError pending, thread traced, VM locked)
     +-- ExpectationFailed            9  a demo/campaign observation did not match
     +-- Interrupted                130  SIGINT/SIGTERM; the target was restored first

Exit code 0 means success. The table is the single source of truth for the
exit codes documented in the README and the man page.
"""

from __future__ import annotations

import enum
from typing import Optional


class ExitCode(enum.IntEnum):
    """Process exit codes of the ``serrinj`` command."""

    OK = 0
    ERROR = 1
    USAGE = 2
    NOT_FOUND = 3
    PERMISSION = 4
    UNSUPPORTED = 5
    KVM_REJECTED = 6
    NOT_DELIVERED = 7
    CONFLICT = 8
    EXPECTATION_FAILED = 9
    INTERRUPTED = 130


class SerrinjError(Exception):
    """Base class: a message for the user, a hint, and an exit code."""

    exit_code: ExitCode = ExitCode.ERROR

    def __init__(self, message: str, hint: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message

    @property
    def kind(self) -> str:
        """A stable machine-readable name for JSON output."""
        name = type(self).__name__
        out = []
        for i, ch in enumerate(name):
            if ch.isupper() and i:
                out.append("-")
            out.append(ch.lower())
        return "".join(out)


class InvalidInput(SerrinjError):
    """The user's input is malformed or out of range; nothing was sent."""

    exit_code = ExitCode.USAGE


class FileError(InvalidInput):
    """A file the user named (campaign, events, pid file, guest log, report) could not
    be opened or written; raised by :mod:`serrinj.host.privilege`, the boundary for
    the caller's files. ``errno`` and ``strerror`` are the kernel's, so that a caller
    can tell "does not exist" from the rest without catching ``OSError``."""

    def __init__(self, what: str, path: str, err: OSError, hint: Optional[str] = None) -> None:
        self.what = what
        self.path = path
        self.errno = err.errno
        self.strerror = str(err.strerror or err)
        super().__init__(f"cannot use the {what} {path}: {self.strerror}", hint)


class TargetNotFound(SerrinjError):
    """No VM, vCPU or thread matches what the user asked for."""

    exit_code = ExitCode.NOT_FOUND


class TargetGone(TargetNotFound):
    """The target process or thread exited while serrinj worked on it."""


class PermissionDenied(SerrinjError):
    """ptrace or /dev/kvm access was refused, or (under sudo) the caller may not use a
    file it named, or the policy refuses the operation."""

    exit_code = ExitCode.PERMISSION


class Unsupported(SerrinjError):
    """The host kernel, VM architecture or VMM cannot do what was asked."""

    exit_code = ExitCode.UNSUPPORTED


class SeccompBlocked(Unsupported):
    """The VMM's seccomp filter would trap, kill or refuse the ioctl."""


class KvmRejected(SerrinjError):
    """KVM returned an error for the ioctl (errno is kept)."""

    exit_code = ExitCode.KVM_REJECTED

    def __init__(self, message: str, errno: int, hint: Optional[str] = None) -> None:
        super().__init__(message, hint)
        self.errno = errno


class NotDelivered(SerrinjError):
    """The injected fault was still pending when ``--wait`` ran out."""

    exit_code = ExitCode.NOT_DELIVERED


class Conflict(SerrinjError):
    """The current state forbids the operation (e.g. an SError is already pending)."""

    exit_code = ExitCode.CONFLICT


class ExpectationFailed(SerrinjError):
    """An observation did not match the expectation (demo, campaign)."""

    exit_code = ExitCode.EXPECTATION_FAILED


class Interrupted(SerrinjError):
    """A signal stopped serrinj; the target was restored and detached first."""

    exit_code = ExitCode.INTERRUPTED
