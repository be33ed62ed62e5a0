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

import importlib
from typing import TYPE_CHECKING, Dict, Iterator, Mapping, Tuple, Type

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


def _load(module: str, name: str) -> object:
    return getattr(importlib.import_module(module), name)


class _Kinds(Mapping[str, "Type[Fault]"]):
    """A read-only mapping of kind name -> fault class that imports a kind's module
    on first use."""

    __slots__ = ("_cache",)

    def __init__(self) -> None:
        self._cache: Dict[str, Type[Fault]] = {}

    def __getitem__(self, kind: str) -> Type[Fault]:
        try:
            return self._cache[kind]
        except KeyError:
            pass
        module, name = _MODULES[kind]  # KeyError for a kind that does not exist
        cls: Type[Fault] = _load(module, name)  # type: ignore[assignment]
        self._cache[kind] = cls
        return cls

    def __iter__(self) -> Iterator[str]:
        return iter(_MODULES)

    def __len__(self) -> int:
        return len(_MODULES)

    def __contains__(self, kind: object) -> bool:
        return kind in _MODULES

    def __repr__(self) -> str:
        return f"KINDS({list(_MODULES)})"


#: every fault kind by its name
KINDS: Mapping[str, Type[Fault]] = _Kinds()


def __getattr__(name: str) -> object:
    """``faults.SError`` and the other classes, imported on first use."""
    try:
        module, attr = _NAMES[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = _load(module, attr)
    globals()[name] = value
    return value


__all__ = ["KINDS", "ExtDabt", "Fault", "MachineCheck", "Nmi", "SError"]
