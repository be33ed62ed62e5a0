"""Names imported on first use, so that each command loads only the modules it needs.

Two forms, both over a table of ``key -> (module, name)``:

- :class:`LazyMap`, a read-only mapping whose values are imported the first time
  they are read (the fault kinds, the vCPU class of each arch); its keys cost nothing;
- :func:`module_getattr`, a module's ``__getattr__`` that imports a name the first
  time it is read from that module, then keeps it in the module's namespace.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, Iterator, Mapping, MutableMapping, Tuple, TypeVar

K = TypeVar("K")
V = TypeVar("V")

#: where a name lives: (module, name in it)
Where = Tuple[str, str]


def load(where: Where) -> Any:
    """The object ``where`` names, its module imported if it was not yet."""
    module, name = where
    return getattr(importlib.import_module(module), name)


class LazyMap(Mapping[K, V]):
    """A read-only mapping of ``key -> load(table[key])``, each value imported on first use."""

    __slots__ = ("_cache", "_label", "_table")

    def __init__(self, table: Mapping[K, Where], label: str) -> None:
        self._table = table
        self._label = label
        self._cache: Dict[K, V] = {}

    def __getitem__(self, key: K) -> V:
        try:
            return self._cache[key]
        except KeyError:
            pass
        value: V = load(self._table[key])  # KeyError for a key the table lacks
        self._cache[key] = value
        return value

    def __iter__(self) -> Iterator[K]:
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)

    def __contains__(self, key: object) -> bool:
        return key in self._table

    def __repr__(self) -> str:
        return f"{self._label}({[getattr(k, 'value', k) for k in self._table]})"


def module_getattr(
    module: str, namespace: MutableMapping[str, Any], table: Mapping[str, Where]
) -> Callable[[str], Any]:
    """A ``__getattr__`` for ``module`` (whose globals are ``namespace``) that imports the
    names of ``table`` on first use and keeps them there; any other name is an
    ``AttributeError``, as for a module without one."""

    def getattr_(name: str) -> Any:
        try:
            where = table[name]
        except KeyError:
            raise AttributeError(f"module {module!r} has no attribute {name!r}") from None
        value = load(where)
        namespace[name] = value
        return value

    return getattr_
