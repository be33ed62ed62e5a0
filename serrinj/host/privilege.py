"""Who serrinj acts for, and the files it opens on that caller's behalf.

serrinj needs root to reach a VMM (ptrace of another uid, seccomp filters), so
labs grant it through sudo. Run that way, serrinj holds rights its caller does
not have, and it must not lend them out: every file the caller *names* (a
campaign, a guest log, a JUnit report, an events file, a pid file) is opened
with the caller's credentials, and the environment cannot move root's own
files (the audit log, the lock directory).

The caller
----------
- ``root``: real and effective uid 0 and no ``SUDO_UID`` (or sudo run by root);
- ``sudo``: effective uid 0 and ``SUDO_UID``/``SUDO_GID`` naming another user
  (sudo sets them itself and overwrites any the caller passes); the caller's
  supplementary groups are the user database's (``getgrouplist``), as sudo's
  own policy sees them;
- ``setuid``: effective uid 0 with another real uid (a setuid-root copy);
- ``user``: serrinj runs with its caller's own rights; nothing to do.

Files as the caller
-------------------
:func:`as_caller` gives the *calling thread* the caller's fsuid, fsgid and
supplementary groups for the duration of a ``with`` block. Linux keeps
credentials per thread; the raw ``setfsuid``/``setfsgid``/``setgroups`` system
calls change only the calling thread (glibc's ``setgroups`` would broadcast the
change to every thread of the process, a progress bar's included), so no other
thread ever runs as the caller, and the thread itself keeps its real and
effective uid 0 and CAP_SYS_PTRACE: ptrace and /dev/kvm keep root's rights. A
fsuid other than 0 drops the file capabilities (CAP_DAC_OVERRIDE, ...) from
the thread, so the kernel checks the caller's permissions, path search
included, exactly as for the caller's own process; the credentials are put
back before the block's exceptions propagate. This was preferred to opening in
a forked child that drops to the caller and passes the fd back (SCM_RIGHTS):
the same checks, without forking a Python process that may run threads, and
cheap enough for the guest-log follower that reopens its file every 50 ms.

A file the caller may not open is refused with :class:`PermissionDenied`
(exit 4) naming the file and the uid. Files on /proc are refused outright for
such a caller: /proc/self is serrinj itself, root's process, whose own files
the kernel always lets it open.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import stat as stat_mod
import threading
from typing import IO, Any, Iterator, List, NamedTuple, Optional, Tuple

from serrinj.errors import FileError, PermissionDenied

__all__ = [
    "Caller",
    "as_caller",
    "current",
    "env_path",
    "open_file",
    "refusal",
    "stat",
    "warnings",
]

#: warnings for the CLI to show on stderr (an ignored environment override)
warnings: List[str] = []

#: variables that would move a root-owned path; ignored for a caller who is not root
ROOT_PATH_VARIABLES = ("SERRINJ_AUDIT_LOG", "SERRINJ_LOCK_DIR")

_SECBIT_NO_SETUID_FIXUP = 1 << 2


class Caller(NamedTuple):
    """The user serrinj acts for."""

    uid: int
    gid: int
    groups: Tuple[int, ...]
    name: str
    #: root | sudo | setuid | user
    via: str

    @property
    def elevated(self) -> bool:
        """serrinj runs with root's rights on behalf of a caller who is not root."""
        return self.via in ("sudo", "setuid")

    @property
    def group_names(self) -> Tuple[str, ...]:
        out = []
        for gid in (self.gid, *self.groups):
            try:
                name = grp.getgrgid(gid).gr_name
            except KeyError:
                name = str(gid)
            if name not in out:
                out.append(name)
        return tuple(out)

    def as_dict(self) -> dict:  # type: ignore[type-arg]
        return {"uid": self.uid, "gid": self.gid, "name": self.name, "via": self.via}


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def identify(
    ruid: int,
    euid: int,
    rgid: int,
    groups: Tuple[int, ...],
    sudo_uid: Optional[str] = None,
    sudo_gid: Optional[str] = None,
) -> Caller:
    """The caller, from the process's ids and sudo's variables (pure but for user lookups)."""
    if euid == 0 and ruid == 0:
        if sudo_uid and sudo_uid.isdigit() and int(sudo_uid) != 0:
            uid = int(sudo_uid)
            name = _user_name(uid)
            gid = int(sudo_gid) if sudo_gid and sudo_gid.isdigit() else uid
            try:
                members = tuple(os.getgrouplist(name, gid)) if name != str(uid) else (gid,)
            except OSError:
                members = (gid,)
            return Caller(uid, gid, tuple(sorted(set(members))), name, "sudo")
        return Caller(0, rgid, groups, "root", "root")
    if euid == 0:
        return Caller(ruid, rgid, groups, _user_name(ruid), "setuid")
    return Caller(ruid, rgid, groups, _user_name(ruid), "user")


_cache: List[Caller] = []


