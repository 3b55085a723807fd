"""Layer-wise ratios for sparse training: uniform, ER, ERK and ERK+ under one global budget.

The ratios come from the allocation registry (``sparsewise.allocation``), the same allocators
pruning uses: ``uniform``, ``er``, ``erk`` and ERK+ as ``erk`` with ``plus=True``. Training passes
the weights' stored shapes, so ERK counts conv kernel dims (raw_l = sum(shape) / prod(shape)) and ER
the first two dims; one scale factor meets the global density, a layer that would exceed density 1
is made dense and the factor re-solved (Mocanu et al. 2018; Evci et al. 2020; Liu et al. 2022).
ERK+ (Liu et al. 2022) keeps the first layer dense and fixes the last layer's density at
max(density, 0.2) before solving the rest. See ``allocation/erk.py``.
"""

from __future__ import annotations

import math
from typing import Any

from ..allocation.base import AllocationContext, get_allocator
from ..allocation.budget import LayerShape
from ..errors import ConfigError
from ..patterns import Pattern, check_ratio

# distribution name -> (allocation registry name, allocator options)
ALLOCATORS: dict[str, tuple[str, dict[str, Any]]] = {
    "uniform": ("uniform", {}), "er": ("er", {}), "erk": ("erk", {}), "erk+": ("erk", {"plus": True}),
}
DISTRIBUTIONS = tuple(ALLOCATORS)


def layer_sparsities(weight_shapes: dict[str, tuple[int, ...]], sparsity: float,
                     distribution: str | dict[str, float] = "uniform",
                     pattern: Pattern | None = None) -> dict[str, float]:
    """Per-layer sparsity whose parameter-weighted mean is ``sparsity`` (shapes as stored)."""
    pattern = pattern or Pattern(scope="layer")
    if pattern.kind == "nm":
        if distribution not in ("uniform", None):
            raise ConfigError(f"pattern {pattern} fixes every layer at {pattern.fixed_sparsity:.4g} sparsity; "
                              "drop distribution= (or use an unstructured pattern to distribute a budget).")
        return dict.fromkeys(weight_shapes, pattern.resolve_sparsity(None if sparsity is None else sparsity))
    check_ratio(sparsity)
    if isinstance(distribution, dict):
        missing = sorted(set(weight_shapes) - set(distribution))
        if missing:
            raise ConfigError(f"an explicit distribution must give every trained layer a ratio; missing {missing[:5]}.")
        return {name: check_ratio(distribution[name]) for name in weight_shapes}
    if distribution not in ALLOCATORS:
        raise ConfigError(f"unknown distribution {distribution!r}; use one of {', '.join(DISTRIBUTIONS)} "
                          "or a {layer: sparsity} dict.")
    name, options = ALLOCATORS[distribution]
    allocator = get_allocator(name, **options)
    if name == "uniform":
        shapes = {layer: LayerShape(shape[0], math.prod(shape[1:])) for layer, shape in weight_shapes.items()}
        return allocator.preferences(AllocationContext(shapes=shapes, target=sparsity))
    densities = allocator.densities(weight_shapes, 1.0 - sparsity)
    return {layer: 1.0 - densities[layer] for layer in weight_shapes}
