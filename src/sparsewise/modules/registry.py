"""Builders of the modules sparsewise puts in place of a model's own, by checkpoint type name.

A replacement module (ARMOR's factorized linear today; structured and quantized layers next)
describes itself with ``checkpoint_spec() -> {"type": name, ...}`` and is rebuilt, empty, from
that spec by the class registered under the name, so ``sw.load`` can lay out the model before
reading its tensors. Registering is one decorator in the module's own file.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

_BUILDERS: dict[str, Callable[[dict[str, Any]], nn.Module]] = {}


def register_module(type_name: str):
    """Class decorator: ``cls.from_checkpoint_spec(spec)`` rebuilds modules saved as ``type_name``."""

    def add(cls):
        if type_name in _BUILDERS:
            raise RuntimeError(f"module type {type_name!r} registered twice")
        _BUILDERS[type_name] = cls.from_checkpoint_spec
        return cls

    return add


def module_builder(type_name: str) -> Callable[[dict[str, Any]], nn.Module] | None:
    """The builder of ``type_name``, or None when this version of sparsewise has none."""
    return _BUILDERS.get(type_name)


def module_types() -> list[str]:
    return sorted(_BUILDERS)
