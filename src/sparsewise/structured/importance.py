"""Channel importance and channel selection: pure functions over tensors (no model access).

A group of coupled channels (a residual add couples several layers) gets one score per channel:
the mean over its members, so a group's score is on the scale of one layer's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import ConfigError

__all__ = ["bn_scale_scores", "filter_l1_scores", "global_keep_counts", "keep_counts_for_budget",
           "top_channels", "uniform_keep_counts"]


def bn_scale_scores(scales: Sequence[torch.Tensor]) -> torch.Tensor:
    """s_c = mean_l |gamma_l,c| over the BatchNorm scales of the group (network slimming:
    Liu et al. 2017, "Learning Efficient Convolutional Networks through Network Slimming")."""
    if not scales:
        raise ConfigError("bn_scale importance needs a BatchNorm after every pruned layer; use importance='l1'.")
    return torch.stack([scale.detach().abs().float() for scale in scales]).mean(dim=0)


def filter_l1_scores(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """s_c = mean_l ||W_l[c]||_1 over the producers' output rows (Li et al. 2017, "Pruning Filters
    for Efficient ConvNets")."""
    return torch.stack([weight.detach().abs().float().flatten(1).sum(dim=1) for weight in weights]).mean(dim=0)


def top_channels(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Sorted indices of the ``count`` highest scores (ties: lower index first)."""
    order = torch.argsort(scores, descending=True, stable=True)
    return order[:count].sort().values


def uniform_keep_counts(sizes: dict[int, int], keep_ratio: float, names: dict[int, str]) -> dict[int, int]:
    """round(keep_ratio * size) channels per group; a group left with none is an error."""
    counts = {}
    for index, size in sizes.items():
        count = int(round(keep_ratio * size))
        if count < 1:
            raise ConfigError(f"keep_ratio={keep_ratio:g} leaves no channel of {names[index]} ({size} channels); "
                              f"use keep_ratio >= {0.5 / size:.3g} or scope='global'.")
        counts[index] = min(count, size)
    return counts


def global_keep_counts(scores: dict[int, torch.Tensor], keep_total: int) -> dict[int, int]:
    """Keep the ``keep_total`` highest channel scores over all groups (one threshold for the whole
    net, as network slimming does); every group keeps at least its best channel."""
    indices = list(scores)
    flat = torch.cat([scores[index] for index in indices])
    owner = torch.cat([torch.full((len(scores[index]),), position) for position, index in enumerate(indices)])
    order = torch.argsort(flat, descending=True, stable=True)
    counts = torch.bincount(owner[order[:max(keep_total, 0)]], minlength=len(indices)).clamp(min=1)
    return {index: int(counts[position]) for position, index in enumerate(indices)}


def keep_counts_for_budget(counts_at: Callable[[float], dict[int, int]], cost: Callable[[dict[int, int]], float],
                           budget: float, steps: int = 40) -> dict[int, int]:
    """Largest keep fraction t in (0, 1] whose ``counts_at(t)`` costs at most ``budget`` (bisection;
    cost is monotone in t). Raises when even the smallest counts exceed the budget."""
    low, high = 0.0, 1.0
    if cost(counts_at(high)) <= budget:
        return counts_at(high)
    best = None
    for _ in range(steps):
        middle = (low + high) / 2
        try:
            counts = counts_at(middle)
        except ConfigError:
            low = middle
            continue
        if cost(counts) <= budget:
            best, low = counts, middle
        else:
            high = middle
    if best is None:
        raise ConfigError(f"no channel widths reach the budget {budget:.4g}: even one channel per layer costs more; "
                          "raise the FLOP ratio.")
    return best
