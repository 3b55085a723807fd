"""Adding a method is one new file: packages import every non-infrastructure module they hold."""

from __future__ import annotations

import importlib
import inspect
import sys

import pytest

from sparsewise.registry import import_plugins

PACKAGES = {  # package -> the function listing its registered names
    "sparsewise.methods": ("sparsewise.methods", "available_methods"),
    "sparsewise.activation": ("sparsewise.activation.base", "available_methods"),
    "sparsewise.training": ("sparsewise.training", "available_training_methods"),
    "sparsewise.allocation": ("sparsewise.allocation", "available_allocators"),
    "sparsewise.correction": ("sparsewise.correction", "available_refiners"),
}


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_every_discovered_module_registers_something(package):
    """A file that registers nothing must be listed as infrastructure (or it is a forgotten method)."""
    module = importlib.import_module(package)
    lister_module, lister = PACKAGES[package]
    names = set(getattr(importlib.import_module(lister_module), lister)())
    import pkgutil

    infrastructure_or_private = 0
    for info in pkgutil.iter_modules(module.__path__):
        sub = importlib.import_module(f"{package}.{info.name}")
        registered = {getattr(obj, "name", None) for _, obj in inspect.getmembers(sub, inspect.isclass)
                      if obj.__module__ == sub.__name__}
        if registered & names:
            continue
        infrastructure_or_private += 1
        source = inspect.getsource(sub)
        assert "@register" not in source, f"{sub.__name__} registers a method but was not discovered"
    assert infrastructure_or_private < len(list(pkgutil.iter_modules(module.__path__)))


def test_import_plugins_imports_each_new_file(tmp_path, monkeypatch):
    package = tmp_path / "plugpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "base.py").write_text("LOADED = []\n")
    (package / "_private.py").write_text("raise RuntimeError('never imported')\n")
    for name in ("beta", "alpha"):
        (package / f"{name}.py").write_text(f"from plugpkg.base import LOADED\nLOADED.append({name!r})\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    imported = import_plugins("plugpkg", [str(package)], infrastructure=("base",))
    assert imported == ["alpha", "beta"]
    assert sys.modules["plugpkg.base"].LOADED == ["alpha", "beta"]  # sorted: the same order on every disk
