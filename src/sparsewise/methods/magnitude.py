"""Magnitude pruning: drop the weights with the smallest |W_ij| (data-free baseline)."""

from __future__ import annotations

from typing import ClassVar

import torch

from ..patterns import mask_from_scores
from ..scores import magnitude_scores
from ._common import check_options
from .base import Capabilities, LayerResult, LayerTask, Method, register


@register
class MagnitudePruning(Method):
    name: ClassVar[str] = "magnitude"
    capabilities: ClassVar[Capabilities] = Capabilities(scopes=frozenset({"row", "layer", "global"}))

    def score(self, task: LayerTask) -> torch.Tensor:
        return magnitude_scores(task.weight)

    def global_score(self, weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Scores comparable across layers (scope "global"): |W| itself."""
        return magnitude_scores(weight.float())

    def prune_layer(self, task: LayerTask) -> LayerResult:
        check_options(task, self.name, ())
        task.pattern.check_shape(tuple(task.weight.shape), task.name)
        mask = mask_from_scores(self.score(task), task.sparsity, task.pattern)
        return LayerResult(weight=torch.where(mask, task.weight, 0.0), mask=mask)
