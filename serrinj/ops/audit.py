"""The audit trail: every injection attempt, with who, where, what and the outcome.

Each record is one JSON line appended to the audit file and one line to
syslog (the journal collects it). Auditing never blocks an injection: a
failure to write is kept in :data:`problems` for the CLI to report.

File: ``$SERRINJ_AUDIT_LOG`` if set; else ``/var/log/serrinj/audit.jsonl`` for
root and ``$XDG_STATE_HOME/serrinj/audit.jsonl`` (``~/.local/state/...``) for
other users. When serrinj runs as root for a caller who is not root (sudo),
the environment cannot move root's audit log: ``SERRINJ_AUDIT_LOG`` is then
ignored with a warning, and each record names the caller.
"""

from __future__ import annotations

import datetime
import json
import os
import pwd
import sys
from typing import Dict, List, Mapping, Optional, Tuple

try:
    import syslog as _syslog
except ImportError:  # pragma: no cover - not on Linux
    _syslog = None  # type: ignore[assignment]

#: why the last records could not be written (the CLI shows these as warnings)
problems: List[str] = []


def path() -> str:
    from serrinj.host import privilege

    env = privilege.env_path("SERRINJ_AUDIT_LOG", os.environ.get("SERRINJ_AUDIT_LOG"))
    if env:
        return env
    if os.geteuid() == 0:
        return "/var/log/serrinj/audit.jsonl"
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(state, "serrinj", "audit.jsonl")


_names: Dict[int, str] = {}
#: the last "user" of a record, by what it is made of (the ids, SUDO_USER, the caller)
_users: Dict[Tuple[int, int, Optional[str], object], Dict[str, object]] = {}


def _user() -> Dict[str, object]:
    from serrinj.host import privilege

    uid, euid = os.getuid(), os.geteuid()
    sudo_user = os.environ.get("SUDO_USER")
    caller = privilege.current()
    key = (uid, euid, sudo_user, caller)
    known = _users.get(key)
    if known is None:
        name = _names.get(uid)
        if name is None:  # the user database is read once per uid, not per record
            try:
                name = pwd.getpwuid(uid).pw_name
            except KeyError:
                name = str(uid)
            _names[uid] = name
        known = {
            "uid": uid,
            "euid": euid,
            "name": name,
            "sudo_user": sudo_user,
            # who serrinj acts for: the sudo caller's uid and name, or the user itself
            "caller": caller.as_dict(),
        }
        _users.clear()
        _users[key] = known
    # each record gets its own copy: a caller may change the entry it is given
    return {**known, "caller": dict(known["caller"])}  # type: ignore[call-overload]


#: json.dumps(..., default=str), without making a new encoder for every record
_encode = json.JSONEncoder(default=str).encode


def record(
    *,
    action: str,
    outcome: str,
    vm: Optional[Mapping[str, object]] = None,
    vcpu_id: Optional[int] = None,
    request: Optional[Mapping[str, object]] = None,
    error: Optional[Mapping[str, object]] = None,
    detail: Optional[Mapping[str, object]] = None,
) -> Dict[str, object]:
    """Append one audit record; returns it (tests and ``--json`` may show it).

    ``outcome`` is ``ok``, ``refused`` (validation stopped it; nothing was
    sent), ``failed`` (KVM or the engine failed), ``dry-run`` or ``not-delivered``.
    """
    entry: Dict[str, object] = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds"),
        "user": _user(),
        "serrinj_pid": os.getpid(),
        "argv": sys.argv,
        "action": action,
        "outcome": outcome,
        "vm": dict(vm) if vm else None,
        "vcpu_id": vcpu_id,
        "request": dict(request) if request else None,
        "error": dict(error) if error else None,
    }
    if detail:
        entry["detail"] = dict(detail)
    from serrinj.host import privilege

    line = _encode(entry)
    target = path()
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
    try:
        try:
            fd = os.open(target, flags, 0o640)
        except FileNotFoundError:  # the first record: make the directory
            os.makedirs(os.path.dirname(target), exist_ok=True)
            fd = os.open(target, flags, 0o640)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)
    except OSError as err:
        problems.append(f"cannot write the audit log {target}: {err.strerror}")
    if _syslog is not None:
        vm_text = f" vm={entry['vm']}" if vm else ""
        caller = privilege.current()
        caller_text = f" caller={caller.name} (uid {caller.uid})" if caller.elevated else ""
        _syslog.openlog("serrinj", _syslog.LOG_PID, _syslog.LOG_USER)
        _syslog.syslog(
            _syslog.LOG_NOTICE,
            f"{action} {outcome} user={entry['user']['name']}{caller_text}{vm_text}"  # type: ignore[index]
            f" vcpu={vcpu_id} request={_encode(request) if request else '-'}"
            + (f" error={error.get('message')}" if error else ""),
        )
    return entry


def read(limit: Optional[int] = None, log: Optional[str] = None) -> List[Dict[str, object]]:
    """The last ``limit`` records (all when ``None``); unreadable lines are skipped."""
    try:
        with open(log or path(), encoding="utf-8") as f:
            lines = f.readlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines[-limit:] if limit else lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
