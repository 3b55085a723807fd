"""Pure mask and schedule math for sparse training (tensors in, tensors out; no model plumbing).

Masks are bool tensors laid out as [out, in] rows, True = kept, like the one-shot pruners'.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from ..patterns import Pattern, mask_from_scores, prune_count


def random_mask(shape: tuple[int, int], sparsity: float, generator: torch.Generator,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniformly random keep-mask with exactly ``floor(sparsity * numel)`` zeros.

    The random-pruning paper (Liu et al. 2022) draws a Bernoulli(d_l) per weight (the count is
    right only in expectation); an exact count keeps the global budget exact, as the issue asks.
    """
    numel = shape[0] * shape[1]
    order = torch.randperm(numel, generator=generator)
    keep = torch.ones(numel, dtype=torch.bool)
    keep[order[: prune_count(numel, sparsity)]] = False
    return keep.view(shape).to(device)


def magnitude_mask(weight: torch.Tensor, sparsity: float, pattern: Pattern) -> torch.Tensor:
    """Keep the largest |w|: per layer for unstructured patterns (per row for ``unstructured``
    with row scope), the top N of every M for N:M."""
    return mask_from_scores(weight.detach().abs().float(), sparsity, pattern)


def drop_and_grow(weight: torch.Tensor, mask: torch.Tensor, count: int,
                  grow_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One prune-and-grow update of one layer (SET: random grow scores; RigL: |dL/dW|).

    Drops the ``count`` kept weights of smallest |w|, then grows the ``count`` not-kept entries
    (just-dropped ones included, as in RigL's reference code) with the largest ``grow_scores``.
    The kept count is unchanged. Returns (new mask, grown entries).
    """
    kept = int(mask.sum())
    count = max(0, min(count, kept, mask.numel() - kept))
    if count == 0:
        return mask.clone(), torch.zeros_like(mask)
    flat_mask = mask.reshape(-1)
    magnitude = weight.detach().abs().float().reshape(-1).masked_fill(~flat_mask, float("inf"))
    dropped = torch.topk(magnitude, count, largest=False).indices
    after_drop = flat_mask.clone()
    after_drop[dropped] = False
    candidates = grow_scores.detach().float().to(mask.device).reshape(-1).masked_fill(after_drop, float("-inf"))
    grown = torch.topk(candidates, count, largest=True).indices
    new_mask = after_drop.clone()
    new_mask[grown] = True
    grown_mask = torch.zeros_like(flat_mask)
    grown_mask[grown] = True
    grown_mask &= ~flat_mask  # a dropped-then-regrown weight keeps its place, it is not new
    return new_mask.view_as(mask), grown_mask.view_as(mask)


def cubic_sparsity(step: int, final: float, *, initial: float = 0.0, start: int = 0, end: int) -> float:
    """Gradual magnitude pruning's schedule (Zhu & Gupta 2017):
    s_t = s_f + (s_i - s_f) (1 - (t - t_0) / (t_end - t_0))^3, held at s_i before t_0, s_f after t_end."""
    if end <= start:
        return final if step >= start else initial
    progress = min(max((step - start) / (end - start), 0.0), 1.0)
    return final + (initial - final) * (1.0 - progress) ** 3


def cosine_fraction(step: int, fraction: float, end: int) -> float:
    """RigL's update fraction: alpha/2 (1 + cos(pi t / T_end)), 0 from T_end on."""
    if step >= end:
        return 0.0
    return fraction / 2 * (1 + math.cos(math.pi * step / end))


def nm_stages(n: int, m: int, kind: str = "stepwise") -> list[tuple[int, int]]:
    """Structure-decay stages of progressive gradient flow (Bambhaniya et al. 2024), dense excluded.

    stepwise: (M-1):M, M/2:M, M/4:M, ..., N:M (halving the kept count), e.g. 1:8 ->
    [7:8, 4:8, 2:8, 1:8]; geometric: 8N:8M, 4N:4M, 2N:2M, N:M (same density, finer groups).
    """
    if not 0 < n < m:
        raise ConfigError(f"N:M stages need 0 < N < M, got {n}:{m}.")
    if kind == "geometric":
        return [(n * factor, m * factor) for factor in (8, 4, 2, 1)]
    if kind != "stepwise":
        raise ConfigError(f"stage kind must be 'stepwise' or 'geometric', got {kind!r}.")
    stages = [(m - 1, m)] if m - 1 > n else []
    kept = m // 2
    while kept > n:
        if kept < m - 1:
            stages.append((kept, m))
        kept //= 2
    stages.append((n, m))
    return stages


def soft_shrink(weight: torch.Tensor, sparsity: float, shrink: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ISS-P's step (Wang et al. 2023): the lowest-|w| ``sparsity`` fraction of the layer is
    multiplied by ``shrink`` (0 gives iterative hard thresholding). Returns (new weight, keep-mask
    of the untouched weights)."""
    keep = magnitude_mask(weight, sparsity, Pattern(scope="layer"))
    return torch.where(keep, weight, weight * shrink), keep
