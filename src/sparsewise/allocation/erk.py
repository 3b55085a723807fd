"""ER / ERK layer densities: d_l proportional to (n_in + n_out) / (n_in * n_out).

Erdos-Renyi (Mocanu et al. 2018) and its kernel variant ERK (Evci et al. 2020, RigL); the
random-pruning paper (Liu et al. 2022) uses them as the layer-wise ratio rule. For a Linear
weight (two dims) ER and ERK coincide. ``power`` raises the raw ratio (erk_power_scale); a
layer whose density would exceed 1 is made dense and the scale re-solved.
"""

from __future__ import annotations

from typing import ClassVar

from .base import AllocationContext, register
from .budget import scale_densities


def erk_raw(out_features: int, in_features: int, power: float = 1.0) -> float:
    """(n_in + n_out) / (n_in * n_out), raised to ``power``."""
    return ((in_features + out_features) / (in_features * out_features)) ** power


class _ErdosRenyi:
    needs_calibration: ClassVar[bool] = False

    def __init__(self, power: float = 1.0):
        if power < 0:
            raise ValueError(f"power must be >= 0, got {power}.")
        self.power = power

    def preferences(self, context: AllocationContext) -> dict[str, float]:
        raw = {name: erk_raw(shape.out_features, shape.in_features, self.power)
               for name, shape in context.shapes.items()}
        densities = scale_densities(raw, context.shapes, 1.0 - context.target)
        return {name: 1.0 - density for name, density in densities.items()}


@register
class ER(_ErdosRenyi):
    name: ClassVar[str] = "er"


@register
class ERK(_ErdosRenyi):
    name: ClassVar[str] = "erk"
