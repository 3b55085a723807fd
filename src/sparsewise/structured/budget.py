"""ChannelBudgetSolver: per-layer densities -> channel widths (PreCropping's step 2).

Wang et al. 2022, "Structured Pruning is All You Need for Pruning CNNs at Initialization"
(methods.md, ``precropping``; abstract only, the paper's solver is unverified). A pruning-at-init
scorer gives layer l (N_l = c_in * c_out * k^2 weights) a density d_l; the cropped dense layer
should hold about d_l * N_l weights, i.e. with width ratios a_g = c_g' / c_g of its input and output
channel groups, a_in(l) * a_out(l) = d_l. Groups couple consecutive layers (and every writer of a
residual sum), so the system is solved for all groups at once, in log space, weighted by N_l:

    minimize_x  sum_l N_l * (x_in(l) + x_out(l) - log d_l)^2,   x_g = log a_g in [log(1/c_g), 0]

(fixed groups: x = 0), by least squares with the bounds enforced by an active set. When the system
is consistent (e.g. a chain whose classifier density matches its input width ratio) every layer is
exact up to rounding of its widths to whole channels; otherwise the error goes to the small layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError

__all__ = ["BudgetLayer", "ChannelBudgetSolver", "solve_width_ratios"]


@dataclass(frozen=True)
class BudgetLayer:
    """One weight layer: its input group (None = fixed input), output group and weight count N_l."""

    name: str
    in_group: int | None
    out_group: int
    numel: int


def solve_width_ratios(layers: list[BudgetLayer], densities: dict[str, float], sizes: dict[int, int],
                       fixed: set[int]) -> dict[int, float]:
    """Width ratio a_g in [1/c_g, 1] per free group (see the module docstring)."""
    for layer in layers:
        if layer.name not in densities:
            raise ConfigError(f"no density for layer {layer.name!r}; give every traced Conv2d/Linear one.")
        if not 0 < densities[layer.name] <= 1:
            raise ConfigError(f"density of {layer.name!r} is {densities[layer.name]}; it must lie in (0, 1].")
    free = sorted({g for layer in layers for g in (layer.in_group, layer.out_group) if g is not None} - fixed)
    bounds = {g: math.log(1.0 / sizes[g]) for g in free}
    pinned: dict[int, float] = {}
    for _ in range(len(free) + 1):
        unknown = [g for g in free if g not in pinned]
        column = {g: i for i, g in enumerate(unknown)}
        rows, targets = [], []
        for layer in layers:
            row = torch.zeros(len(unknown), dtype=torch.float64)
            target = math.log(densities[layer.name])
            for g in (layer.in_group, layer.out_group):
                if g in column:
                    row[column[g]] += 1.0
                elif g in pinned:
                    target -= pinned[g]
            scale = math.sqrt(layer.numel)
            rows.append(row * scale)
            targets.append(target * scale)
        if not unknown:
            break
        solution = torch.linalg.lstsq(torch.stack(rows), torch.tensor(targets, dtype=torch.float64).unsqueeze(1),
                                      driver="gelsd").solution.flatten()
        violated = {g: float(solution[column[g]]) for g in unknown
                    if solution[column[g]] > 1e-12 or solution[column[g]] < bounds[g] - 1e-12}
        if not violated:
            pinned.update({g: float(solution[column[g]]) for g in unknown})
            break
        # pin the worst violator at its bound and re-solve the rest
        worst = max(violated, key=lambda g: max(violated[g], bounds[g] - violated[g]))
        pinned[worst] = 0.0 if violated[worst] > 0 else bounds[worst]
    return {g: math.exp(pinned[g]) for g in free}


class ChannelBudgetSolver:
    """Channel widths whose dense per-layer weight counts match d_l * N_l (PreCropping).

    ``layers`` comes from a traced :class:`~.graph.ChannelGraph` (``from_graph``)."""

    def __init__(self, layers: list[BudgetLayer], sizes: dict[int, int], fixed: set[int]):
        self.layers, self.sizes, self.fixed = layers, sizes, fixed

    @classmethod
    def from_graph(cls, graph, params_of: dict[str, int]) -> ChannelBudgetSolver:
        layers = [BudgetLayer(name, shape.in_group, shape.out_group, params_of[name])
                  for name, shape in graph.layers.items()]
        return cls(layers, {group.index: group.size for group in graph.groups},
                   {group.index for group in graph.groups if group.fixed})

    def solve(self, densities: dict[str, float]) -> dict[int, int]:
        """Whole-channel widths per free group: round(a_g * c_g), at least 1."""
        ratios = solve_width_ratios(self.layers, densities, self.sizes, self.fixed)
        return {g: min(self.sizes[g], max(1, int(round(ratio * self.sizes[g])))) for g, ratio in ratios.items()}

    def layer_params(self, widths: dict[int, int]) -> dict[str, float]:
        """Dense weight count of each layer at ``widths`` (N_l * a_in * a_out)."""
        def ratio(g: int | None) -> float:
            return 1.0 if g is None or g not in widths else widths[g] / self.sizes[g]
        return {layer.name: layer.numel * ratio(layer.in_group) * ratio(layer.out_group) for layer in self.layers}
