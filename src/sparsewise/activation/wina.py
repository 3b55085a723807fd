"""WINA (Chen et al., 2025, "Weight Informed Neuron Activation"): score |x_j| * ||W[:, j]||_2,
so an input that moves the output little (small column norm) is dropped first. With orthogonal
columns the top-k of this score is the k-subset with the least output error."""

from __future__ import annotations

import torch

from .base import ScoreMethod, Site, register
from .thresholds import column_norms


@register
class Wina(ScoreMethod):
    name = "wina"

    def prepare(self, site: Site) -> None:
        site.constants["column_norm"] = column_norms(site.weight)

    def score(self, site: Site, x: torch.Tensor) -> torch.Tensor:
        return x.abs() * site.constants["column_norm"].to(x.device, x.dtype)

    def column_thresholds(self, site: Site, threshold: float) -> torch.Tensor:
        # |x_j| * ||W[:, j]|| > t  <=>  |x_j| > t / ||W[:, j]|| (a zero column never contributes)
        norms = site.constants["column_norm"].float().cpu()
        return torch.where(norms > 0, threshold / norms, torch.full_like(norms, float("inf")))
