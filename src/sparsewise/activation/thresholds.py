"""Pure tensor math of activation sparsity: scores, thresholds, per-token top-k, budgets.

No hooks, no models: everything here takes and returns tensors, so each rule is testable alone.
"""

from __future__ import annotations

import math

import torch


def quantile_threshold(samples: torch.Tensor, sparsity: float) -> float:
    """The threshold t with a ``sparsity`` fraction of ``samples`` at or below it.

    Keeping entries with score > t then zeroes that fraction of a tensor drawn from the same
    distribution (TEAL's inverse CDF of a calibrated histogram; here the empirical CDF of a
    uniform sample of entries). ``sparsity`` 0 gives -inf (keep everything, zeros included).
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"activation sparsity must be in [0, 1), got {sparsity}.")
    flat = samples.reshape(-1).float()
    count = round(sparsity * flat.numel())
    if count == 0:
        return float("-inf")
    return float(torch.kthvalue(flat, count).values)


def topk_keep_mask(scores: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """True for the ceil(keep_ratio * d) largest scores of every row (last dim): per-token top-k
    (the Top-k Transformer of "The Lazy Neuron Phenomenon", WINA's top-k mode)."""
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}.")
    width = scores.shape[-1]
    keep = max(1, math.ceil(keep_ratio * width))
    if keep >= width:
        return torch.ones_like(scores, dtype=torch.bool)
    index = scores.topk(keep, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, index, True)


def column_norms(weight: torch.Tensor) -> torch.Tensor:
    """||W[:, j]||_2 for a weight laid out [out, in]: how much input j can move the output (WINA)."""
    return weight.float().norm(dim=0)


def rsparse_budget(in_features: int, out_features: int, sparsity: float, alpha: float) -> tuple[float, int]:
    """R-Sparse's split of a layer's parameter budget B = (1 - s) * in * out.

    A fraction ``alpha`` of the kept channels, k = alpha * (1 - s) * in, goes through the full
    weight (cost k * out); the rest of the budget buys a rank r = (B - k * out) / (in + out)
    factorization for the remaining channels. Returns (fraction of channels on the sparse path,
    rank). alpha = 1: pure thresholding; alpha = 0: pure low rank.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"R-Sparse alpha must be in [0, 1], got {alpha}.")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"activation sparsity must be in [0, 1), got {sparsity}.")
    budget = (1.0 - sparsity) * in_features * out_features
    sparse_fraction = alpha * (1.0 - sparsity)
    rank = int((budget - sparse_fraction * in_features * out_features) // (in_features + out_features))
    return sparse_fraction, max(0, min(rank, min(in_features, out_features)))


def low_rank_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W ~= A @ B with A = U_r S_r [out, r] and B = V_r^T [r, in] (truncated SVD, float32)."""
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    return u[:, :rank] * s[:rank], vh[:rank]


def cett(activations: torch.Tensor, down_weight: torch.Tensor, threshold: float) -> float:
    """Cumulative error of tail truncation (Sparsing Law): mean over tokens of
    ||sum_{i: n_i <= t} a_i W[:, i]|| / ||W a||, with n_i = |a_i| * ||W[:, i]||.

    ``activations`` [tokens, d_ff], ``down_weight`` [d_model, d_ff].
    """
    magnitudes = activations.abs() * column_norms(down_weight)
    tail = torch.where(magnitudes <= threshold, activations, torch.zeros_like(activations)).float()
    full = activations.float() @ down_weight.float().t()
    error = tail @ down_weight.float().t()
    return float((error.norm(dim=-1) / full.norm(dim=-1).clamp_min(1e-12)).mean())


def cett_threshold(activations: torch.Tensor, down_weight: torch.Tensor, target: float, *,
                   steps: int = 24) -> float:
    """The threshold whose CETT is ``target``: bisection between min(n) and the 99% quantile of
    n (CETT is non-decreasing in t), as the Sparsing Law's per-layer search."""
    magnitudes = (activations.abs() * column_norms(down_weight)).reshape(-1).float()
    low, high = float(magnitudes.min()), float(torch.quantile(magnitudes[:2**24], 0.99))
    if cett(activations, down_weight, high) < target:
        high = float(magnitudes.max())
    for _ in range(steps):
        middle = 0.5 * (low + high)
        if cett(activations, down_weight, middle) < target:
            low = middle
        else:
            high = middle
    return low
