"""Model loading (short names, HF folders, GGUF files, hub ids), generic pruning adapters (fused
mixture-of-experts parameters included) and coverage of a model by its pruning records."""

from __future__ import annotations

from .adapters import ExpertLayer, ModelAdapter, PrunableLayer, is_prunable_module
from .coverage import Coverage, model_coverage
from .experts import all_token_experts, calibrate_all_experts
from .loading import bundled_model_names, load_model, resolve_bundled_path

__all__ = [
    "Coverage",
    "ExpertLayer",
    "ModelAdapter",
    "PrunableLayer",
    "all_token_experts",
    "bundled_model_names",
    "calibrate_all_experts",
    "is_prunable_module",
    "load_model",
    "model_coverage",
    "resolve_bundled_path",
]
