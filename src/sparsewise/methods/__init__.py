"""Pruning methods, one module each; importing this package registers them all."""

from . import magnitude, random, sparsegpt, wanda  # noqa: F401  (registration side effect)
from .base import LayerResult, LayerTask, PruningMethod, available_methods, get_method, register

__all__ = ["LayerResult", "LayerTask", "PruningMethod", "available_methods", "get_method", "register"]
