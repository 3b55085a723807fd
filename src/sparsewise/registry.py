"""Name registries for pluggable methods (pruning methods, activation sparsifiers)."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from typing import Any

from .errors import ConfigError


class Registry:
    """Classes registered by their ``name`` attribute, instantiated by name with options."""

    def __init__(self, kind: str):
        self.kind = kind
        self._classes: dict[str, Callable[..., Any]] = {}

    def register(self, cls):
        """Class decorator: make ``cls`` available by ``cls.name``."""
        if cls.name in self._classes:
            raise RuntimeError(f"{self.kind} {cls.name!r} registered twice")
        self._classes[cls.name] = cls
        return cls

    def unregister(self, name: str) -> None:
        """Forget ``name`` (tests and plugins that register temporary classes)."""
        self._classes.pop(name, None)

    def get(self, name: Any, **options: Any):
        """Instantiate a registered class by name (an instance passes through unchanged)."""
        if not isinstance(name, str):
            return name
        key = name.strip().lower()
        if key not in self._classes:
            raise ConfigError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}.")
        return self._classes[key](**options)

    def lookup(self, name: str):
        """The registered class (not an instance) of ``name``."""
        key = name.strip().lower()
        if key not in self._classes:
            raise ConfigError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}.")
        return self._classes[key]

    def names(self) -> list[str]:
        return sorted(self._classes)


def import_plugins(package: str, path: Iterable[str], infrastructure: Iterable[str] = ()) -> list[str]:
    """Import every module of a package except ``infrastructure`` and ``_private`` ones, so that
    a method registers itself by existing: adding one is one new file (plus its test).

    Returns the imported module names, sorted (registration order does not depend on the disk)."""
    skip = set(infrastructure)
    names = sorted(info.name for info in pkgutil.iter_modules(list(path))
                   if not info.name.startswith("_") and info.name not in skip)
    for name in names:
        importlib.import_module(f"{package}.{name}")
    return names
