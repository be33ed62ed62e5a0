"""``serrinj list``: which VMs to show, and whether to probe their unmapped vCPUs.

The rules: ``pid``/``name`` select one VM (an error when there is none). A
scan of the whole host also counts the processes whose fds serrinj may not
read: with no VM found that is a permission error, with some found a warning
that one may be missing. ``probe`` maps each VM's unmapped vCPUs by stopping
candidate threads for a moment; a VM that cannot be probed is an error when it
is the only one, and a warning (the VM is listed as it was) otherwise.
"""

from __future__ import annotations

from typing import Callable, List, Optional

from serrinj.errors import SerrinjError
from serrinj.target import discover

Warn = Callable[[str], None]


def _ignore(_message: str) -> None:
    pass


def list_vms(
    pid: Optional[int] = None,
    name: Optional[str] = None,
    *,
    probe: bool = False,
    warn: Warn = _ignore,
) -> List[discover.Vm]:
    """The VMs to list; ``warn`` receives each warning as it happens."""
    if pid is not None or name:
        vms = [discover.find(pid=pid, name=name)]
    else:
        vms = list(discover.scan())
        denied = discover.hidden()
        if denied:
            if not vms:
                raise discover.hidden_error(denied)
            n = len(denied)
            warn(
                f"serrinj may not read the fds of {n} process{'es' if n > 1 else ''};"
                " a VM among them is not listed (run as root to see every VM)"
            )
    if not probe:
        return vms
    from serrinj.ops import policy

    probed = []
    for vm in vms:
        if vm.unmapped:
            try:
                # stopping a VM's threads is a read of it: the policy's "status"
                policy.enforce("status", vm, action="list-probe")
                vm = discover.probe(vm)
            except SerrinjError as err:
                if len(vms) == 1:
                    raise
                warn(f"cannot probe {vm.label}: {err.message}")
        probed.append(vm)
    return probed
