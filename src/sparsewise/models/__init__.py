"""Model loading (short names, HF folders, GGUF files, hub ids) and generic pruning adapters."""

from __future__ import annotations

from .adapters import ModelAdapter, PrunableLayer, is_prunable_module
from .loading import bundled_model_names, load_model, resolve_bundled_path

__all__ = [
    "ModelAdapter",
    "PrunableLayer",
    "bundled_model_names",
    "is_prunable_module",
    "load_model",
    "resolve_bundled_path",
]
