"""Sparse training: keep masks through any PyTorch training loop (see controller.py).

``attach`` picks the trained layers through the model adapters, gives each a ratio from the
global budget (uniform / ER / ERK / ERK+, or fixed by an N:M pattern) and starts the registered
method. Methods: random, magnitude (static), gmp, set, rigl, issp, srste, pgf, cast, bdwp.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, NumericalError, UnsupportedModelError
from ..models.adapters import ModelAdapter, unwrap_parallel, weight_layers
from ..patterns import Pattern
from ..registry import import_plugins
from .base import MethodBase, TrainingMethod, available_training_methods, get_training_method, register
from .controller import MASK_BUFFER, SparseTraining, TrainedLayer
from .distribution import layer_sparsities
from .sparse24 import Sparse24Function, Sparse24Linear

import_plugins(__name__, __path__, infrastructure=("base", "controller", "distill", "distribution", "hf", "masks",
                                                   "metrics", "sparse24"))  # every other file is a method

__all__ = ["MASK_BUFFER", "MethodBase", "Sparse24Function", "Sparse24Linear", "SparseTraining", "TrainedLayer",
           "TrainingMethod", "attach", "available_training_methods", "get_training_method", "register",
           "trained_layers"]


def trained_layers(model: nn.Module, include=None, exclude=None) -> dict:
    """The layers sparse training acts on: the adapter's block layers for models with repeated
    blocks (LLMs, ViTs: lm_head and embeddings stay dense), else every Linear/Conv1D/Conv2d."""
    try:
        return ModelAdapter(model, include=include, exclude=exclude).prunable_layers()
    except UnsupportedModelError:
        return weight_layers(model, include=include, exclude=exclude)


def attach(model: nn.Module, optimizer: torch.optim.Optimizer | None, method: str | TrainingMethod = "rigl",
           sparsity: float | None = None, *, total_steps: int, pattern: str | Pattern | None = None,
           distribution: str | dict[str, float] = "uniform", seed: int = 0, include=None, exclude=None,
           log: Any = None, log_every: int = 100, **method_options: Any) -> SparseTraining:
    """Start sparse training of ``model``; call ``.step()`` after every ``optimizer.step()``.

    sparsity:      global fraction of zeros over the trained weights (implied by N:M patterns)
    pattern:       None = unstructured per layer; "unstructured" = per row; "2:4", "1:8", ...
    distribution:  uniform | er | erk | erk+ | {layer: sparsity}
    total_steps:   planned optimizer steps (schedules are fractions of it)
    log:           CSV path (or a metrics.TrainingLog) for per-layer sparsity, mask flips (SAD), PQ Index
    """
    model = unwrap_parallel(model)
    pattern = Pattern(scope="layer") if pattern is None else Pattern.parse(pattern)
    if pattern.kind == "block":
        raise ConfigError("block patterns are not trained yet; use unstructured or N:M.")
    if pattern.scope == "global":
        raise ConfigError("global unstructured scope is not supported in training; use distribution='erk' "
                          "to give layers different ratios under one budget.")
    layers = trained_layers(model, include, exclude)
    for name, layer in layers.items():
        pattern.check_shape((layer.out_features, layer.in_features), name)
        if not torch.isfinite(layer.module.weight).all():
            raise NumericalError(f"{name} holds non-finite weights; fix the model (or its initialization) "
                                 "before sparse training.")
    shapes = {name: tuple(layer.module.weight.shape) if layer.is_conv else (layer.out_features, layer.in_features)
              for name, layer in layers.items()}
    sparsities = layer_sparsities(shapes, sparsity, distribution, pattern)
    items = {name: TrainedLayer(name, layer, sparsities[name], pattern) for name, layer in layers.items()}
    training_method = get_training_method(method, **method_options)
    logger = None
    if log is not None:
        from .metrics import TrainingLog

        # a TrainingLog instance passes through (e.g. TrainingLog(path, append=True) when resuming)
        logger = log if isinstance(log, TrainingLog) else TrainingLog(log)
    return SparseTraining(model, optimizer, training_method, items, total_steps=total_steps, seed=seed,
                          log=logger, log_every=log_every)


def __getattr__(name: str):
    # hf imports transformers (seconds): loaded on first use, so `import sparsewise.training` stays fast
    if name in ("distill", "hf", "metrics"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
