"""Private copies of the root-owned paths serrinj uses, for tests that run it as root
for another user (sudo, a set-uid-like serrinj).

Such a serrinj ignores ``SERRINJ_AUDIT_LOG`` and ``SERRINJ_LOCK_DIR`` (the caller
may not move root's files), so the tests run it in a private mount namespace
where :data:`PRIVATE` are bind mounts of a temporary directory
(:func:`bind_prefix`): the machine's /etc/serrinj, /var/log/serrinj and
/run/serrinj are never read or written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, List

#: the root-owned paths serrinj uses, each replaced by a directory of the test's own
PRIVATE = ("/etc/serrinj", "/var/log/serrinj", "/run/serrinj")
#: the directories of a state directory that are mounted at :data:`PRIVATE`
STATE_DIRS = ("etc", "log", "run")
_BIND = (
    'mount --bind "$1" /etc/serrinj && mount --bind "$2" /var/log/serrinj'
    ' && mount --bind "$3" /run/serrinj && shift 3 && exec "$@"'
)


@contextlib.contextmanager
def private_state(prefix: str = "serrinj-state-") -> Iterator[Path]:
    """A temporary state directory (``etc/``, ``log/``, ``run/``, mode 0755), and the
    mount points of :data:`PRIVATE`; the mount points this made are removed after."""
    created: List[str] = []
    state = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        for d in STATE_DIRS:
            (state / d).mkdir(mode=0o755)
            (state / d).chmod(0o755)
        for mount_point in PRIVATE:
            if not os.path.isdir(mount_point):
                os.makedirs(mount_point, mode=0o755)
                created.append(mount_point)
        yield state
    finally:
        shutil.rmtree(state, ignore_errors=True)
        for mount_point in reversed(created):
            with contextlib.suppress(OSError):
                os.rmdir(mount_point)


def bind_prefix(unshare: str, state: Path) -> List[str]:
    """A command prefix: a private mount namespace where :data:`PRIVATE` are ``state``'s
    directories, then the rest of the command."""
    dirs = [str(state / d) for d in STATE_DIRS]
    return [unshare, "-m", "--propagation", "private", "--", "sh", "-c", _BIND, "sh", *dirs]


@contextlib.contextmanager
def world_writable_dir(prefix: str = "serrinj-priv-") -> Iterator[Path]:
    """A temporary directory every uid may write (mode 0777), removed after."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        d.chmod(0o777)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
