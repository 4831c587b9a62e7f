"""Name -> function registries, so a new loss, initialiser or metric is one decorated function.

A registration carries traits (``@INITIALIZERS.register("fila", replaces_base=True, uses_fisher=True)``):
the code that runs an entry asks its traits, never its name, so a new entry needs no edit elsewhere.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Any, Callable, Generic, Mapping, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """A named table of functions with traits. ``@REG.register("name", trait=value)`` adds one;
    ``REG.get("name")`` finds it, ``REG.trait("name", "trait")`` asks what it does (False if unset)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, F] = {}
        self._traits: dict[str, Mapping[str, Any]] = {}

    def register(self, name: str, **traits: Any) -> Callable[[F], F]:
        def add(fn: F) -> F:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = fn
            self._traits[name] = MappingProxyType(dict(traits))
            return fn

        return add

    def get(self, name: str) -> F:
        self._check(name)
        return self._items[name]

    def traits(self, name: str) -> Mapping[str, Any]:
        self._check(name)
        return self._traits[name]

    def trait(self, name: str, trait: str, default: Any = False) -> Any:
        return self.traits(name).get(trait, default)

    def _check(self, name: str) -> None:
        if name not in self._items:
            raise ValueError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(sorted(self._items))}"
            )

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __getitem__(self, name: str) -> F:
        return self.get(name)

    def __iter__(self):
        """The names, sorted (help texts and error messages list them in this order)."""
        return iter(self.names())
