"""One registry idiom for everything chosen by name in a config: Step-2 methods, Step-1 objectives, image
encoders, file readers. A `Registry` is a read-only mapping name -> entry, filled by `@REG.register(name)` (or
`REG.add(name, entry)`) where the entry is defined; `REG.lookup(name)` raises a ConfigError that lists the
registered names, and the CLI help and config checks read `REG.names()` instead of repeating them.

Foundation layer: imports nothing of dusss but `errors` (plugins are named by the registry's owner).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

from dusss.errors import ConfigError

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """Entries by name. `what` names the kind of entry in errors ("segmentation method", "image encoder")."""

    def __init__(self, what: str, plugins: tuple[str, ...] = ()) -> None:
        """`plugins`: modules that register more entries (the baselines); imported on the first read of the
        registry, not at import time (the module that defines the registry is often one they import)."""
        self.what = what
        self._entries: dict[str, T] = {}
        self._plugins = plugins
        self._loaded = not plugins

    def _load_plugins(self) -> None:
        if not self._loaded:
            self._loaded = True  # first: a plugin that reads the registry while it registers must not recurse
            for module in self._plugins:
                importlib.import_module(module)

    def add(self, name: str, entry: T) -> T:
        """Register `entry` under `name` (ValueError if the name is taken: two entries must not share one)."""
        if name in self._entries:
            raise ValueError(f"{self.what} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def remove(self, name: str) -> None:
        """Unregister `name` (a plug-in taken out again; tests); no error if it is not there."""
        self._entries.pop(name, None)

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of `add`."""

        def deco(entry: T) -> T:
            return self.add(name, entry)

        return deco

    def lookup(self, name: str) -> T:
        """The entry of `name`; ConfigError naming the registered ones if there is none."""
        self._load_plugins()
        if name not in self._entries:
            raise ConfigError(f"unknown {self.what} {name!r}; choose from {self.names()}")
        return self._entries[name]

    def names(self) -> list[str]:
        """Registered names, sorted."""
        self._load_plugins()
        return sorted(self._entries)

    def __getitem__(self, name: str) -> T:
        self._load_plugins()
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        self._load_plugins()
        return iter(self._entries)

    def __len__(self) -> int:
        self._load_plugins()
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}, {self.names()})"


__all__ = ["Registry"]
