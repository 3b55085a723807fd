"""The pruning-method protocol and its name registry.

A method is one small module: it declares which calibration statistics it needs and turns one
layer's weight (laid out [out, in], float32) plus those statistics into a new weight and a
keep-mask. Model plumbing (hooks, devices, block order) lives in ``calibration``/``oneshot``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from ..calibration.stats import LayerStats
from ..patterns import Pattern
from ..registry import Registry


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


_METHODS = Registry("pruning method")
register = _METHODS.register


def get_method(name: str | PruningMethod, **options: Any) -> PruningMethod:
    """Instantiate a registered method by name (or pass an instance through)."""
    return _METHODS.get(name, **options)


def available_methods() -> list[str]:
    return _METHODS.names()
