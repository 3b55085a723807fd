"""Layer-wise sparsity allocation: how much of each layer to prune under one global budget.

``allocate(name, ...)`` runs a registered allocator (uniform, er, erk, owl, ecoflap) or takes
an explicit {layer: sparsity} map, then enforces the budget: the parameter-weighted mean of the
ratios equals the target over the counted layers (exact up to one row of one layer). N:M
patterns fix every layer's ratio at 1 - N/M, so they take no allocation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError
from ..registry import import_plugins
from .base import AllocationContext, Allocator, available_allocators, get_allocator
from .budget import LayerShape, round_to_rows, shift_to_budget, weighted_sparsity

import_plugins(__name__, __path__, infrastructure=("base", "budget"))  # every other file is an allocator


@dataclass
class Allocation:
    """Per-layer target sparsities and what the allocator measured to choose them."""

    method: str
    target: float
    sparsities: dict[str, float]
    shapes: dict[str, LayerShape]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def achieved(self) -> float:
        """Parameter-weighted mean of the per-layer ratios (equals ``target`` up to one row)."""
        return weighted_sparsity(self.sparsities, self.shapes)

    def summary(self) -> str:
        values = list(self.sparsities.values())
        return (f"allocation {self.method}: layer sparsities {min(values):.3f}..{max(values):.3f}, "
                f"weighted {self.achieved:.4f} (target {self.target:.4f})")


def layer_shapes(adapter, layers: dict) -> dict[str, LayerShape]:
    """Shapes and block indices of the layers to prune (layers outside blocks get block -1)."""
    block_of = {}
    for index in range(len(adapter.blocks)):
        for name in adapter.block_layers(index):
            block_of[name] = index
    return {name: LayerShape(layer.out_features, layer.in_features, block_of.get(name, -1))
            for name, layer in layers.items()}


def allocate(method: str | Allocator | dict[str, float], *, target: float, shapes: dict[str, LayerShape],
             model=None, adapter=None, layers: dict | None = None, calibration=None,
             device: torch.device | str = "cpu", seed: int = 0, max_sparsity: float = 0.99,
             **options: Any) -> Allocation:
    """Per-layer sparsities with the weighted mean ``target`` (see the module docstring)."""
    if not 0.0 <= target < 1.0:
        raise ConfigError(f"the global sparsity must lie in [0, 1), got {target}.")
    if isinstance(method, dict):
        unknown = sorted(set(method) - set(shapes))
        if unknown:
            raise ConfigError(f"allocation names layers that are not pruned: {unknown[:5]}.")
        missing = sorted(set(shapes) - set(method))
        if missing:
            raise ConfigError(f"an explicit allocation must give every pruned layer a ratio; missing {missing[:5]}.")
        bad = {name: value for name, value in method.items() if not 0.0 <= value < 1.0}
        if bad:
            raise ConfigError(f"layer sparsities must lie in [0, 1): {bad}.")
        target = weighted_sparsity(method, shapes)
        return Allocation("explicit", target, round_to_rows(dict(method), shapes, target), shapes)
    allocator = get_allocator(method, **options)
    if allocator.needs_calibration and calibration is None:
        raise ConfigError(f"allocation {allocator.name!r} needs calibration data: pass calibration=...")
    context = AllocationContext(shapes=shapes, target=target, model=model, adapter=adapter, layers=layers or {},
                                calibration=calibration, device=torch.device(device), seed=seed)
    preferred = allocator.preferences(context)
    if allocator.name == "uniform":
        balanced = preferred
    else:
        balanced = shift_to_budget(preferred, shapes, target, low=0.0, high=max(max_sparsity, target))
    sparsities = round_to_rows(balanced, shapes, target)
    return Allocation(allocator.name, target, sparsities, shapes, dict(getattr(allocator, "info", {})))


__all__ = ["Allocation", "AllocationContext", "LayerShape", "allocate", "available_allocators", "get_allocator",
           "layer_shapes"]
