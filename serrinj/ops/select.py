"""Which VM and which vCPUs a command means, from its target options.

``--pid``/``--name`` find the VM, ``--vcpu`` picks vCPUs (an id or ``all``), and
``--fd`` names a vCPU by a file descriptor: one this process inherited, whose VMM
is found with kcmp, or with ``--pid`` the target's own fd N.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from serrinj.errors import InvalidInput
from serrinj.target import attach as target
from serrinj.target import discover


def target_args(
    pid: Optional[int], name: Optional[str], fd: Optional[int], vcpu: Optional[str]
) -> Tuple[Optional[int], Optional[str], target.VcpuSpec]:
    """(pid, name, vcpu spec) with ``fd`` resolved to its VMM and vCPU id."""
    spec = target.parse_vcpu(vcpu)
    if fd is None:
        return pid, name, spec
    owner, vcpu_id = target.vcpu_fd_owner(fd, pid, "--fd")
    if spec not in (None, vcpu_id):
        raise InvalidInput(
            f"--fd {fd} is vCPU {vcpu_id}, but --vcpu says {vcpu}",
            hint="give one of --fd and --vcpu",
        )
    return owner, name, vcpu_id


def resolve(
    pid: Optional[int], name: Optional[str], fd: Optional[int], vcpu: Optional[str]
) -> target.Target:
    """The VM and its selected vCPUs (every vCPU when ``vcpu`` is not given)."""
    return target.resolve(*target_args(pid, name, fd, vcpu))


def injection_target(
    kind: str,
    pid: Optional[int],
    name: Optional[str],
    fd: Optional[int],
    vcpu: Optional[str],
) -> target.Target:
    """The target of an injection: one vCPU unless ``vcpu`` is ``all``.

    The VM's architecture is checked first: an SError for an x86_64 VM is
    pointed at ``mce``/``nmi`` (and the reverse) before anything else.
    """
    from serrinj.ops import inject  # the fault kinds: not needed to read a VM

    pid, name, spec = target_args(pid, name, fd, vcpu)
    return inject.resolve_target(kind, pid, name, spec)


def vms_quietly() -> List[discover.Vm]:
    """Every VM, for shell completion: never fails, never prints."""
    try:
        return list(discover.scan())
    except Exception:
        return []
