"""Modules sparsewise puts in place of a model's own; importing this package registers their builders."""

from . import armor, cospadi  # noqa: F401  (registration side effect)
from .armor import ARMORLinear
from .cospadi import SparseDictionaryLinear
from .registry import module_builder, module_types, register_module

__all__ = ["ARMORLinear", "SparseDictionaryLinear", "module_builder", "module_types", "register_module"]
