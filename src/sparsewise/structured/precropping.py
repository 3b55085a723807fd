"""PreCropping: decide channel widths at initialization from a pruning-at-init scorer, then train.

Wang et al. 2022, "Structured Pruning is All You Need for Pruning CNNs at Initialization": run a
PAI method (SNIP here: :func:`sparsewise.scores.snip_scores`, scored once on one batch) at global density d, keep only the
layer-wise densities d_l it implies, convert them to channel widths (:class:`~.budget.ChannelBudgetSolver`)
and rebuild the untrained net at those widths (freshly initialized: trained from scratch).

    widths = precrop(model, example, (images, labels), flops_ratio=0.5)   # model rebuilt in place
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..scores import snip_scores
from .budget import ChannelBudgetSolver
from .channels import count_params
from .graph import ChannelGraph, trace_channels
from .surgery import remove_channels

__all__ = ["PrecropResult", "layer_densities", "precrop", "snip_layer_scores"]


def snip_layer_scores(model: nn.Module, names: list[str], batch: tuple[torch.Tensor, torch.Tensor],
                      loss_fn: Callable = F.cross_entropy) -> dict[str, torch.Tensor]:
    """SNIP scores |W * dL/dW| of each named layer's weights on one batch (flattened)."""
    inputs, targets = batch
    model.zero_grad(set_to_none=True)
    loss_fn(model(inputs), targets).backward()
    scores = {}
    for name in names:
        weight = model.get_submodule(name).weight
        scores[name] = snip_scores(weight.flatten(1), weight.grad.flatten(1)).flatten()
    model.zero_grad(set_to_none=True)
    return scores


def layer_densities(scores: dict[str, torch.Tensor], density: float) -> dict[str, float]:
    """d_l: the fraction of layer l's entries in the global top ``density`` of all scores (at least one)."""
    if not 0 < density <= 1:
        raise ConfigError(f"density={density} must lie in (0, 1].")
    flat = torch.cat(list(scores.values()))
    kept = max(1, int(round(density * len(flat))))
    threshold = torch.topk(flat, kept).values[-1]
    return {name: max(float((score >= threshold).float().mean()), 1.0 / len(score)) for name, score in scores.items()}


@dataclass
class PrecropResult:
    density: float
    densities: dict[str, float]
    widths: dict[str, int]  # kept channels per group, named by its first producer
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int


def _rebuild(model: nn.Module, graph: ChannelGraph, widths: dict[int, int]) -> None:
    for module in remove_channels(model, graph, {g: torch.arange(width) for g, width in widths.items()}).values():
        module.reset_parameters()  # trained from scratch: fan-in of the new width


def precrop(model: nn.Module, example: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor], *,
            density: float | None = None, flops_ratio: float | None = None,
            loss_fn: Callable = F.cross_entropy) -> PrecropResult:
    """Crop the (untrained) ``model`` in place to the widths SNIP's layer densities imply, for a global
    weight ``density`` or, by bisection over the density, a fraction ``flops_ratio`` of the MACs."""
    if (density is None) == (flops_ratio is None):
        raise ConfigError("give exactly one of density (fraction of weights) or flops_ratio (fraction of MACs).")
    graph = trace_channels(model, example)
    names = list(graph.layers)
    params_of = {name: model.get_submodule(name).weight.numel() for name in names}
    solver = ChannelBudgetSolver.from_graph(graph, params_of)
    macs_before, params_before = graph.macs(), count_params(model)

    scores = snip_layer_scores(model, names, batch, loss_fn)

    def plan(d: float) -> tuple[dict[str, float], dict[int, int]]:
        densities = layer_densities(scores, d)
        return densities, solver.solve(densities)

    if density is not None:
        densities, widths = plan(density)
    else:
        if not 0 < flops_ratio <= 1:
            raise ConfigError(f"flops_ratio={flops_ratio} must lie in (0, 1].")
        low, high = 1e-4, 1.0
        densities, widths = plan(high)
        density = high
        for _ in range(20):
            middle = (low + high) / 2
            candidate = plan(middle)
            if graph.macs(candidate[1]) <= flops_ratio * macs_before:
                low, (densities, widths), density = middle, candidate, middle
            else:
                high = middle
        if graph.macs(widths) > flops_ratio * macs_before:
            raise ConfigError(f"no SNIP density reaches flops_ratio={flops_ratio}; raise it.")
    _rebuild(model, graph, widths)
    return PrecropResult(density, densities, {graph.groups[g].producers[0]: w for g, w in widths.items()},
                         macs_before, graph.macs(widths), params_before, count_params(model))
