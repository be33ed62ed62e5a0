"""The fault kinds, one module each, behind one interface (:class:`~serrinj.faults.base.Fault`).

- :mod:`serrinj.faults.serror`    arm64 SError (KVM_SET_VCPU_EVENTS)
- :mod:`serrinj.faults.ext_dabt`  arm64 external data abort at the next MMIO exit
- :mod:`serrinj.faults.mce`       x86_64 machine check (KVM_X86_SET_MCE)
- :mod:`serrinj.faults.nmi`       x86_64 NMI (KVM_NMI)
- :mod:`serrinj.faults.loop`      the one per-vCPU injection loop
- :mod:`serrinj.faults.fields`    the one reader of a request's fields, for every front end

A new fault kind is a new module here, one entry in :data:`KINDS`, a command in
:mod:`serrinj.cli` and a view of its injection; campaigns and the policy pick it up
from :data:`KINDS`.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping, Type

from serrinj.faults.base import Fault
from serrinj.faults.ext_dabt import ExtDabt
from serrinj.faults.mce import MachineCheck
from serrinj.faults.nmi import Nmi
from serrinj.faults.serror import SError

#: every fault kind by its name
KINDS: Mapping[str, Type[Fault]] = MappingProxyType(
    {f.kind: f for f in (SError, ExtDabt, MachineCheck, Nmi)}
)

__all__ = ["KINDS", "ExtDabt", "Fault", "MachineCheck", "Nmi", "SError"]
