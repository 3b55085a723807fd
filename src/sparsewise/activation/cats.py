"""CATS (Lee et al., 2024, "Contextually-Aware Thresholding for Sparsity"): zero the MLP's
activation output g = act(gate(x)) where |g| <= t, one threshold per layer; the zeros carry
into g * up(x) and the down projection's input, so whole up rows / down columns go unused."""

from __future__ import annotations

import torch

from .base import ScoreMethod, Site, register


@register
class Cats(ScoreMethod):
    name = "cats"
    site_kinds = ("gate",)

    def score(self, site: Site, x: torch.Tensor) -> torch.Tensor:
        return x.abs()
