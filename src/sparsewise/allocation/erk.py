"""ER / ERK layer densities: d_l proportional to (n_in + n_out) / (n_in * n_out).

Erdos-Renyi (Mocanu et al. 2018) and its kernel variant ERK (Evci et al. 2020, RigL); the
random-pruning paper (Liu et al. 2022) uses them as the layer-wise ratio rule. ER uses the first
two dims of a weight, raw_l = (n_out + n_in) / (n_out n_in); ERK all of them, raw_l = sum(shape) /
prod(shape) (conv kernels included). For a Linear weight (two dims) ER and ERK coincide. ``power``
raises the raw ratio (erk_power_scale); one scale factor meets the global density, a layer whose
density would exceed 1 is made dense and the scale re-solved (``budget.scale_densities``).

``plus=True`` is ERK+ (Liu et al. 2022): the first layer stays dense and the last layer's density
is fixed at max(density, 0.2) before the rest share what is left of the budget.

One implementation for both users: pruning's ``allocate("er" | "erk")`` (Linear shapes from the
allocation context) and sparse training's distributions (``training.distribution``, full weight
shapes through :meth:`densities`, conv kernels included).
"""

from __future__ import annotations

import math
from typing import ClassVar

from ..errors import ConfigError
from .base import AllocationContext, register
from .budget import LayerShape, scale_densities

LAST_LAYER_MIN_DENSITY = 0.2  # ERK+: the classifier keeps at least this density


def erdos_renyi_raw(shape: tuple[int, ...], kernel: bool = True, power: float = 1.0) -> float:
    """The unscaled density of a weight of ``shape`` (stored layout, out dim first): ER
    (``kernel=False``) (n_out + n_in) / (n_out n_in) over the first two dims, ERK sum / prod of all
    dims; raised to ``power``."""
    raw = sum(shape) / math.prod(shape) if kernel else (shape[0] + shape[1]) / (shape[0] * shape[1])
    return raw if power == 1.0 else raw**power


def erk_raw(out_features: int, in_features: int, power: float = 1.0) -> float:
    """(n_in + n_out) / (n_in * n_out), raised to ``power`` (a two-dim weight: ER = ERK)."""
    return erdos_renyi_raw((out_features, in_features), power=power)


class _ErdosRenyi:
    needs_calibration: ClassVar[bool] = False
    kernel: ClassVar[bool] = True

    def __init__(self, power: float = 1.0, plus: bool = False):
        if power < 0:
            raise ValueError(f"power must be >= 0, got {power}.")
        if not isinstance(plus, bool):
            raise ValueError(f"plus must be True or False, got {plus!r}.")
        self.power = power
        self.plus = plus

    @property
    def label(self) -> str:
        return self.name + ("+" if self.plus else "")

    def densities(self, shapes: dict[str, tuple[int, ...]], density: float) -> dict[str, float]:
        """Per-layer densities (in ``shapes`` order) whose parameter-weighted mean is ``density``:
        d_l = eps * raw_l with the dense cap (and ERK+'s fixed first and last layers)."""
        layers = {name: LayerShape(shape[0], math.prod(shape[1:])) for name, shape in shapes.items()}
        fixed: dict[str, float] = {}
        if self.plus:
            names = list(shapes)
            if len(names) < 3:
                raise ConfigError(f"{self.label} fixes the first and last layers and needs at least three "
                                  "trained layers.")
            fixed = {names[0]: 1.0, names[-1]: max(density, LAST_LAYER_MIN_DENSITY)}
        free = {name: erdos_renyi_raw(shape, self.kernel, self.power)
                for name, shape in shapes.items() if name not in fixed}
        total = sum(layer.params for layer in layers.values())
        left = density * total - sum(fixed[name] * layers[name].params for name in fixed)
        free_params = sum(layers[name].params for name in free)
        if left <= 0 or left > free_params:
            raise ConfigError(f"{self.label} cannot reach sparsity {1.0 - density:.6g} with its fixed layers; pick "
                              "another distribution or sparsity.")
        solved = {**fixed, **scale_densities(free, {name: layers[name] for name in free}, left / free_params)}
        return {name: solved[name] for name in shapes}

    def preferences(self, context: AllocationContext) -> dict[str, float]:
        shapes = {name: (shape.out_features, shape.in_features) for name, shape in context.shapes.items()}
        return {name: 1.0 - density for name, density in self.densities(shapes, 1.0 - context.target).items()}


@register
class ER(_ErdosRenyi):
    name: ClassVar[str] = "er"
    kernel: ClassVar[bool] = False


@register
class ERK(_ErdosRenyi):
    name: ClassVar[str] = "erk"
