"""Per-token top-k of |x| ("The Lazy Neuron Phenomenon", Li et al., 2022: the Top-k Transformer),
applied to every projection input: no calibration, exactly k = ceil((1 - s) * d) survivors."""

from __future__ import annotations

import torch

from .base import ScoreMethod, Site, register


@register
class TopK(ScoreMethod):
    name = "topk"

    def __init__(self, selection: str = "topk"):
        super().__init__(selection)

    def score(self, site: Site, x: torch.Tensor) -> torch.Tensor:
        return x.abs()
