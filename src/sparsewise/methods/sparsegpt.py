"""SparseGPT: OBS pruning with weight reconstruction from H = X^T X.

Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot".
The math lives in :func:`sparsewise.solvers.sparsegpt_prune`; this module wires a layer task to it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..calibration.stats import STAT_HESSIAN
from ..errors import ConfigError, NumericalError
from ..solvers import sparsegpt_prune
from ._common import check_options, require_stats
from .base import Capabilities, LayerResult, LayerTask, Method, check_pattern, register

PRECISIONS = {"float32": torch.float32, "float64": torch.float64}


@register
class SparseGPTPruning(Method):
    name: ClassVar[str] = "sparsegpt"
    capabilities: ClassVar[Capabilities] = Capabilities(needs=frozenset({STAT_HESSIAN}), updates_weights=True)

    def __init__(self, block_size: int = 128, damp_ratio: float = 0.01, max_damp_tries: int = 6,
                 kernel: str = "auto", precision: str = "float32") -> None:
        # precision "float64": a reference run of the same algorithm (slower; shows float-rounding spread)
        self.defaults: dict[str, Any] = {
            "block_size": block_size, "damp_ratio": damp_ratio, "max_damp_tries": max_damp_tries, "kernel": kernel,
            "precision": precision,
        }

    def prune_layer(self, task: LayerTask) -> LayerResult:
        options = {**self.defaults, **check_options(task, self.name, self.defaults)}
        precision = options.pop("precision")
        if precision not in PRECISIONS:
            raise ConfigError(f"sparsegpt precision must be one of {sorted(PRECISIONS)}, got {precision!r}.")
        options["compute_dtype"] = PRECISIONS[precision]
        check_pattern(self, task.pattern)
        task.pattern.check_shape(tuple(task.weight.shape), task.name)
        stats = require_stats(task, self.name, "xtx", STAT_HESSIAN)
        try:
            weight, mask, info = sparsegpt_prune(task.weight, stats.hessian, task.sparsity, task.pattern, **options)
        except NumericalError as error:
            raise NumericalError(f"{task.name}: {error}") from error
        info["tokens"] = stats.tokens
        return LayerResult(weight=weight, mask=mask, info=info)
