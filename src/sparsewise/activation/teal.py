"""TEAL (Liu et al., 2024, "Training-Free Activation Sparsity in Large Language Models"):
zero x_j when |x_j| <= t, one calibrated threshold per projection input."""

from __future__ import annotations

import torch

from .base import ScoreMethod, Site, register


@register
class Teal(ScoreMethod):
    name = "teal"

    def score(self, site: Site, x: torch.Tensor) -> torch.Tensor:
        return x.abs()

    def column_thresholds(self, site: Site, threshold: float) -> torch.Tensor:
        return torch.full((site.width,), float(threshold), dtype=torch.float32)
