"""Name registries for methods and domains: ``@METHODS.register("logit_kd")`` and
``METHODS.get("logit_kd")``. An unknown name raises with the closest registered names."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, loader: Callable[[], None] | None = None):
        self.kind = kind
        self._items: dict[str, T] = {}
        # Imports the modules that register built-in entries, on first lookup, so that importing
        # kdlib stays cheap and registration needs no central list of imports at import time.
        self._loader = loader
        self._loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered by {self._items[name]!r}")
            self._items[name] = obj
            try:
                obj.name = name  # type: ignore[attr-defined]
            except AttributeError:
                pass
            return obj

        return decorator

    def _ensure_loaded(self) -> None:
        if not self._loaded and self._loader is not None:
            self._loaded = True
            self._loader()

    def get(self, name: str) -> T:
        self._ensure_loaded()
        if name not in self._items:
            close = difflib.get_close_matches(name, self._items, n=3, cutoff=0.4)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise KeyError(f"unknown {self.kind} {name!r}{hint} (registered: {', '.join(sorted(self._items))})")
        return self._items[name]

    def names(self) -> list[str]:
        self._ensure_loaded()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self._ensure_loaded()
        return name in self._items
