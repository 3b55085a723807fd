"""Wanda: prune by |W_ij| * ||X_j||_2 within each output row, no weight update.

Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models".
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..calibration.stats import STAT_NORMS
from ..patterns import mask_from_scores
from ..scores import wanda_scores
from ._common import check_options, require_stats
from .base import Capabilities, LayerResult, LayerTask, Method, check_pattern, register


@register
class WandaPruning(Method):
    name: ClassVar[str] = "wanda"
    capabilities: ClassVar[Capabilities] = Capabilities(needs=frozenset({STAT_NORMS}))

    def score(self, task: LayerTask) -> torch.Tensor:
        stats = require_stats(task, self.name, "sq_sum", STAT_NORMS)
        return wanda_scores(task.weight, stats.channel_norms)

    def prune_layer(self, task: LayerTask) -> LayerResult:
        check_options(task, self.name, ())
        check_pattern(self, task.pattern)
        task.pattern.check_shape(tuple(task.weight.shape), task.name)
        mask = mask_from_scores(self.score(task), task.sparsity, task.pattern)
        return LayerResult(weight=torch.where(mask, task.weight, 0.0), mask=mask, info={"tokens": task.stats.tokens})