def current() -> Caller:
    """The caller of this serrinj process (computed once)."""
    if not _cache:
        _cache.append(
            identify(
                os.getuid(),
                os.geteuid(),
                os.getgid(),
                tuple(os.getgroups()),
                os.environ.get("SUDO_UID"),
                os.environ.get("SUDO_GID"),
            )
        )
    return _cache[0]


def reset() -> None:
    """Forget the cached caller (after a change of identity, in tests of this module)."""
    _cache.clear()


def env_path(variable: str, value: Optional[str]) -> Optional[str]:
    """``value``, read from ``$variable`` which would move a root-owned path, or
    ``None`` (and a warning) when the caller may not move root's files.

    A caller who is not root runs serrinj with root's rights through sudo: it
    must not choose where root appends its audit records or takes its locks.
    """
    if not value:
        return None
    who = current()
    if who.elevated:
        note = (
            f"{variable} is ignored: serrinj runs as root for uid {who.uid} ({who.name}),"
            " who may not move root's files"
        )
        if note not in warnings:
            warnings.append(note)
        return None
    return value


# ---------------------------------------------------------------------- file access
class _Switch(threading.local):
    depth = 0


_switch = _Switch()


@contextlib.contextmanager
def as_caller() -> Iterator[Caller]:
    """Within the block, the calling thread opens files with the caller's credentials.

    A no-op unless serrinj acts for a caller who is not root. Re-entrant.
    """
    who = current()
    if not who.elevated or _switch.depth:
        _switch.depth += 1
        try:
            yield who
        finally:
            _switch.depth -= 1
        return
    from serrinj import _native

    if _native.securebits() & _SECBIT_NO_SETUID_FIXUP:
        raise PermissionDenied(
            "serrinj runs with SECBIT_NO_SETUID_FIXUP: it cannot drop root's file"
            f" capabilities to open files as uid {who.uid} ({who.name})",
            hint="run serrinj through a plain sudo rule; nothing was sent",
        )
    old = _native.set_thread_fs_creds(who.uid, who.gid, who.groups)
    _switch.depth = 1
    try:
        yield who
    finally:
        _switch.depth = 0
        _native.set_thread_fs_creds(*old)


def refusal(what: str, path: str, err: OSError) -> PermissionDenied:
    """The error for a file the caller may not use."""
    who = current()
    return PermissionDenied(
        f"{what} {path}: {err.strerror or 'permission denied'} for uid {who.uid} ({who.name})",
        hint=f"serrinj opens the files you name with your own rights ({who.via}); nothing was sent",
    )


def _is_denied(err: OSError) -> bool:
    return err.errno in (errno.EACCES, errno.EPERM)


def _on_proc(fd: int) -> bool:
    try:
        return os.fstat(fd).st_dev == os.stat("/proc").st_dev
    except OSError:
        return False


def open_file(
    path: str,
    mode: str,
    what: str,
    *,
    encoding: Optional[str] = None,
) -> IO[Any]:
    """``open(path, mode)`` with the caller's credentials.

    A permission refusal raises :class:`PermissionDenied` (exit 4) naming
    ``what`` (e.g. "campaign file"), the file and the uid; any other error
    raises :class:`FileError` (exit 2) with the path and the kernel's errno.
    """
    who = current()
    try:
        with as_caller():
            f = open(path, mode, encoding=encoding)  # noqa: SIM115 (returned)
    except OSError as err:
        if who.elevated and _is_denied(err):
            raise refusal(what, path, err) from None
        raise FileError(what, path, err) from err
    if who.elevated and _on_proc(f.fileno()):
        f.close()
        raise refusal(what, path, OSError(errno.EACCES, "files on /proc are refused"))
    return f


def stat(path: str, what: str) -> Optional[os.stat_result]:
    """``os.stat(path)`` with the caller's credentials; ``None`` when it does not exist.

    A path the caller may not even look up raises :class:`PermissionDenied`.
    """
    who = current()
    try:
        with as_caller():
            st = os.stat(path)
    except OSError as err:
        if who.elevated and _is_denied(err):
            raise refusal(what, path, err) from None
        return None
    return st


def replace(src: str, dst: str, what: str) -> None:
    """``os.replace`` with the caller's credentials."""
    who = current()
    try:
        with as_caller():
            os.replace(src, dst)
    except OSError as err:
        if who.elevated and _is_denied(err):
            raise refusal(what, dst, err) from None
        raise FileError(what, dst, err) from err


def unlink_quietly(path: str) -> None:
    """Remove a file of the caller's (a temporary one), ignoring errors."""
    with contextlib.suppress(OSError), as_caller():
        os.unlink(path)


def is_regular(st: os.stat_result) -> bool:
    return stat_mod.S_ISREG(st.st_mode)


def runtime_dir() -> str:
    """Where serrinj keeps its locks and per-boot caches (``$SERRINJ_LOCK_DIR`` if allowed)."""
    env = env_path("SERRINJ_LOCK_DIR", os.environ.get("SERRINJ_LOCK_DIR"))
    if env:
        return env
    if os.access("/run", os.W_OK):
        return "/run/serrinj"
    return "/tmp/serrinj-locks"
