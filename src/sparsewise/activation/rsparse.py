"""R-Sparse (Zhang et al., 2025, "Rank-Aware Activation Sparsity").

Channels whose |x_j| * ||W[:, j]|| exceeds a threshold go through the full weight; the rest
through a rank-r truncated SVD of W: y = W (x * m) + U_r S_r V_r^T (x * (1 - m)). Of the
layer's budget (1 - s) * in * out parameters, a fraction ``alpha`` of the kept channels use the
sparse path and the remainder buys the rank (thresholds.rsparse_budget). alpha = 1 is pure
thresholding, alpha = 0 pure low rank. Per-layer (alpha, s) search is not included (the
authors did not release theirs); one alpha for all layers.
"""

from __future__ import annotations

import torch

from .base import ScoreMethod, Site, register
from .thresholds import column_norms, low_rank_factors, rsparse_budget


@register
class RSparse(ScoreMethod):
    name = "r-sparse"

    def __init__(self, alpha: float = 0.8, selection: str = "threshold"):
        super().__init__(selection)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"R-Sparse alpha must be in [0, 1], got {alpha}.")
        self.alpha = alpha

    def prepare(self, site: Site) -> None:
        site.constants["column_norm"] = column_norms(site.weight)

    def score(self, site: Site, x: torch.Tensor) -> torch.Tensor:
        return x.abs() * site.constants["column_norm"].to(x.device, x.dtype)

    def sparse_path(self, site: Site, sparsity: float) -> tuple[float, int]:
        """(fraction of channels zeroed on the full-weight path, rank of the side path)."""
        out_features, in_features = site.weight.shape
        kept, rank = rsparse_budget(in_features, out_features, sparsity, self.alpha)
        return 1.0 - kept, rank

    def side_factors(self, site: Site, rank: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if rank == 0:
            return None
        full = site.constants.get("_svd")
        if full is None:  # one SVD per site, sliced for every rank asked later
            full = low_rank_factors(site.weight, min(site.weight.shape))
            site.constants["_svd"] = full
        return full[0][:, :rank].contiguous(), full[1][:rank].contiguous()
