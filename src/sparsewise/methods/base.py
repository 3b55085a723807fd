"""The pruning-method protocol and its name registry.

A method is one small module: it declares which calibration statistics it needs and turns one
layer's weight (laid out [out, in], float32) plus those statistics into a new weight and a
keep-mask. Model plumbing (hooks, devices, block order) lives in ``calibration``/``oneshot``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from ..calibration.stats import LayerStats
from ..errors import ConfigError
from ..patterns import Pattern


@dataclass
class LayerTask:
    """Everything a method may use to prune one layer."""

    name: str
    weight: torch.Tensor  # [out, in] float32, on the compute device; do not modify in place
    sparsity: float
    pattern: Pattern
    stats: LayerStats | None = None  # None for data-free methods
    generator: torch.Generator | None = None  # seeded, for methods with random choices
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class LayerResult:
    weight: torch.Tensor  # [out, in], zeros where mask is False
    mask: torch.Tensor  # bool [out, in], True = kept
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class PruningMethod(Protocol):
    name: ClassVar[str]
    needs: ClassVar[frozenset[str]]  # subset of calibration.stats.KNOWN_STATS

    def prune_layer(self, task: LayerTask) -> LayerResult: ...


_REGISTRY: dict[str, Callable[..., PruningMethod]] = {}


def register(cls):
    """Class decorator: make a method available by ``cls.name``."""
    if cls.name in _REGISTRY:
        raise RuntimeError(f"pruning method {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def get_method(name: str | PruningMethod, **options: Any) -> PruningMethod:
    """Instantiate a registered method by name (or pass an instance through)."""
    if not isinstance(name, str):
        return name
    key = name.strip().lower()
    if key not in _REGISTRY:
        raise ConfigError(f"unknown pruning method {name!r}; available: {', '.join(available_methods())}.")
    return _REGISTRY[key](**options)


def available_methods() -> list[str]:
    return sorted(_REGISTRY)
