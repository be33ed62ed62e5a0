"""The fault kinds, one module each, behind one interface (:class:`~serrinj.faults.base.Fault`).

- :mod:`serrinj.faults.serror`    arm64 SError (KVM_SET_VCPU_EVENTS)
- :mod:`serrinj.faults.ext_dabt`  arm64 external data abort at the next MMIO exit
- :mod:`serrinj.faults.mce`       x86_64 machine check (KVM_X86_SET_MCE)
- :mod:`serrinj.faults.nmi`       x86_64 NMI (KVM_NMI)
- :mod:`serrinj.faults.loop`      the one per-vCPU injection loop
- :mod:`serrinj.faults.fields`    the one reader of a request's fields, for every front end

A new fault kind is a new module here, one entry in :data:`_MODULES`, a command in
:mod:`serrinj.cli` and a view of its injection; campaigns and the policy pick it up
from :data:`KINDS`.

A kind's module is imported the first time its class is asked for
(``KINDS["nmi"]``, ``faults.Nmi``): an NMI from the command line does not load
the arm64 fault modules, their KVM tables or the syndrome codec. Iterating
``KINDS``' keys imports nothing; its values import every kind.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Tuple, Type

from serrinj._lazy import LazyMap, module_getattr

if TYPE_CHECKING:
    from serrinj.faults.base import Fault
    from serrinj.faults.ext_dabt import ExtDabt
    from serrinj.faults.mce import MachineCheck
    from serrinj.faults.nmi import Nmi
    from serrinj.faults.serror import SError

#: every fault kind's name -> (its module, its class), in the order they are shown
_MODULES: Mapping[str, Tuple[str, str]] = {
    "serror": ("serrinj.faults.serror", "SError"),
    "ext-dabt": ("serrinj.faults.ext_dabt", "ExtDabt"),
    "mce": ("serrinj.faults.mce", "MachineCheck"),
    "nmi": ("serrinj.faults.nmi", "Nmi"),
}
#: the public class names this package exports -> (module, class)
_NAMES: Mapping[str, Tuple[str, str]] = {
    "Fault": ("serrinj.faults.base", "Fault"),
    **{cls: (mod, cls) for mod, cls in _MODULES.values()},
}


#: every fault kind by its name
KINDS: Mapping[str, Type[Fault]] = LazyMap(_MODULES, "KINDS")

#: ``faults.SError`` and the other classes, imported on first use
__getattr__ = module_getattr(__name__, globals(), _NAMES)


__all__ = ["KINDS", "ExtDabt", "Fault", "MachineCheck", "Nmi", "SError"]
