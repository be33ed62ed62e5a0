"""A per-VM lock, so two serrinj runs never interleave on one VM.

The lock is an ``flock`` on ``<dir>/vm-<pid>-<starttime>.lock`` (the start
time keeps a reused pid from sharing a lock), with the holder's pid and
command line written inside for the error message. ``<dir>`` is
``$SERRINJ_LOCK_DIR``, else ``/run/serrinj`` when writable, else
``/tmp/serrinj-locks``. When serrinj runs as root for a caller who is not
root (sudo), ``SERRINJ_LOCK_DIR`` is ignored with a warning: the caller may not
choose where root creates files. It is re-entrant within one process.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import sys
import time
from typing import Dict, Iterator, Optional, Tuple

from serrinj.errors import Conflict, PermissionDenied

_held: Dict[Tuple[int, int], Tuple[int, int]] = {}  # (pid, starttime) -> (fd, depth)


def lock_dir() -> str:
    from serrinj.host import privilege

    return privilege.runtime_dir()


def _path(pid: int, starttime: int, directory: Optional[str] = None) -> str:
    return os.path.join(directory or lock_dir(), f"vm-{pid}-{starttime}.lock")


#: what the holder writes into the lock file, kept while the pid and argv stay the same
_me: Dict[Tuple[int, Tuple[str, ...]], bytes] = {}


def _holder_info() -> bytes:
    key = (os.getpid(), tuple(sys.argv))
    info = _me.get(key)
    if info is None:
        _me.clear()
        info = _me[key] = json.dumps({"pid": key[0], "argv": sys.argv}).encode()
    return info


def _holder(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            info = json.loads(f.read() or "{}")
        return f"serrinj process {info.get('pid')} ({' '.join(info.get('argv', []))})"
    except (OSError, ValueError):
        return "another serrinj process"


@contextlib.contextmanager
def vm_lock(pid: int, starttime: int, label: str, wait: float = 10.0) -> Iterator[None]:
    """Hold the VM's lock; wait up to ``wait`` seconds for another holder."""
    key = (pid, starttime)
    if key in _held:
        fd, depth = _held[key]
        _held[key] = (fd, depth + 1)
        try:
            yield
        finally:
            fd, depth = _held[key]
            _held[key] = (fd, depth - 1)
        return
    directory = lock_dir()
    path = _path(pid, starttime, directory)
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
    try:
        try:
            fd = os.open(path, flags, 0o666)
        except FileNotFoundError:  # the first lock: make the directory
            os.makedirs(directory, mode=0o1777, exist_ok=True)
            fd = os.open(path, flags, 0o666)
    except OSError as err:
        if err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        raise PermissionDenied(
            f"cannot take the lock of VM {label}: {path}: {err.strerror}",
            hint="set SERRINJ_LOCK_DIR to a directory this user may write; nothing was sent",
        ) from None
    deadline = time.monotonic() + wait
    delay = 0.01
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                if time.monotonic() >= deadline:
                    raise Conflict(
                        f"VM {label} is in use by {_holder(path)}",
                        hint=f"waited {wait:g} s; try again when it is done (--lock-wait SECONDS)",
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.2)
        # who holds it, for the message of a process that waits: written in place, and
        # whatever a holder that did not release it left beyond it cut off (the same
        # content as emptying the file first, with fewer writes to the file system)
        info = _holder_info()
        os.pwrite(fd, info, 0)
        if os.fstat(fd).st_size > len(info):
            os.ftruncate(fd, len(info))
        _held[key] = (fd, 1)
        try:
            yield
        finally:
            del _held[key]
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
