"""Channel pruning of conv nets through the traced channel graph (public entry: :func:`prune_channels`).

    result = sw.structured.prune_channels(model, example, keep_ratio=0.5, importance="bn_scale")
    result.macs_before, result.macs_after, result.widths   # the model is now physically smaller

Importance methods are registered by name (``bn_scale``: |gamma| of the BatchNorm after each
layer, groups without one keep their width; ``l1``: L1 norm of each filter); a new one is one small
class with ``scores(model, group)`` returning a score per channel, or None to leave the group whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import Registry
from .graph import ChannelGraph, ChannelGroup, trace_channels
from .importance import (
    bn_scale_scores,
    filter_l1_scores,
    global_keep_counts,
    keep_counts_for_budget,
    top_channels,
    uniform_keep_counts,
)
from .surgery import fold_removed_into_bias, remove_channels

__all__ = ["ChannelPruneResult", "available_channel_importances", "count_params", "prune_channels",
           "register_channel_importance"]

_IMPORTANCE = Registry("channel importance")
register_channel_importance = _IMPORTANCE.register


def available_channel_importances() -> list[str]:
    return _IMPORTANCE.names()


@register_channel_importance
class BNScaleImportance:
    name: ClassVar[str] = "bn_scale"

    def scores(self, model: nn.Module, group: ChannelGroup) -> torch.Tensor | None:
        if not group.norms:
            return None  # no BatchNorm to rank by: the group keeps its width
        return bn_scale_scores([model.get_submodule(name).weight for name in group.norms])


@register_channel_importance
class FilterL1Importance:
    name: ClassVar[str] = "l1"

    def scores(self, model: nn.Module, group: ChannelGroup) -> torch.Tensor:
        return filter_l1_scores([model.get_submodule(name).weight for name in group.producers])


def count_params(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


@dataclass
class ChannelPruneResult:
    """What :func:`prune_channels` did: widths per group (by its first producer), MACs and params."""

    widths_before: dict[str, int]
    widths: dict[str, int]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    keep: dict[int, torch.Tensor] = field(repr=False, default_factory=dict)

    def summary(self) -> str:
        return (f"channels {sum(self.widths.values())}/{sum(self.widths_before.values())}, "
                f"MACs {self.macs_after / self.macs_before:.3f}x, params {self.params_after / self.params_before:.3f}x")


def select_channels(model: nn.Module, graph: ChannelGraph, *, keep_ratio: float | None = None,
                    flops_ratio: float | None = None, importance: str = "bn_scale", scope: str = "global",
                    exclude: tuple[str, ...] = ()) -> dict[int, torch.Tensor]:
    """Keep-indices per prunable group for a channel ratio or a MAC ratio (``scope`` global: one
    score threshold over the net; ``layer``: the same ratio in every group)."""
    if (keep_ratio is None) == (flops_ratio is None):
        raise ConfigError("give exactly one of keep_ratio (fraction of channels kept) or flops_ratio "
                          "(fraction of MACs kept).")
    ratio = keep_ratio if keep_ratio is not None else flops_ratio
    if not 0 < ratio <= 1:
        raise ConfigError(f"{'keep_ratio' if keep_ratio is not None else 'flops_ratio'}={ratio} must be in (0, 1]; "
                          "it is the fraction kept, and 0 would leave no channel.")
    if scope not in ("global", "layer"):
        raise ConfigError(f"scope must be 'global' or 'layer', got {scope!r}.")
    scorer = _IMPORTANCE.get(importance)
    groups = [group for group in graph.prunable() if not set(group.producers) & set(exclude)]
    if not groups:
        raise ConfigError("no prunable channel group: every traced layer's channels are fixed or excluded.")
    scores = {group.index: scorer.scores(model, group) for group in groups}
    scores = {index: value for index, value in scores.items() if value is not None}
    if not scores:
        raise ConfigError(f"importance {importance!r} ranks none of the prunable layers (bn_scale needs a BatchNorm "
                          "after each pruned layer); use importance='l1'.")
    groups = [group for group in groups if group.index in scores]
    sizes = {group.index: group.size for group in groups}
    names = {group.index: ", ".join(group.producers) for group in groups}
    total = sum(sizes.values())

    def counts_at(fraction: float) -> dict[int, int]:
        if scope == "layer":
            return uniform_keep_counts(sizes, fraction, names)
        return global_keep_counts(scores, int(round(fraction * total)))

    if keep_ratio is not None:
        counts = counts_at(keep_ratio)
    else:
        counts = keep_counts_for_budget(counts_at, graph.macs, flops_ratio * graph.macs())
    return {index: top_channels(scores[index], count) for index, count in counts.items()}


def prune_channels(model: nn.Module, example: torch.Tensor, *, keep_ratio: float | None = None,
                   flops_ratio: float | None = None, importance: str = "bn_scale", scope: str = "global",
                   compensate: bool = True, exclude: tuple[str, ...] = ()) -> ChannelPruneResult:
    """Remove the least important channels of every Conv2d/Linear whose output is not fixed, in place.

    example:     one input batch (tracing and shape propagation; the bias compensation's forward)
    keep_ratio:  fraction of prunable channels kept; or flops_ratio: fraction of MACs kept
    compensate:  fold the constant output of removed channels (act(beta) of their BatchNorm) into
                 the next layer's bias (network slimming); exact for Linear and unpadded convs
    exclude:     producer layer names whose channels stay
    """
    graph = trace_channels(model, example)
    keep = select_channels(model, graph, keep_ratio=keep_ratio, flops_ratio=flops_ratio, importance=importance,
                           scope=scope, exclude=exclude)
    widths_before = {group.producers[0]: group.size for group in graph.prunable()}
    params_before, macs_before = count_params(model), graph.macs()
    if compensate:
        fold_removed_into_bias(model, graph, keep, example)
    remove_channels(model, graph, keep)
    widths = {**widths_before, **{graph.groups[index].producers[0]: len(channels) for index, channels in keep.items()}}
    return ChannelPruneResult(widths_before, widths, macs_before,
                              graph.macs({index: len(channels) for index, channels in keep.items()}),
                              params_before, count_params(model), keep)
