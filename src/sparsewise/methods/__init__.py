"""Pruning methods, one module each; importing this package registers them all."""

from ..registry import import_plugins
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

import_plugins(__name__, __path__, infrastructure=("base",))  # every other file here is a method

__all__ = ["Capabilities", "LayerResult", "LayerTask", "Method", "ModelTask", "PruningMethod", "available_methods",
           "check_pattern", "get_method", "method_capabilities", "register"]
