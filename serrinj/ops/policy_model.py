"""The policy's data: its rules, the caller, one request and the decision
(:mod:`serrinj.ops.policy` parses and decides; it imports this module only when a
policy applies to the caller)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, FrozenSet, Optional, Tuple

from serrinj.ops.policy import OPERATIONS

if TYPE_CHECKING:
    from serrinj.ops.policy import Ident


@dataclass(frozen=True)
class Rule:
    """One ``[[rule]]`` of the policy file."""

    name: str
    line: int
    allow: bool = True
    users: Tuple[Ident, ...] = ()
    groups: Tuple[Ident, ...] = ()
    vms: Tuple[str, ...] = ()
    domains: Tuple[str, ...] = ()
    vmm_users: Tuple[Ident, ...] = ()
    owner: Optional[str] = None
    do: FrozenSet[str] = frozenset(OPERATIONS)
    severity: Optional[str] = None

    @property
    def label(self) -> str:
        return f'rule "{self.name}" (line {self.line})'


@dataclass(frozen=True)
class Policy:
    """A parsed policy file: its rules, in order."""

    source: str
    rules: Tuple[Rule, ...]


@dataclass(frozen=True)
class Subject:
    """The caller, as the policy sees it."""

    uid: int
    name: str
    gids: FrozenSet[int] = frozenset()
    group_names: FrozenSet[str] = frozenset()


@dataclass(frozen=True)
class Request:
    """One operation on one VM."""

    operation: str
    vm_name: Optional[str] = None
    domain: Optional[str] = None
    vmm_uid: Optional[int] = None
    #: fatal | survivable for an injection, None for a read
    severity: Optional[str] = None

    def describe(self) -> str:
        what = self.operation if self.severity is None else f"{self.operation} ({self.severity})"
        vm = repr(self.vm_name) if self.vm_name else "without a name"
        return f"{what} on VM {vm}"


@dataclass(frozen=True)
class Decision:
    """What the policy decided for one request, and the rule that decided it."""

    allowed: bool
    rule: Optional[Rule]
    message: str

    def as_dict(self) -> Dict[str, object]:
        return {
            "allowed": self.allowed,
            "rule": self.rule.name if self.rule else None,
            "line": self.rule.line if self.rule else None,
            "message": self.message,
        }


# ---------------------------------------------------------------------- parse
