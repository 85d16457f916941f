"""Reading parsed TOML tables with every problem collected, each named by file and key.

Shared by the configuration file and the flow files: unknown keys are errors,
wrong types are errors, and all of them are reported at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")


class TableReader:
    """Walk a parsed TOML document, collecting every problem with its key."""

    def __init__(self, filename: str) -> None:
        self._filename = filename
        self._path: list[str] = []
        self.problems: list[str] = []

    def problem(self, key: str, message: str) -> None:
        dotted = ".".join([*self._path, key]) if key else ".".join(self._path)
        self.problems.append(f"{self._filename}: {dotted}: {message}")

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        self._path.append(name)
        try:
            yield
        finally:
            self._path.pop()

    def unknown(self, table: dict[str, Any], known: set[str]) -> None:
        for key in sorted(set(table) - known):
            self.problem(key, "unknown key")

    def get(
        self,
        table: dict[str, Any],
        key: str,
        kind: type[T] | tuple[type, ...],
        default: T,
        check: Callable[[Any], str | None] | None = None,
    ) -> T:
        if key not in table:
            return default
        value = table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int in Python, but a TOML true is never a valid number.
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join(k.__name__ for k in kinds)
            self.problem(key, f"expected {names}, got {type(value).__name__}")
            return default
        if check is not None:
            message = check(value)
            if message:
                self.problem(key, message)
                return default
        return value  # type: ignore[return-value]

    def strings(
        self, table: dict[str, Any], key: str, default: tuple[str, ...]
    ) -> tuple[str, ...]:
        value = self.get(table, key, list, list(default))
        if not all(isinstance(item, str) for item in value):
            self.problem(key, "expected a list of strings")
            return default
        return tuple(value)
