"""Budget solvers: per-layer ratios whose parameter-weighted total is the global target.

Every allocator produces raw per-layer preferences; these functions turn them into sparsities
whose zeros sum to the target over the counted parameters. The pruners zero a whole number of
weights per output row, so a layer's sparsity is returned as ``zeros_per_row / in_features``
and the total is exact up to one row of one layer (largest-remainder rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class LayerShape:
    """What an allocator may know of a layer: its weight shape [out, in] and its block index."""

    out_features: int
    in_features: int
    block: int = 0

    @property
    def params(self) -> int:
        return self.out_features * self.in_features


def scale_densities(raw: dict[str, float], shapes: dict[str, LayerShape], density: float,
                    cap: float = 1.0) -> dict[str, float]:
    """d_l = eps * raw_l with one eps such that sum d_l N_l = density * sum N_l; a layer whose
    d_l would exceed ``cap`` is fixed at ``cap`` and eps is re-solved over the rest (the ER/ERK
    rule of Mocanu et al. 2018 / Evci et al. 2020, as in the random-pruning paper's code)."""
    total = sum(shapes[name].params for name in raw)
    budget = density * total
    fixed: dict[str, float] = {}
    while True:
        free = [name for name in raw if name not in fixed]
        left = budget - sum(fixed[name] * shapes[name].params for name in fixed)
        weight = sum(raw[name] * shapes[name].params for name in free)
        if not free or weight <= 0:
            if left > 1e-6 * total:
                raise ConfigError(f"density {density} cannot be reached with every layer capped at {cap}.")
            return {**fixed, **{name: 0.0 for name in free}}
        eps = left / weight
        over = [name for name in free if eps * raw[name] > cap]
        if not over:
            return {**fixed, **{name: eps * raw[name] for name in free}}
        for name in over:
            fixed[name] = cap


def shift_to_budget(preferred: dict[str, float], shapes: dict[str, LayerShape], target: float, *,
                    low: float = 0.0, high: float = 0.99) -> dict[str, float]:
    """s_l = clip(p_l + c, low, high) with the one constant c (bisection) whose weighted mean is
    ``target``: keeps the allocator's differences between layers, fixes the total."""
    total = sum(shapes[name].params for name in preferred)

    def mean(shift: float) -> float:
        return sum(min(high, max(low, value + shift)) * shapes[name].params
                   for name, value in preferred.items()) / total

    if not low <= target <= high:
        raise ConfigError(f"target sparsity {target} lies outside the per-layer bounds [{low}, {high}].")
    lo, hi = -2.0, 2.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if mean(mid) < target:
            lo = mid
        else:
            hi = mid
    return {name: min(high, max(low, value + hi)) for name, value in preferred.items()}


def round_to_rows(sparsities: dict[str, float], shapes: dict[str, LayerShape], target: float) -> dict[str, float]:
    """Whole zeros per row for every layer, total zeros = round(target * counted params) up to
    one row: floor each layer's zeros per row, then give the missing rows' worth of zeros to the
    layers with the largest remainders (one extra zero per row each, while it fits)."""
    wanted = round(target * sum(shape.params for shape in shapes.values()))
    per_row = {name: int(sparsities[name] * shapes[name].in_features) for name in sparsities}
    have = sum(per_row[name] * shapes[name].out_features for name in per_row)
    remainders = sorted(sparsities, key=lambda name: sparsities[name] * shapes[name].in_features - per_row[name],
                        reverse=True)
    for name in remainders:
        rows = shapes[name].out_features
        if have + rows > wanted + rows // 2 or per_row[name] >= shapes[name].in_features:
            continue
        per_row[name] += 1
        have += rows
    return {name: per_row[name] / shapes[name].in_features for name in per_row}


def weighted_sparsity(sparsities: dict[str, float], shapes: dict[str, LayerShape]) -> float:
    total = sum(shapes[name].params for name in sparsities)
    return sum(value * shapes[name].params for name, value in sparsities.items()) / total


def assign_levels(preferred: dict[str, float], shapes: dict[str, LayerShape], levels: list[float],
                  target: float) -> dict[str, float]:
    """Give every layer one of a few allowed sparsities (mixed N:M choices such as 2:4 = 0.5 and
    1:4 = 0.75) so the weighted total lands as near ``target`` as whole layers allow.

    Each layer starts at the level nearest its preference; then, one layer at a time, the layer
    whose preference lies furthest beyond its level in the needed direction moves one level,
    as long as the move brings the total closer to the target. The result is off the target by at
    most about half of one layer's step (reported by the caller, never hidden).
    """
    levels = sorted(set(levels))
    if len(levels) < 2:
        raise ConfigError(f"mixed choices need at least two different sparsities, got {levels}.")
    if not levels[0] <= target <= levels[-1]:
        raise ConfigError(f"target {target} lies outside the choices' range [{levels[0]}, {levels[-1]}].")
    total = sum(shapes[name].params for name in preferred)
    index = {name: min(range(len(levels)), key=lambda i: (abs(levels[i] - value), i)) for name, value in preferred.items()}

    def achieved() -> float:
        return sum(levels[index[name]] * shapes[name].params for name in index) / total

    while True:
        current = achieved()
        step = 1 if current < target else -1
        movable = [name for name in index if 0 <= index[name] + step < len(levels)]
        # most eager first: preference furthest beyond the current level in the direction of the move
        movable.sort(key=lambda name: (-(preferred[name] - levels[index[name]]) * step, name))
        for name in movable:
            moved = current + (levels[index[name] + step] - levels[index[name]]) * shapes[name].params / total
            if abs(moved - target) < abs(current - target):
                index[name] += step
                break
        else:
            return {name: levels[index[name]] for name in index}
