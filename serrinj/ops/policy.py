"""Who may do what through sudo: the optional, root-owned ``/etc/serrinj/policy.toml``.

serrinj granted through sudo hands its caller root's reach over every VM of
the host. The policy file narrows it, per caller, VM, operation and severity,
as libvirt's polkit ACLs do per domain. It applies only to callers that serrinj
acts for with rights they do not have (sudo, a setuid copy): root itself, and a
user running serrinj with its own rights, are never restricted by it. Without
the file, sudo callers keep every right (``serrinj status`` says so).

The file::

    # rules are tried in order; the first that matches decides; none: refused
    [[rule]]
    name = "no-fatal-into-others"   # named in refusals, `serrinj status`, the audit log
    effect = "deny"                 # allow (the default) or deny
    users = ["*"]                   # caller names or uids; "*": any caller
    owner = "other"                 # the VMM process is not the caller's own
    severity = "fatal"              # what the guest is predicted to do: fatal | survivable

    [[rule]]
    name = "ras-lab"
    groups = ["ras"]                # the caller's groups (names or gids)
    vms = ["ras-*"]                 # VM names (shell globs); a nameless VM matches only "*"
    do = ["*"]                      # operations, see below

    [[rule]]
    name = "ras-look-elsewhere"
    groups = ["ras"]
    do = ["status"]

Selectors (all optional but ``users``/``groups``, of which a rule needs one;
every selector given must match): ``users``, ``groups``, ``vms``, ``domains``
(libvirt domain names, globs), ``vmm_users`` (the VMM process's owner: names,
uids, or ``"caller"``), ``owner`` (``"caller"`` or ``"other"``), ``do`` and
``severity``. Operations: ``status`` and ``events-save`` (reads; ``read`` is
both), ``serror``, ``ext-dabt``, ``mce``, ``nmi`` and ``events-load``
(``inject`` is all five), ``*``. A severity selector matches only
injections, graded by serrinj's own prediction of a Linux guest: a SError whose
syndrome Linux treats as uncontainable, an external data abort, a machine
check the guest panics on, or events that carry one of these, are ``fatal``;
the rest are ``survivable``.

This module is pure (parse, decide) but for :func:`load_system` and
:func:`enforce`, which read the file and audit refusals.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import stat as stat_mod
from typing import (
    TYPE_CHECKING,
    Any,
    Dict,
    FrozenSet,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

from serrinj._lazy import module_getattr
from serrinj.errors import InvalidInput, PermissionDenied

if TYPE_CHECKING:
    from serrinj.ops.policy_model import Decision as Decision
    from serrinj.ops.policy_model import Policy as Policy
    from serrinj.ops.policy_model import Request as Request
    from serrinj.ops.policy_model import Rule as Rule
    from serrinj.ops.policy_model import Subject as Subject

#: the policy's one place: no option or variable moves it
POLICY_PATH = "/etc/serrinj/policy.toml"

READS = ("status", "events-save")
INJECTIONS = ("serror", "ext-dabt", "mce", "nmi", "events-load")
OPERATIONS = READS + INJECTIONS
_ALIASES: Mapping[str, Tuple[str, ...]] = {"read": READS, "inject": INJECTIONS, "*": OPERATIONS}
SEVERITIES = ("fatal", "survivable")
_RULE_KEYS = (
    "name",
    "effect",
    "users",
    "groups",
    "vms",
    "domains",
    "vmm_users",
    "owner",
    "do",
    "severity",
)

Ident = Union[str, int]

#: the policy's data classes live in :mod:`serrinj.ops.policy_model`, imported when a
#: policy applies (a caller acting with rights it does not have): root never builds them
_MODEL = ("Decision", "Policy", "Request", "Rule", "Subject")


__getattr__ = module_getattr(
    __name__, globals(), {n: ("serrinj.ops.policy_model", n) for n in _MODEL}
)


def _problem(source: str, line: int, message: str) -> InvalidInput:
    return InvalidInput(f"{source}:{line}: {message}")


def _idents(source: str, line: int, key: str, value: Any) -> Tuple[Ident, ...]:
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value:
        raise _problem(source, line, f"{key} must be a non-empty list of names or ids")
    out: List[Ident] = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            raise _problem(source, line, f"{key}: {item!r} is not a name or an id")
        if isinstance(item, int) and item < 0:
            raise _problem(source, line, f"{key}: {item} is not an id")
        out.append(item)
    return tuple(out)


def _globs(source: str, line: int, key: str, value: Any) -> Tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise _problem(source, line, f"{key} must be a non-empty list of names (globs)")
    return tuple(value)


def _operations(source: str, line: int, value: Any) -> FrozenSet[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise _problem(source, line, "do must be a non-empty list of operations")
    out: List[str] = []
    for item in value:
        if not isinstance(item, str):
            raise _problem(source, line, f"do: {item!r} is not an operation")
        if item in _ALIASES:
            out.extend(_ALIASES[item])
        elif item in OPERATIONS:
            out.append(item)
        else:
            known = ", ".join((*OPERATIONS, *_ALIASES))
            raise _problem(source, line, f"do: unknown operation {item!r} (known: {known})")
    return frozenset(out)


def parse(text: str, source: str = POLICY_PATH) -> Policy:
    """Parse and check policy text (:class:`InvalidInput` names the line)."""
    from serrinj.codec import tomlsubset  # only when a policy file is read
    from serrinj.ops.policy_model import Policy, Rule

    doc = tomlsubset.loads(text, source)
    extra = [k for k in doc.data if k != "rule"]
    if extra:
        raise _problem(source, doc.line((extra[0],)), f"unknown key {extra[0]!r} (only [[rule]])")
    raw_rules = doc.data.get("rule", [])
    if not isinstance(raw_rules, list):
        raise _problem(source, doc.line(("rule",)), "rules are [[rule]] tables")
    rules: List[Rule] = []
    names = set()
    for i, raw in enumerate(raw_rules):
        line = doc.line(("rule", i))
        if not isinstance(raw, dict):
            raise _problem(source, line, "a rule is a [[rule]] table")
        for key in raw:
            if key not in _RULE_KEYS:
                raise _problem(
                    source,
                    doc.line(("rule", i, key)),
                    f"unknown key {key!r} in a rule (known: {', '.join(_RULE_KEYS)})",
                )
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise _problem(source, line, "every rule needs a name")
        if name in names:
            raise _problem(source, line, f"two rules are named {name!r}")
        names.add(name)
        effect = raw.get("effect", "allow")
        if effect not in ("allow", "deny"):
            raise _problem(source, line, f"effect must be allow or deny, not {effect!r}")
        if "users" not in raw and "groups" not in raw:
            raise _problem(source, line, f"rule {name!r} says for whom: give users, groups or both")
        owner = raw.get("owner")
        if owner is not None and owner not in ("caller", "other"):
            raise _problem(source, line, f"owner must be caller or other, not {owner!r}")
        severity = raw.get("severity")
        if severity is not None and severity not in (*SEVERITIES, "*"):
            raise _problem(
                source, line, f"severity must be fatal, survivable or *, not {severity!r}"
            )
        rules.append(
            Rule(
                name=name,
                line=line,
                allow=effect == "allow",
                users=_idents(source, line, "users", raw["users"]) if "users" in raw else (),
                groups=_idents(source, line, "groups", raw["groups"]) if "groups" in raw else (),
                vms=_globs(source, line, "vms", raw["vms"]) if "vms" in raw else (),
                domains=_globs(source, line, "domains", raw["domains"]) if "domains" in raw else (),
                vmm_users=(
                    _idents(source, line, "vmm_users", raw["vmm_users"])
                    if "vmm_users" in raw
                    else ()
                ),
                owner=owner,
                do=_operations(source, line, raw["do"]) if "do" in raw else frozenset(OPERATIONS),
                severity=None if severity in (None, "*") else severity,
            )
        )
    return Policy(source, tuple(rules))


# ---------------------------------------------------------------------- decide
def _ident_matches(idents: Sequence[Ident], number: int, names: Union[str, FrozenSet[str]]) -> bool:
    name_set = {names} if isinstance(names, str) else set(names)
    for item in idents:
        if item == "*":
            return True
        if isinstance(item, int) and item == number:
            return True
        if isinstance(item, str) and item in name_set:
            return True
    return False


def _who_matches(rule: Rule, who: Subject) -> bool:
    if rule.users and _ident_matches(rule.users, who.uid, who.name):
        return True
    if rule.groups:
        for item in rule.groups:
            if item == "*":
                return True
            if isinstance(item, int) and item in who.gids:
                return True
            if isinstance(item, str) and item in who.group_names:
                return True
    return False


def _glob_any(globs: Sequence[str], value: Optional[str]) -> bool:
    return any(fnmatch.fnmatchcase(value or "", g) for g in globs)


def matches(rule: Rule, who: Subject, req: Request, vmm_names: FrozenSet[str]) -> bool:
    """Whether every selector of ``rule`` holds for ``who`` doing ``req``."""
    if not _who_matches(rule, who):
        return False
    if req.operation not in rule.do:
        return False
    if rule.severity is not None and req.severity != rule.severity:
        return False
    if rule.vms and not _glob_any(rule.vms, req.vm_name):
        return False
    if rule.domains and (req.domain is None or not _glob_any(rule.domains, req.domain)):
        return False
    own = req.vmm_uid is not None and req.vmm_uid == who.uid
    if rule.owner == "caller" and not own:
        return False
    if rule.owner == "other" and own:
        return False
    if rule.vmm_users:
        if req.vmm_uid is None:
            return False
        plain = [u for u in rule.vmm_users if u != "caller"]
        by_caller = own and "caller" in rule.vmm_users
        if not (by_caller or _ident_matches(plain, req.vmm_uid, vmm_names)):
            return False
    return True


def decide(
    policy: Policy, who: Subject, req: Request, vmm_names: FrozenSet[str] = frozenset()
) -> Decision:
    """The first rule of ``policy`` that matches decides; no match refuses.

    ``vmm_names`` are the user names of ``req.vmm_uid`` (for ``vmm_users``).
    """
    from serrinj.ops.policy_model import Decision

    for rule in policy.rules:
        if matches(rule, who, req, vmm_names):
            verb = "allows" if rule.allow else "refuses"
            return Decision(
                rule.allow,
                rule,
                f"{policy.source}: {rule.label} {verb} {req.describe()} to {who.name}",
            )
    return Decision(
        False,
        None,
        f"{policy.source}: no rule allows {req.describe()} to {who.name}",
    )


def allowed_operations(
    policy: Policy,
    who: Subject,
    vm_name: Optional[str],
    domain: Optional[str],
    vmm_uid: int,
    vmm_names: FrozenSet[str] = frozenset(),
) -> List[str]:
    """What ``who`` may do to this VM: reads, and injections with their severities."""
    from serrinj.ops.policy_model import Request

    out: List[str] = []
    for op in OPERATIONS:
        sevs: Tuple[Optional[str], ...] = (None,) if op in READS else SEVERITIES
        ok = [
            s
            for s in sevs
            if decide(policy, who, Request(op, vm_name, domain, vmm_uid, s), vmm_names).allowed
        ]
        if len(ok) == len(sevs):
            out.append(op)
        elif ok:
            out.append(f"{op} ({'/'.join(str(s) for s in ok)} only)")
    return out


# ---------------------------------------------------------------------- severities
def serror_severity(iss: Optional[int]) -> str:
    """``fatal`` when a Linux guest panics on an SError with this syndrome."""
    from serrinj.faults.serror import SError

    return SError(iss).severity()


def mce_severity(m: Any) -> str:
    """``fatal`` when a Linux guest panics on this machine check (or may: SRAR)."""
    from serrinj.faults.mce import MachineCheck

    return MachineCheck(m).severity()


def events_severity(snap: Any) -> str:
    """``fatal`` when a saved vCPU carries a fatal SError or a machine check."""
    from serrinj.kvm import arm64 as kvm_arm64
    from serrinj.kvm import x86_64 as kvm_x86

    for saved in snap.vcpus:
        ev = saved.events(snap.arch)
        if isinstance(ev, kvm_arm64.VcpuEvents) and ev.serror_pending:
            iss = ev.serror_esr if ev.serror_has_esr else None
            if serror_severity(iss) == "fatal":
                return "fatal"
        if isinstance(ev, kvm_x86.VcpuEvents):
            exc = ev.exception
            if (exc.pending or exc.injected) and exc.nr == kvm_x86.MC_VECTOR:
                return "fatal"
    return "survivable"


#: the guarded use case's audit action -> a function of its arguments giving (operation, severity)
def request_of(action: str, args: Sequence[Any]) -> Tuple[str, Optional[str]]:
    """The policy operation and severity of a guarded injection ``action(tgt, *args)``."""
    if action == "events-load":
        return "events-load", events_severity(args[0])
    if action.startswith("inject-"):
        from serrinj.faults import KINDS

        kind = action[len("inject-") :]
        if kind in KINDS:
            fault = args[0] if args else KINDS[kind].from_fields({})
            return kind, fault.severity()
    raise ValueError(f"no policy operation for {action!r}")


# ---------------------------------------------------------------------- the system's file
def _insecure(st: os.stat_result) -> Optional[str]:
    if st.st_uid != 0:
        return f"it is owned by uid {st.st_uid}, not root"
    if st.st_mode & (stat_mod.S_IWGRP | stat_mod.S_IWOTH):
        return f"it is writable by its group or others (mode {stat_mod.S_IMODE(st.st_mode):o})"
    return None


def load_system(path: str = POLICY_PATH) -> Optional[Policy]:
    """The host's policy, or ``None`` when there is none.

    A policy file (or its directory) that root does not own, or that its group
    or others may write, is refused: a caller who could edit it would grant
    itself anything. Refusals raise :class:`PermissionDenied`.
    """
    directory = os.path.dirname(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as err:
        why = "it is a symbolic link" if err.errno == errno.ELOOP else str(err.strerror)
        raise _bad_file(path, why) from None
    try:
        st = os.fstat(fd)
        if not stat_mod.S_ISREG(st.st_mode):
            raise _bad_file(path, "it is not a regular file")
        unsafe = _insecure(st) or _insecure(os.stat(directory))
        if unsafe is not None:
            raise _bad_file(path, unsafe)
        with os.fdopen(os.dup(fd), "rb") as f:
            raw = f.read()
    finally:
        os.close(fd)
    try:
        return parse(raw.decode("utf-8"), path)
    except (InvalidInput, UnicodeDecodeError) as err:
        raise PermissionDenied(
            f"the policy {path} is invalid: {err}",
            hint="root must fix it; until then serrinj refuses every caller who is not"
            " root; nothing was sent",
        ) from None


def _bad_file(path: str, why: str) -> PermissionDenied:
    return PermissionDenied(
        f"the policy {path} cannot be trusted: {why}",
        hint="it must be a regular file that only root may write, in a directory only"
        " root may write; nothing was sent",
    )


class _Loaded:
    """The system policy, read once per process."""

    __slots__ = ("done", "error", "policy")

    def __init__(
        self,
        done: bool = False,
        policy: Optional[Policy] = None,
        error: Optional[PermissionDenied] = None,
    ) -> None:
        self.done = done
        self.policy = policy
        self.error = error


_loaded = _Loaded()


def system_policy() -> Optional[Policy]:
    """:func:`load_system`, once per process."""
    if not _loaded.done:
        try:
            _loaded.policy = load_system()
        except PermissionDenied as err:
            _loaded.error = err
        _loaded.done = True
    if _loaded.error is not None:
        raise _loaded.error
    return _loaded.policy


def subject() -> Subject:
    """The caller as a :class:`Subject`."""
    from serrinj.host import privilege
    from serrinj.ops.policy_model import Subject

    who = privilege.current()
    return Subject(
        uid=who.uid,
        name=who.name,
        gids=frozenset((who.gid, *who.groups)),
        group_names=frozenset(who.group_names),
    )


def _vm_request(vm: Any, operation: str, severity: Optional[str]) -> Tuple[Request, FrozenSet[str]]:
    from serrinj.ops.policy_model import Request
    from serrinj.target import discover

    domain = discover._libvirt_names().get(vm.pid)
    vmm_names: FrozenSet[str] = frozenset()
    try:
        import pwd

        vmm_names = frozenset({pwd.getpwuid(vm.uid).pw_name})
    except (KeyError, TypeError):
        pass
    return Request(operation, vm.name, domain, vm.uid, severity), vmm_names


def check(operation: str, vm: Any, severity: Optional[str] = None) -> Optional[Decision]:
    """The decision for the caller doing ``operation`` on ``vm``; ``None`` when no
    policy applies (root, a user with its own rights, or no policy file)."""
    from serrinj.host import privilege

    if not privilege.current().elevated:
        return None
    pol = system_policy()
    if pol is None:
        return None
    req, vmm_names = _vm_request(vm, operation, severity)
    return decide(pol, subject(), req, vmm_names)


def enforce(
    operation: str,
    vm: Any,
    severity: Optional[str] = None,
    *,
    action: Optional[str] = None,
    audit_request: Optional[Mapping[str, object]] = None,
) -> None:
    """Raise :class:`PermissionDenied` (audited with the caller's name) when the
    policy refuses ``operation`` on ``vm``; nothing has been sent then."""
    try:
        decision = check(operation, vm, severity)
    except PermissionDenied as err:
        _audit_refusal(action or operation, vm, err, audit_request, None)
        raise
    if decision is None or decision.allowed:
        return
    refused = PermissionDenied(
        decision.message,
        hint=f"the policy {POLICY_PATH} decides what callers who are not root may do;"
        " nothing was sent",
    )
    _audit_refusal(action or operation, vm, refused, audit_request, decision)
    raise refused


def enforce_guarded(
    action: str, vm: Any, args: Sequence[Any], audit_request: Mapping[str, object]
) -> None:
    """:func:`enforce` for the guarded use case ``action(tgt, *args)`` (an injection).

    Nothing is computed for a caller the policy does not apply to.
    """
    from serrinj.host import privilege

    if not privilege.current().elevated:
        return
    operation, severity = request_of(action, args)
    enforce(operation, vm, severity, action=action, audit_request=audit_request)


def _audit_refusal(
    action: str,
    vm: Any,
    err: PermissionDenied,
    request: Optional[Mapping[str, object]],
    decision: Optional[Decision],
) -> None:
    from serrinj.ops import audit, guard

    audit.record(
        action=action,
        outcome="refused",
        vm={"pid": vm.pid, "name": vm.name, "vmm": vm.vmm, "arch": vm.arch, "uid": vm.uid},
        request=request,
        error=guard.error_dict(err),
        detail={"policy": decision.as_dict() if decision else {"file": POLICY_PATH}},
    )
    guard.mark_audited(err)


def describe(vm: Any) -> Dict[str, object]:
    """Which policy applies to the caller on ``vm``, for ``serrinj status``."""
    from serrinj.host import privilege

    who = privilege.current()
    out: Dict[str, object] = {
        "caller": who.as_dict(),
        "file": None,
        "rule": None,
        "allowed": None,
    }
    if not who.elevated:
        out["applies"] = f"none: {who.name} runs serrinj with its own rights"
        return out
    pol = system_policy()
    if pol is None:
        out["applies"] = f"none: no {POLICY_PATH}; {who.name} has every right of root"
        return out
    req, vmm_names = _vm_request(vm, "status", None)
    decision = decide(pol, subject(), req, vmm_names)
    out["file"] = pol.source
    out["rule"] = decision.as_dict()
    out["allowed"] = allowed_operations(pol, subject(), req.vm_name, req.domain, vm.uid, vmm_names)
    out["applies"] = decision.message
    return out
