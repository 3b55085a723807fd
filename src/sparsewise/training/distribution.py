"""Layer-wise ratios for sparse training: uniform, ER, ERK and ERK+ under one global budget.

ER uses the first two weight dims, raw_l = (n_in + n_out) / (n_in n_out); ERK all of them,
raw_l = sum(shape) / prod(shape) (conv kernels included); one scale factor meets the global
density, any layer that would exceed density 1 is made dense and the factor re-solved (Mocanu
et al. 2018; Evci et al. 2020; Liu et al. 2022). ERK+ (Liu et al. 2022) keeps the first layer
dense and fixes the last layer's density at max(density, 0.2) before solving the rest.
"""

from __future__ import annotations

import math

from ..allocation.budget import LayerShape, scale_densities
from ..errors import ConfigError
from ..patterns import Pattern, check_ratio

DISTRIBUTIONS = ("uniform", "er", "erk", "erk+")


def _raw(shape: tuple[int, ...], kind: str) -> float:
    if kind == "er":
        return (shape[0] + shape[1]) / (shape[0] * shape[1])
    return sum(shape) / math.prod(shape)


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
    if distribution not in DISTRIBUTIONS:
        raise ConfigError(f"unknown distribution {distribution!r}; use one of {', '.join(DISTRIBUTIONS)} "
                          "or a {layer: sparsity} dict.")
    if distribution == "uniform":
        return dict.fromkeys(weight_shapes, sparsity)
    shapes = {name: LayerShape(shape[0], math.prod(shape[1:])) for name, shape in weight_shapes.items()}
    density = 1.0 - sparsity
    fixed: dict[str, float] = {}
    if distribution == "erk+":
        names = list(weight_shapes)
        if len(names) < 3:
            raise ConfigError("erk+ fixes the first and last layers and needs at least three trained layers.")
        fixed = {names[0]: 1.0, names[-1]: max(density, 0.2)}
    kind = "er" if distribution == "er" else "erk"
    free = {name: _raw(shape, kind) for name, shape in weight_shapes.items() if name not in fixed}
    total = sum(shape.params for shape in shapes.values())
    left = density * total - sum(fixed[name] * shapes[name].params for name in fixed)
    free_params = sum(shapes[name].params for name in free)
    if left <= 0 or left > free_params:
        raise ConfigError(f"{distribution} cannot reach sparsity {sparsity} with its fixed layers; pick another "
                          "distribution or sparsity.")
    densities = {**fixed, **scale_densities(free, {n: shapes[n] for n in free}, left / free_params)}
    return {name: 1.0 - densities[name] for name in weight_shapes}
