"""One small registry class shared by every family (datasets, models, losses, methods, attacks).

A new entry is one decorated function or class in its own file plus one import line
in the family's ``__init__``, as in RobustBench's model zoo.
"""

from __future__ import annotations

from typing import Callable, Dict, Generic, Iterator, List, TypeVar

from art_reat.errors import UsageError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> builder mapping for one family, with one-line errors for unknown names."""

    def __init__(self, family: str) -> None:
        self.family = family
        self._entries: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.family} '{name}' is registered twice")
            self._entries[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UsageError(
                f"unknown {self.family} '{name}': choose one of {', '.join(self.names())}"
            ) from None

    def names(self) -> List[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
