"""Random pruning: drop uniformly random weights, seeded (data-free baseline)."""

from __future__ import annotations

from typing import ClassVar

import torch

from ..patterns import mask_from_scores
from ..scores import random_scores
from ._common import check_options
from .base import LayerResult, LayerTask, register


@register
class RandomPruning:
    name: ClassVar[str] = "random"
    needs: ClassVar[frozenset[str]] = frozenset()

    def score(self, task: LayerTask) -> torch.Tensor:
        return random_scores(task.weight, task.generator)

    def prune_layer(self, task: LayerTask) -> LayerResult:
        check_options(task, self.name, ())
        task.pattern.check_shape(tuple(task.weight.shape), task.name)
        mask = mask_from_scores(self.score(task), task.sparsity, task.pattern)
        return LayerResult(weight=torch.where(mask, task.weight, 0.0), mask=mask)
