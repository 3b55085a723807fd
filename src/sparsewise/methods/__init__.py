"""Pruning methods, one module each; importing this package registers them all."""

from . import armor, magnitude, random, sparsegpt, wanda  # noqa: F401  (registration side effect)
from .base import (
    Capabilities,
    LayerResult,
    LayerTask,
    Method,
    ModelTask,
    PruningMethod,
    available_methods,
    check_pattern,
    get_method,
    method_capabilities,
    register,
)

__all__ = ["Capabilities", "LayerResult", "LayerTask", "Method", "ModelTask", "PruningMethod", "available_methods",
           "check_pattern", "get_method", "method_capabilities", "register"]
