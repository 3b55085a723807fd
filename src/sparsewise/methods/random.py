"""Random pruning: drop uniformly random weights, seeded (data-free baseline)."""

from __future__ import annotations

from typing import ClassVar

import torch

from ..patterns import mask_from_scores
from ..scores import random_scores
from ._common import check_options
from .base import Capabilities, LayerResult, LayerTask, Method, register


@register
class RandomPruning(Method):
    name: ClassVar[str] = "random"
    capabilities: ClassVar[Capabilities] = Capabilities(scopes=frozenset({"row", "layer", "global"}))

    def score(self, task: LayerTask) -> torch.Tensor:
        return random_scores(task.weight, task.generator)

    def global_score(self, weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Scores comparable across layers (scope "global"): uniform noise from the run's generator."""
        return random_scores(weight, generator)

    def prune_layer(self, task: LayerTask) -> LayerResult:
        check_options(task, self.name, ())
        task.pattern.check_shape(tuple(task.weight.shape), task.name)
        mask = mask_from_scores(self.score(task), task.sparsity, task.pattern)
        return LayerResult(weight=torch.where(mask, task.weight, 0.0), mask=mask)
