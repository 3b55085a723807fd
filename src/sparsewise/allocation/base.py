"""The allocation protocol: per-layer sparsities under one global budget, registered by name.

An allocator sees the layers to prune (shapes, block index) and, if it needs data, the model
and calibration set; it returns preferred per-layer sparsities, which :func:`solve` turns into
ratios whose parameter-weighted mean is the target (``budget``). Pruning methods then run with
each layer's own ratio; nothing else changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from ..registry import Registry
from .budget import LayerShape


@dataclass
class AllocationContext:
    """What an allocator may use. ``layers`` maps names to the adapter's PrunableLayer objects."""

    shapes: dict[str, LayerShape]
    target: float
    model: nn.Module | None = None
    adapter: Any = None  # models.adapters.ModelAdapter
    layers: dict[str, Any] = field(default_factory=dict)
    calibration: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0


@runtime_checkable
class Allocator(Protocol):
    name: ClassVar[str]
    needs_calibration: ClassVar[bool]

    def preferences(self, context: AllocationContext) -> dict[str, float]:
        """Per-layer sparsities before the budget is enforced (the solver shifts/rounds them)."""
        ...


_ALLOCATORS = Registry("allocation")
register = _ALLOCATORS.register


def get_allocator(name: str | Allocator, **options: Any) -> Allocator:
    return _ALLOCATORS.get(name, **options)


def available_allocators() -> list[str]:
    return _ALLOCATORS.names()


@register
class Uniform:
    """Every layer at the target (the default)."""

    name: ClassVar[str] = "uniform"
    needs_calibration: ClassVar[bool] = False

    def preferences(self, context: AllocationContext) -> dict[str, float]:
        return {name: context.target for name in context.shapes}
