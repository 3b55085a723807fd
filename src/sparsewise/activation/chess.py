"""CHESS (He et al., 2024, "Channel-Wise Thresholding and Selective Sparsification").

FFN: importance of channel i for a token = g_i^2 * E[u_i^2] (u = up projection output, its mean
square from calibration), one threshold T per layer on that importance, i.e. a per-channel
threshold sqrt(T / E[u_i^2]) on |g_i|: channels whose up output is large keep smaller gates.
MLPs without an up projection (GPT-2, BERT) have E[u^2] = 1: the rule is CATS there.
Attention ("CHESS w/", the default): |x| thresholds on the inputs of q/k/v and o, one per
projection; ``attention=False`` is "CHESS w/o" (FFN only).
"""

from __future__ import annotations

import torch

from .base import ScoreMethod, Site, register


@register
class Chess(ScoreMethod):
    name = "chess"

    def __init__(self, attention: bool = True, selection: str = "threshold"):
        super().__init__(selection)
        self.site_kinds = ("gate", "attention") if attention else ("gate",)

    observes_up = True  # calibration hooks the up projection and passes its output to observe()

    def observe(self, site: Site, up_output: torch.Tensor) -> None:
        squares = up_output.float().reshape(-1, up_output.shape[-1]).square()
        site.constants["_up_square_sum"] = site.constants.get("_up_square_sum", 0) + squares.sum(0)
        site.constants["_up_count"] = site.constants.get("_up_count", 0) + squares.shape[0]

    def finish_observing(self, site: Site) -> None:
        if site.kind != "gate":
            return
        if "_up_square_sum" in site.constants:
            total = site.constants.pop("_up_square_sum")
            site.constants["up_mean_square"] = total / site.constants.pop("_up_count")
        site.constants.setdefault("up_mean_square", torch.ones(site.width))

    def score(self, site: Site, x: torch.Tensor) -> torch.Tensor:
        if site.kind != "gate":  # attention inputs: one |x| threshold per projection
            return x.abs()
        return x.square() * site.constants["up_mean_square"].to(x.device, x.dtype)

    def column_thresholds(self, site: Site, threshold: float) -> torch.Tensor | None:
        if site.kind == "gate":  # g^2 * E[u^2]: a threshold on |g| per channel, but read by the down projection
            return None
        return torch.full((site.width,), float(threshold), dtype=torch.float32)
